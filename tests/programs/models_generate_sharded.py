"""Sharded decoding on 8 simulated CPU devices, mesh data=2 x fsdp=2 x tensor=2; prints one line
`RESULT {json}`.

    models_generate_sharded.py MODEL_DIR CASE --eos N --pad N --sampled JSON

Loads MODEL_DIR on the mesh and generates from the prompts in CASE (an .npz with left-padded "ids" and their
"mask") greedily (GenerationConfig(max_new_tokens=16)) and with the sampling settings JSON (GenerationConfig's
fields). The result: "q_proj_devices", the number of devices the attention's q_proj lives on, and the new
tokens of each run, "greedy" and "sampled".
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from nextquill_jax.models import load_pretrained
from nextquill_jax.models.generate import GenerationConfig, generate_ids
from nextquill_jax.parallel import make_mesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("case")
    parser.add_argument("--eos", type=int, required=True)
    parser.add_argument("--pad", type=int, required=True)
    parser.add_argument("--sampled", required=True, help="GenerationConfig fields as JSON")
    args = parser.parse_args()

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_pretrained(args.model_dir, mesh=mesh)
    case = np.load(args.case)
    result = {"q_proj_devices": len(model.layers.attn.q_proj[...].sharding.device_set)}
    for cfg, name in (
        (GenerationConfig(max_new_tokens=16), "greedy"),
        (GenerationConfig(**json.loads(args.sampled)), "sampled"),
    ):
        ours = generate_ids(
            model, case["ids"], case["mask"], cfg, eos_token_ids=[args.eos], pad_token_id=args.pad, mesh=mesh
        )
        result[name] = np.asarray(ours).tolist()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

"""The losses under jit with the batch on one device and sharded over an 8-device 1-D mesh; prints one line
`RESULT {json}`.

    loss_sharded.py        (run with 8 devices)

For nextquill and js (gradient through the weights) through the fused head (`loss_from_hidden`), for
nextquill through dense logits (`loss_from_logits`), and for nextquill with `normalize: example` over rows
of two packed examples (fused): per placement ("single", "sharded") the loss, its aux
values, the gradients of both hidden-state streams and of the head, and the sharding spec of the first
gradient; and the element count of the largest all-gather in the sharded program's HLO.
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nextquill_jax.loss import LossConfig, loss_from_hidden, loss_from_logits

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fused(cfg):
    def f(a, o, c, labels):
        loss = lambda a, o, c: loss_from_hidden(a, o, c, labels, cfg, token_chunk=8, vocab_chunk=40)
        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(a, o, c)

    return f


def dense(cfg):
    def f(a, o, c, labels):
        loss = lambda a, o, c: loss_from_logits(a @ c.T, o @ c.T, labels, cfg)
        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(a, o, c)

    return f


def fused_by_example(cfg):
    def f(a, o, c, labels, example_ids):
        loss = lambda a, o, c: loss_from_hidden(
            a, o, c, labels, cfg, example_ids=example_ids, token_chunk=8, vocab_chunk=40
        )
        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(a, o, c)

    return f


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no arguments; --help
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    b, r, d, v = 8, 6, 16, 97
    hw = rng.normal(size=(b, r, d)).astype(np.float32)
    ho = (hw + 0.6 * rng.normal(size=hw.shape)).astype(np.float32)
    w = (0.4 * rng.normal(size=(v, d))).astype(np.float32)
    y = rng.integers(0, v, size=(b, r)).astype(np.int32)
    y[2] = -100
    y[6, 3:] = -100
    rows = NamedSharding(mesh, P("data"))
    sharded = [
        jax.device_put(hw, rows),
        jax.device_put(ho, rows),
        jax.device_put(w, NamedSharding(mesh, P())),
        jax.device_put(y, rows),
    ]
    single = [jax.device_put(x, jax.devices()[0]) for x in (hw, ho, w, y)]
    # normalize: example over rows that pack two examples (slots 0-2 and 3-5), ids as a fifth argument
    ids = np.repeat(np.array([[1, 1, 1, 2, 2, 2]], np.int32), b, axis=0)
    with_ids = {
        "single": [*single, jax.device_put(ids, jax.devices()[0])],
        "sharded": [*sharded, jax.device_put(ids, rows)],
    }

    out = {}
    for name, cfg, make in [
        ("nextquill-fused", LossConfig(threshold=0.0), fused),
        ("js-jsgrad-fused", LossConfig(variant="js", js_detach=False), fused),
        ("nextquill-dense", LossConfig(threshold=0.0), dense),
        ("nextquill-example-fused", LossConfig(normalize="example"), fused_by_example),
    ]:
        f = jax.jit(make(cfg), compiler_options=FAST_COMPILE)
        by_example = make is fused_by_example
        placements = with_ids if by_example else {"single": single, "sharded": sharded}
        runs = {}
        for where, args in placements.items():
            (loss, aux), grads = f(*args)
            spec = str(getattr(grads[0].sharding, "spec", None))
            runs[where] = dict(
                loss=float(loss),
                aux={k: float(x) for k, x in aux.items()},
                grads=[np.asarray(g).tolist() for g in grads],
                spec=spec,
            )
        hlo = f.lower(*placements["sharded"]).compile().as_text()
        gathered = [
            int(np.prod([int(n) for n in dims.split(",") if n]))
            for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo)
        ]
        out[name] = dict(runs=runs, largest_all_gather=max(gathered, default=0))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()

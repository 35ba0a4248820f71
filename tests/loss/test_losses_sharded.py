"""The losses under jit on 8 simulated CPU devices, batch sharded on a 1-D mesh: the single-device numbers."""

from __future__ import annotations

import json

import numpy as np

from tests.multidevice import run_with_devices

CODE = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from nextquill_jax.loss import LossConfig, loss_from_hidden, loss_from_logits

FAST_COMPILE = {"xla_backend_optimization_level": 0}
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
sharded = [jax.device_put(hw, rows), jax.device_put(ho, rows), jax.device_put(w, NamedSharding(mesh, P())),
           jax.device_put(y, rows)]
single = [jax.device_put(x, jax.devices()[0]) for x in (hw, ho, w, y)]

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

out = {}
for name, cfg, make in [
    ("nextquill-fused", LossConfig(threshold=0.0), fused),
    ("js-jsgrad-fused", LossConfig(variant="js", js_detach=False), fused),
    ("nextquill-dense", LossConfig(threshold=0.0), dense),
]:
    f = jax.jit(make(cfg), compiler_options=FAST_COMPILE)
    runs = {}
    for where, args in (("single", single), ("sharded", sharded)):
        (loss, aux), grads = f(*args)
        spec = str(getattr(grads[0].sharding, "spec", None))
        runs[where] = dict(loss=float(loss), aux={k: float(x) for k, x in aux.items()},
                           grads=[np.asarray(g).tolist() for g in grads], spec=spec)
    hlo = f.lower(*sharded).compile().as_text()
    gathered = [int(np.prod([int(n) for n in dims.split(",") if n]))
                for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo)]
    out[name] = dict(runs=runs, largest_all_gather=max(gathered, default=0))
print(json.dumps(out))
"""


def test_sharded_batch_gives_the_single_device_numbers():
    results = json.loads(run_with_devices(CODE, devices=8).strip().splitlines()[-1])
    hidden_elements = 8 * 6 * 16
    for name, res in results.items():
        single, sharded = res["runs"]["single"], res["runs"]["sharded"]
        np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-6, err_msg=name)
        for k, value in single["aux"].items():
            np.testing.assert_allclose(sharded["aux"][k], value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
        for g_sharded, g_single in zip(sharded["grads"], single["grads"], strict=True):
            want = np.asarray(g_single)
            np.testing.assert_allclose(np.asarray(g_sharded), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        assert sharded["spec"] in ("P('data',)", "PartitionSpec('data',)"), (name, sharded["spec"])
        # data-parallel: no device gathers the hidden states (only per-token DCE values, for the quantiles)
        assert res["largest_all_gather"] < hidden_elements, (name, res["largest_all_gather"])
    fused, dense = results["nextquill-fused"]["runs"]["single"], results["nextquill-dense"]["runs"]["single"]
    np.testing.assert_allclose(fused["loss"], dense["loss"], rtol=1e-5)

"""The losses under jit on 8 simulated CPU devices, batch sharded on a 1-D mesh: the single-device numbers
(also with `normalize: example` over packed rows)."""

from __future__ import annotations

import numpy as np


def test_sharded_batch_gives_the_single_device_numbers(programs):
    results = programs.run("loss_sharded.py", devices=8).result
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
    # 8 rows of two examples; row 2 has no target token and row 6 only its first example's
    assert results["nextquill-example-fused"]["runs"]["sharded"]["aux"]["n_den"] == 13

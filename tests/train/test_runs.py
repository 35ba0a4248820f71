"""Whole training runs in subprocesses, compared with each other (tiny random model and data, 12 steps).

Runs, shared by the tests (a persistent compilation cache lets later runs reuse earlier compilations):
  A  1 device, via the `nextquill-jax train` CLI, uninterrupted: the reference. Its batches arrive
     BATCH_DELAY_S late (a slow input pipeline) and steps 2-3 are profiled (`logging.profile_steps`).
  B  as A, a real SIGTERM after step 5 → stops with a checkpoint;  C  resumes B to the end.
  D  as A, SIGKILL while the asynchronous save of step 9 is in flight, then a byte of its newest complete
     checkpoint (6) flipped;  E  resumes D: names checkpoint 6 as damaged, falls back to 3, runs to the end.
  G  2 processes x 4 devices (gloo), mesh (data=2, fsdp=2, tensor=2), each batch as 2 accumulated
     micro-batches, SIGTERM to process 0 after step 5;  H  resumes G. Compared with A directly (an 8-device
     single-process run as G, compared with both, cost a cold compilation of its own and checked nothing that
     G does not; one process's 8 devices, fsdp=8, are tests/train/test_public_step.py's).
  N  as A, the parameters turn NaN at step 5: the run must stop and name the last good checkpoint.
  S  as A, the disk full while checkpoint 6 is written: the run stops (checkpoint.on_save_error: stop).
  W  as S with on_save_error: continue: trains on to the end without checkpoint 6.
  G1 a copy of G's stopped run resumed by one process (8 devices): refused, naming the process counts.
  L  as G (beside H), process 1 SIGKILLed at step 3: process 0 exits within mesh.peer_timeout_s, naming it.
  P  2 processes (beside H) whose data.tokenizer does not exist: process 0, which prepares the data first,
     fails; process 1 must stop with it, saying so (it used to wait in a collective until gloo gave up with a
     traceback, or until the peer timeout named process 0 as lost).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import time

import jax
import numpy as np
import pytest

from tests.shared import FIXTURES

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

STEPS = 12
MESH8 = {"data": 2, "fsdp": 2, "tensor": 2}
BATCH_DELAY_S = 0.3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_runs):
    root = tmp_path_factory.mktemp("train_runs")
    r = train_runs(root, STEPS)
    sigterm_at_5 = ("--fault", "sigterm", "--fault-step", "5")
    out = {"root": root}
    # G's processes start after A and the first five runs, not beside them: on busier cores they wait longer
    # in their collectives, at a cost in CPU (once measured: the fixture took ~20 CPU-s more that way).
    a_cfg = r.config("A", logging={"tensorboard": True, "profile_steps": [2, 3]})
    out["A"] = r.finish(r.start(a_cfg, 1, "--cli", "--batch-delay", str(BATCH_DELAY_S)))

    enospc_at_6 = ("--fault", "enospc", "--fault-step", "6", "--cli")
    b = r.start(r.config("B"), 1, *sigterm_at_5)
    d = r.start(r.config("D"), 1, "--fault", "sigkill", "--fault-step", "9")
    n = r.start(r.config("N"), 1, "--fault", "nan", "--fault-step", "5", "--cli")
    s = r.start(r.config("S"), 1, *enospc_at_6)
    w = r.start(r.config("W", checkpoint={"on_save_error": "continue"}), 1, *enospc_at_6)
    out["B"], out["D"], out["N"] = r.finish(b), r.finish(d, expect=-9), r.finish(n, expect=3)
    out["S"], out["W"] = r.finish(s, expect=5), r.finish(w)
    out["D_dir_after_kill"] = sorted(p.name for p in (root / "D" / "checkpoints").iterdir())
    out["D_damaged"] = _flip_a_byte(_largest_file(root / "D" / "checkpoints" / "6" / "state"))

    g_cfg = r.config("G", rows_per_batch=4, mesh=MESH8, train={"micro_batches": 2})
    c = r.start(str(root / "B.yaml"), 1)
    e = r.start(str(root / "D.yaml"), 1)
    g = r.two_processes(g_cfg, *sigterm_at_5)
    out["C"], out["E"], out["G"] = r.finish(c), r.finish(e), [r.finish(p) for p in g]
    # G's stopped run resumed by one process with G's global batch (8 rows) on the same mesh.
    shutil.copytree(root / "G", root / "G1")
    g1 = r.start(r.config("G1", rows_per_batch=8, mesh=MESH8, train={"micro_batches": 2}), 8, "--cli")
    out["G1"] = r.finish(g1, expect=1)
    h = r.two_processes(g_cfg)
    l_cfg = r.config("L", rows_per_batch=4, mesh={**MESH8, "peer_timeout_s": 3}, train={"micro_batches": 2})
    survivor, victim = r.two_processes(
        l_cfg, "--fault", "sigkill", "--fault-step", "3", "--fault-process", "1"
    )
    out["L_victim"] = r.finish(victim, expect=-9)
    killed = time.monotonic()
    out["L_survivor"] = r.finish(survivor, expect=4)
    out["L_seconds"] = time.monotonic() - killed
    no_tokenizer = {
        "format": "generic",
        "template": "plain",
        "sources": [str(FIXTURES / "generic" / "records.jsonl")],
        "tokenizer": str(root / "no_tokenizer"),
    }
    p_cfg = r.config("P", data=no_tokenizer, mesh={"peer_timeout_s": 600})
    started = time.monotonic()
    out["P"] = [r.finish(p, expect=1) for p in r.two_processes(p_cfg, "--cli")]
    out["P_seconds"] = time.monotonic() - started
    out["H"] = [r.finish(p) for p in h]
    return out


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_a_byte(path):
    """Damage `path` as failing storage would: one byte in its middle inverted, size and mtime kept."""
    raw, stat = bytearray(path.read_bytes()), path.stat()
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return path


def _assert_same_state(a: dict, b: dict, *, exact: bool, rtol: float = 0.0, atol: float = 0.0) -> None:
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_cli_run_loss_falls_and_fills_the_workdir(runs, run_losses):
    work = runs["root"] / "A"
    assert "finished at step 12" in runs["A"].stdout
    curve = run_losses(work)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = curve[1], np.mean([curve[s] for s in range(STEPS - 2, STEPS + 1)])
    assert last < first - 0.3, (first, last)
    assert (work / "config.yaml").exists()
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    complete = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert STEPS in complete and len(complete) <= 3  # keep 2 latest + the best by eval/loss
    for item in ("state", "data", "config", "progress"):
        assert (work / "checkpoints" / str(STEPS) / item).is_dir(), item


def test_sigterm_then_resume_reproduces_the_uninterrupted_run_bitwise(runs, run_losses, read_state):
    root = runs["root"]
    stopped = runs["B"].result
    assert stopped["status"] == "preempted" and stopped["step"] == 6, stopped
    assert f"checkpoint {root / 'B' / 'checkpoints' / '6'} is complete" in runs["B"].stdout + runs["B"].stderr
    assert f"resuming from {root / 'B' / 'checkpoints' / '6'}" in runs["C"].stdout
    assert runs["C"].result["step"] == STEPS
    assert run_losses(root / "B") == run_losses(root / "A")  # every step, same batches, same numbers
    _assert_same_state(
        read_state(root / "A" / "checkpoints" / "12"),
        read_state(root / "B" / "checkpoints" / "12"),
        exact=True,
    )


def test_sigkill_during_async_save_resumes_from_last_complete_checkpoint(runs, run_losses, read_state):
    root = runs["root"]
    left = runs["D_dir_after_kill"]
    assert "6" in left and "9" not in left, left
    assert any(name.startswith("9.orbax-checkpoint-tmp") for name in left), left  # killed mid-save
    assert f"resuming from {root / 'D' / 'checkpoints' / '3'}" in runs["E"].stdout  # 6 was damaged after
    assert not [p for p in (root / "D" / "checkpoints").iterdir() if "tmp" in p.name]
    assert run_losses(root / "D") == run_losses(root / "A")
    _assert_same_state(
        read_state(root / "A" / "checkpoints" / "12"),
        read_state(root / "D" / "checkpoints" / "12"),
        exact=True,
    )


def _metric_rows(workdir) -> dict[tuple[int, str], float]:
    """(step, key) -> value of every row of `workdir`/metrics.jsonl, asserting that no (step, key) repeats."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    pairs = [((r["step"], k), v) for r in rows for k, v in r.items() if k != "step"]
    repeated = [p for p, n in collections.Counter(p for p, _ in pairs).items() if n > 1]
    assert not repeated, (workdir, repeated)
    return dict(pairs)


def test_each_step_and_key_is_logged_once_evaluations_and_resumed_runs_included(runs, tmp_path):
    from nextquill_jax.config import load_config
    from nextquill_jax.train import loop

    root = runs["root"]
    uninterrupted = _metric_rows(root / "A")
    evaluated = sorted(step for step, key in uninterrupted if key == "eval/loss")
    assert len(evaluated) >= 2 and evaluated[-1] == STEPS, evaluated  # epoch ends and the last step
    timing = lambda rows: {
        k: v for k, v in rows.items() if k[1] not in ("tokens_per_second", "data_wait_fraction")
    }
    for resumed in ("B", "D"):  # resumed after SIGTERM, after SIGKILL mid-save: the same rows, same numbers
        assert timing(_metric_rows(root / resumed)) == timing(uninterrupted), resumed
    assert _metric_rows(root / "G").keys() == uninterrupted.keys()  # 2 processes, stopped and resumed

    # Running a finished run again trains, evaluates and logs nothing.
    shutil.copytree(root / "A", tmp_path / "A")
    before = sorted(p.name for p in (tmp_path / "A" / "checkpoints").iterdir())
    messages = []
    result = loop.train(load_config(root / "A.yaml"), tmp_path / "A", echo=messages.append)
    assert (result.status, result.step, result.last_checkpoint) == ("finished", STEPS, STEPS)
    assert f"already finished at step {STEPS} of {STEPS}" in messages[-1], messages
    assert (tmp_path / "A" / "metrics.jsonl").read_bytes() == (root / "A" / "metrics.jsonl").read_bytes()
    assert sorted(p.name for p in (tmp_path / "A" / "checkpoints").iterdir()) == before


def test_profile_steps_write_a_trace_and_a_slow_dataset_shows_in_the_data_wait_fraction(runs):
    work = runs["root"] / "A"
    profile = work / "profile"
    assert list(profile.rglob("*.xplane.pb")), sorted(profile.rglob("*"))
    assert f"profile of steps 2-3 written to {profile}" in runs["A"].stdout
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # not the evaluations' rows
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        # One step per row (logging.every_steps 1): the row's wall time is its tokens over its rate, and the
        # loop waited at least BATCH_DELAY_S of it for the batch.
        wall = r["input_tokens"] / r["tokens_per_second"]
        assert BATCH_DELAY_S / wall * (1 - 1e-9) <= r["data_wait_fraction"] <= 1, r
    # Past compilation (step 1) and the trace (2-3), a tiny step takes milliseconds against the 300 ms wait;
    # the median skips the rows that also hold an evaluation or a save.
    assert np.median([r["data_wait_fraction"] for r in rows[3:]]) > 0.5, rows


def _expected_spec(name: str) -> str:
    """Mesh spec of each parameter under DEFAULT_RULES, written out by hand from the model's layout."""
    table = {
        "['embed']": "P('tensor', 'fsdp')",  # [V, D]: vocab -> tensor, embed -> fsdp
        "['final_norm']['scale']": "P(None,)",
        "['layers']['attn']['q_proj']": "P(None, 'fsdp', 'tensor', None)",  # [L, D, H, Hd]
        "['layers']['attn']['k_proj']": "P(None, 'fsdp', 'tensor', None)",
        "['layers']['attn']['v_proj']": "P(None, 'fsdp', 'tensor', None)",
        "['layers']['attn']['o_proj']": "P(None, 'tensor', None, 'fsdp')",  # [L, H, Hd, D]
        "['layers']['attn']['q_bias']": "P(None, 'tensor', None)",  # [L, H, Hd]
        "['layers']['attn']['k_bias']": "P(None, 'tensor', None)",
        "['layers']['attn']['v_bias']": "P(None, 'tensor', None)",
        "['layers']['mlp']['gate']": "P(None, 'fsdp', 'tensor')",  # [L, D, F]
        "['layers']['mlp']['up']": "P(None, 'fsdp', 'tensor')",
        "['layers']['mlp']['down']": "P(None, 'tensor', 'fsdp')",  # [L, F, D]
        "['layers']['input_norm']['scale']": "P(None, None)",
        "['layers']['post_attn_norm']['scale']": "P(None, None)",
    }
    return table[name]


def test_two_processes_shard_as_the_rules_say_checkpoint_resume_and_match_one_process(
    runs, run_losses, read_state
):
    root = runs["root"]
    stopped = [run.result for run in runs["G"]]
    assert {r["process"] for r in stopped} == {0, 1}
    assert {r["status"] for r in stopped} == {"preempted"}
    assert len({r["step"] for r in stopped}) == 1 and 5 <= stopped[0]["step"] < STEPS, stopped
    finished = [run.result for run in runs["H"]]
    assert {(r["status"], r["step"]) for r in finished} == {("finished", STEPS)}
    assert "resuming from" in runs["H"][0].stdout and "resuming from" in runs["H"][1].stdout
    # The specs of the global arrays (a NamedSharding over the whole 2-process mesh), as trained (G) and as
    # restored from a checkpoint and trained on (H), on either process.
    for result in stopped + finished:
        for name, spec in result["params"].items():
            assert spec.replace(" ", "") == _expected_spec(name).replace(" ", ""), (name, spec)
        assert result["mu"] == result["params"]  # Adam moments sharded like their parameters (FSDP)
    single, multi = run_losses(root / "A"), run_losses(root / "G")
    assert sorted(multi) == sorted(single)
    for step in single:
        assert abs(multi[step] - single[step]) <= 1e-5 * abs(single[step]), (step, single[step], multi[step])
    # Gloo's reductions run in another order than the in-process ones; Adam divides every element's update by
    # its own gradient scale, so near-zero gradients (biases) carry that float32 noise into ~1e-6 differences.
    _assert_same_state(
        read_state(root / "A" / "checkpoints" / "12")["params"],
        read_state(root / "G" / "checkpoints" / "12")["params"],
        exact=False,
        rtol=1e-4,
        atol=1e-5,
    )


def test_a_resume_by_another_number_of_processes_is_refused_before_the_restore_naming_both(runs):
    """G1: G's checkpoint (2 processes) resumed by one process on the same 8-device mesh, with the same global
    batch. Each process saved its own share of the data's position: the restore failed on a missing file
    (`process_0-of-1.json`), or, with the per-process rows unchanged, the config check named only
    `rows_per_batch`; the run is refused first, naming both counts and the fix."""
    err = runs["G1"].stderr
    assert "was saved by 2 processes and this run has 1" in err, err[-2000:]
    assert "Fix: resume with 2 processes" in err and "Traceback" not in err


def test_export_loads_in_transformers_with_equal_logits(runs, tmp_path, read_state):
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from nextquill_jax.cli import main
    from nextquill_jax.config import load_config
    from nextquill_jax.train import model_setup

    work = runs["root"] / "A"
    assert main(["export", "--workdir", str(work), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    cfg = load_config(work / "config.yaml")
    graphdef, _ = model_setup.abstract_model(model_setup.model_config(cfg.model))
    params = read_state(work / "checkpoints" / "12")["params"]
    ours = nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params))
    ids = np.random.default_rng(1).integers(0, 128, (2, 24)).astype(np.int32)
    want = np.asarray(ours(jax.numpy.asarray(ids)))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_last_good_checkpoint(runs, run_losses):
    root = runs["root"]
    message = runs["N"].stderr
    assert "not finite at step 5" in message, message
    assert f"Last good checkpoint: {root / 'N' / 'checkpoints' / '3'}" in message, message
    assert max(run_losses(root / "N")) == 4  # nothing logged from the bad step on
    assert sorted(int(p.name) for p in (root / "N" / "checkpoints").iterdir()) == [3]


def test_a_workdir_serves_as_the_frozen_reference_model(runs, read_state):
    from nextquill_jax.config import load_config
    from nextquill_jax.parallel import make_mesh
    from nextquill_jax.train.reference_model import load_reference

    work = runs["root"] / "A"
    overrides = ["loss.variant=dce", "loss.dce=fixed", f"loss.reference_model={work}"]
    cfg = load_config(work / "config.yaml", overrides)
    params = load_reference(cfg, make_mesh({"data": 1, "fsdp": -1, "tensor": 1})).params
    _assert_same_state(jax.device_get(params), read_state(work / "checkpoints" / "12")["params"], exact=True)


def test_a_path_reference_model_runs_its_layers_as_the_runs_model_does(
    tmp_path, tiny_config, write_config, tiny_hf_config
):
    """A `dce: fixed` reference loaded from a path takes the run's runtime fields (its forward runs inside
    the training step, on the same batches): the layer scan's unroll and the attention implementation too,
    which it once left at their defaults."""
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from nextquill_jax.config import load_config
    from nextquill_jax.models.config import RUNTIME_FIELDS
    from nextquill_jax.parallel import make_mesh
    from nextquill_jax.train import model_setup
    from nextquill_jax.train.reference_model import load_reference

    AutoModelForCausalLM.from_config(tiny_hf_config("qwen2", vocab_size=128)).save_pretrained(tmp_path / "hf")
    config = write_config(tiny_config(tmp_path / "data", tmp_path / "run"), tmp_path / "run.yaml")
    overrides = [
        "loss.variant=dce",
        "loss.dce=fixed",
        f"loss.reference_model={tmp_path / 'hf'}",
        "model.scan_unroll=2",
        "model.attention_impl=xla_dense",
        "model.remat_policy=full",
    ]
    cfg = load_config(config, overrides)
    loaded = load_reference(cfg, make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
    reference = nnx.merge(loaded.graphdef, loaded.params)
    run_model = model_setup.model_config(cfg.model)
    for field in RUNTIME_FIELDS:
        assert getattr(reference.cfg, field) == getattr(run_model, field), field
    assert (reference.cfg.scan_unroll, reference.cfg.attention_impl) == (2, "xla_dense")


@pytest.mark.parametrize("base_dtype", ["bfloat16", "nf4", "float32"])
def test_a_path_reference_model_beside_lora_adapters_is_stored_as_the_base_is(
    tmp_path, tiny_config, write_config, tiny_hf_config, base_dtype
):
    """In a LoRA run `model.param_dtype` is the adapters' dtype; a path `dce: fixed` reference is frozen like
    the base and once took the adapters' float32 where the base was bfloat16: twice its memory. It is now
    stored as the base is (bfloat16 for a quantized base), its values the float32 weights rounded to that
    dtype."""
    import ml_dtypes
    from transformers import AutoModelForCausalLM

    from nextquill_jax.config import load_config
    from nextquill_jax.parallel import make_mesh
    from nextquill_jax.train.reference_model import load_reference

    torch_model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2", vocab_size=128))
    torch_model.save_pretrained(tmp_path / "hf")
    lora = {"rank": 2, "alpha": 4.0, "targets": ["attn/(q|v)_proj"], "base_dtype": base_dtype}
    sections = {"model": {"lora": lora, "param_dtype": "float32", "compute_dtype": "float32"}}
    config = write_config(tiny_config(tmp_path / "data", tmp_path / "run", **sections), tmp_path / "run.yaml")
    overrides = ["loss.variant=dce", "loss.dce=fixed", f"loss.reference_model={tmp_path / 'hf'}"]
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    params = load_reference(load_config(config, overrides), mesh).params
    want = "float32" if base_dtype == "float32" else "bfloat16"
    rounded = ml_dtypes.bfloat16 if want == "bfloat16" else np.float32
    assert {leaf.dtype.name for leaf in jax.tree.leaves(params)} == {want}
    q_kernel = torch_model.model.layers[0].self_attn.q_proj.weight.detach().numpy().T  # [D, H * head_dim]
    got = np.asarray(params["layers"]["attn"]["q_proj"][0], np.float32).reshape(q_kernel.shape)  # layer 0
    np.testing.assert_array_equal(got, q_kernel.astype(rounded).astype(np.float32))


def test_a_damaged_checkpoint_is_named_and_the_run_falls_back_to_the_newest_verified_one(
    runs, run_losses, read_state
):
    root, damaged = runs["root"], runs["D_damaged"]
    said = runs["E"].stdout + runs["E"].stderr
    ckpts = root / "D" / "checkpoints"
    assert f"checkpoint {ckpts / '6'} is damaged and not restorable: {damaged}: blake2b-128 checksum" in said
    assert f"(moved aside to {ckpts / '6.corrupt'}); trying the previous checkpoint" in said
    assert f"resuming from {ckpts / '3'} (step 3)" in said
    assert '"status": "finished", "step": 12' in said
    # Steps 4-6 ran again on the same batches (the data position came back with checkpoint 3).
    assert run_losses(root / "D") == run_losses(root / "A")
    _assert_same_state(read_state(root / "A" / "checkpoints" / "12"), read_state(ckpts / "12"), exact=True)


def test_a_full_disk_during_a_save_stops_the_run_and_keeps_the_previous_checkpoint(runs):
    from nextquill_jax.config import CheckpointConfig
    from nextquill_jax.train.checkpoint import Checkpointer

    ckpts = runs["root"] / "S" / "checkpoints"
    message = runs["S"].stderr
    assert f"saving checkpoint 6 in {ckpts} failed: [Errno 28] No space left on device" in message, message
    kept = f"the newest complete one, {ckpts / '3'}, is intact"
    assert f"Step 6 is not marked complete (its partial files were removed); {kept}" in message
    assert "Training stopped (checkpoint.on_save_error: stop)" in message
    assert sorted(p.name for p in ckpts.iterdir()) == ["3"]
    reader = Checkpointer(ckpts, CheckpointConfig(), read_only=True)
    assert reader.check(3).status == "ok"
    reader.close()


def test_a_full_disk_with_on_save_error_continue_trains_on_without_that_checkpoint(
    runs, run_losses, read_state
):
    root = runs["root"]
    ckpts = root / "W" / "checkpoints"
    said = runs["W"].stdout + runs["W"].stderr
    assert f"saving checkpoint 6 in {ckpts} failed: [Errno 28] No space left on device" in said
    assert "Training goes on without it (checkpoint.on_save_error: continue)" in said
    assert "finished at step 12" in said
    steps = sorted(p.name for p in ckpts.iterdir())
    assert "6" not in steps and "12" in steps and not [s for s in steps if "tmp" in s], steps
    assert run_losses(root / "W") == run_losses(root / "A")
    _assert_same_state(read_state(root / "A" / "checkpoints" / "12"), read_state(ckpts / "12"), exact=True)


def test_a_lost_process_ends_the_other_within_the_peer_timeout_naming_it(runs):
    message = runs["L_survivor"].stderr
    assert "error: process 1 of this 2-process run has not answered for" in message, message[-3000:]
    assert "(mesh.peer_timeout_s=3): its host died or it was killed. Process 0 exits with status 4" in message
    assert runs["L_seconds"] < 3 + 10, runs["L_seconds"]  # the timeout, plus a watchdog period and slack


def test_checkpoint_verify_prints_a_table_and_readers_skip_a_damaged_checkpoint(
    runs, tmp_path, capsys, read_state
):
    from nextquill_jax.cli import main
    from nextquill_jax.train.workdir import restore_params

    work = tmp_path / "A"
    shutil.copytree(runs["root"] / "A", work)
    ckpts = work / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir())
    older = steps[-2]
    assert main(["checkpoint", "verify", "--workdir", str(work)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[:2] == ["| step | status | files | MB | problems |", "| ---: | --- | ---: | ---: | --- |"]
    assert [row.split(" | ")[:2] for row in table[2:]] == [[f"| {s}", "ok"] for s in steps]

    damaged = _flip_a_byte(_largest_file(ckpts / "12" / "state"))
    assert main(["checkpoint", "verify", "--workdir", str(work)]) == 1
    rows = {row.split(" | ")[0]: row for row in capsys.readouterr().out.splitlines()[2:]}
    assert rows["| 12"].startswith("| 12 | failed | ") and f"{damaged}: blake2b-128 checksum" in rows["| 12"]
    assert rows[f"| {older}"].startswith(f"| {older} | ok | ")

    # evaluate, effects, export and a frozen reference model all read checkpoints through restore_params.
    restored = restore_params(work)
    assert restored.step == older
    assert f"checkpoint {ckpts / '12'} is damaged and not restorable: {damaged}" in capsys.readouterr().err
    _assert_same_state(jax.device_get(restored.params), read_state(ckpts / str(older))["params"], exact=True)
    assert (ckpts / "12").is_dir()  # readers move nothing
    assert main(["export", "--workdir", str(work), "--step", "12", "--out", str(tmp_path / "hf")]) == 1
    assert (
        f"error: checkpoint {ckpts / '12'} is damaged and not restorable: {damaged}"
        in capsys.readouterr().err
    )


def test_a_data_error_on_process_0_stops_the_other_process_too_saying_why(runs):
    first, second = runs["P"]
    said = first.stderr
    # named at the line of the config file that sets it
    assert re.search(r"error: \S+\.yaml, line \d+: data\.tokenizer: no tokenizer", said), said[-3000:]
    assert "no_tokenizer" in said, said[-3000:]
    assert "error: process 0 failed to prepare the data in" in second.stderr, second.stderr[-3000:]
    assert "so process 1 stops too: process 0's error (above, or in its log) names the" in second.stderr
    assert "has not answered" not in first.stderr + second.stderr and "Traceback" not in second.stderr
    assert runs["P_seconds"] < 120, runs["P_seconds"]  # set-up only; the peer timeout is 600 s

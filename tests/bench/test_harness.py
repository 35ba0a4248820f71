"""The benchmark harness's timed run (`bench.harness.TrainingHarness.time`) on a tiny model: the step it
times is the training step (its first loss is `train.step.batch_loss` of the initial parameters), and
`profile_dir` writes a `jax.profiler` trace of the timed steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.bench import harness
from nextquill_jax.bench.harness import (
    MIB,
    StepTiming,
    TrainingHarness,
    alternating_best_seconds,
    best_seconds,
    synthetic_batch,
)
from nextquill_jax.parallel import make_mesh
from nextquill_jax.train.step import batch_loss


def test_timed_steps_run_the_training_step_and_are_profiled(tiny_model_config, tmp_path):
    cfg = tiny_model_config(vocab_size=128, compute_dtype="float32")
    batch, _ = synthetic_batch(
        4, 64, 2, context_tokens=8, entry_tokens=10, target_tokens=8, vocab=128, length_multiple=8
    )
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    harness = TrainingHarness(cfg, mesh)
    initial = jax.device_get(harness.state.params)
    loss = jax.jit(lambda p, b: batch_loss(p, harness.graphdef, b, harness.settings)[0])
    want = loss(initial, jax.tree.map(jnp.asarray, batch))
    # warmup=0 still runs one untimed step (compile and first-run costs stay out of the times): its loss
    timing = harness.time(batch, warmup=0, steps=2, profile_dir=tmp_path / "trace")
    assert len(timing.step_s) == 2 and min(timing.step_s) > 0
    np.testing.assert_allclose(timing.first_loss, float(want), rtol=1e-6)
    # XLA's own accounting of the step: its temporaries, and every buffer live at once less the donated
    # state that its outputs reuse (aliased arguments are counted once)
    memory = harness.compile(batch).memory_analysis()
    assert memory.alias_size_in_bytes > 0  # the state is donated
    assert timing.compiled_temp_mib == memory.temp_size_in_bytes / MIB
    total = (
        memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
    ) - memory.alias_size_in_bytes
    assert timing.compiled_total_mib == total / MIB
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), sorted(tmp_path.rglob("*"))


def test_a_stepper_runs_the_training_step_and_advances_the_state(tiny_model_config):
    """`stepper(batch)` (what benchmarks/lora.py alternates): each call is one training step from the state
    as it is, its loss `batch_loss` of the parameters before it."""
    cfg = tiny_model_config(vocab_size=128, compute_dtype="float32")
    batch, _ = synthetic_batch(
        4, 64, 2, context_tokens=8, entry_tokens=10, target_tokens=8, vocab=128, length_multiple=8
    )
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    harness = TrainingHarness(cfg, mesh)
    loss = jax.jit(lambda p, b: batch_loss(p, harness.graphdef, b, harness.settings)[0])
    step = harness.stepper(batch)
    for _ in range(2):
        want = float(loss(jax.device_get(harness.state.params), jax.tree.map(jnp.asarray, batch)))
        state, metrics = step()
        assert state is harness.state
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-6)
    assert int(harness.state.step) == 2


def test_alternating_best_seconds_warms_each_up_then_calls_them_in_turn_keeping_each_ones_best(monkeypatch):
    """On a clock each call advances by its own programmed time: the warm-up calls are not timed, the rounds
    interleave the calls (load from other jobs then biases none against the others), and each keeps its
    fastest."""
    clock, order = [0.0], []
    durations = {"a": iter([9.0, 3.0, 1.0, 2.0]), "b": iter([9.0, 5.0, 6.0, 4.0])}  # warm-up first

    def call(name):
        def run():
            order.append(name)
            clock[0] += next(durations[name])

        return run

    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    best = alternating_best_seconds({"a": call("a"), "b": call("b")}, rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert best == {"a": 1.0, "b": 4.0}


def test_best_seconds_warms_up_once_then_keeps_the_fastest_of_its_steps(monkeypatch):
    """On a clock each call advances by its programmed time: the warm-up call (compile) is not timed, then
    `steps` calls are, and the fastest is kept (not their mean)."""
    clock, calls = [0.0], []
    durations = iter([9.0, 3.0, 1.0, 2.0])  # warm-up first

    def fn(x):
        calls.append(x)
        clock[0] += next(durations)

    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    assert best_seconds(fn, "x", steps=3) == 1.0
    assert calls == ["x"] * 4
    timing = StepTiming(1.0, [3.0, 1.0, 2.0], 0.0, 0.0, 0.0, None)
    assert timing.best_step_s == 1.0


def test_a_synthetic_batch_packs_as_many_whole_examples_as_fill_a_row():
    """By hand: an example takes 16 + 2 x 20 + 8 = 64 with-stream tokens, so rows of 128 hold exactly 2 (4
    examples in 2 rows); the without stream 2 x (16 + 8) = 48 tokens in 64 slots and the response 2 x 8 = 16
    in 32 (rounded up to multiples of 32)."""
    batch, shape = synthetic_batch(
        2, 128, 2, context_tokens=16, entry_tokens=20, target_tokens=8, vocab=300, length_multiple=32
    )
    assert shape.as_tuple() == (128, 64, 32)
    assert [batch[k].shape for k in ("with_ids", "without_ids", "labels")] == [(2, 128), (2, 64), (2, 32)]
    for row in range(2):
        for stream, tokens in (("with", 64), ("without", 24)):
            segments = batch[f"{stream}_segment_ids"][row]
            assert [int((segments == s).sum()) for s in (1, 2)] == [tokens, tokens]
            assert (segments[2 * tokens :] == 0).all()
        assert int((batch["labels"][row] >= 0).sum()) == 16
    # ids are drawn from [1, vocab): with vocab 2 every token is 1 (0 is padding's)
    ones, _ = synthetic_batch(
        1, 64, 2, context_tokens=16, entry_tokens=20, target_tokens=8, vocab=2, length_multiple=32
    )
    for stream in ("with", "without"):
        assert set(ones[f"{stream}_ids"][ones[f"{stream}_segment_ids"] > 0].tolist()) == {1}
    with pytest.raises(ValueError, match=r"^an example of 64 with-stream tokens .* does not fit seq_len 63$"):
        synthetic_batch(
            1, 63, 2, context_tokens=16, entry_tokens=20, target_tokens=8, vocab=300, length_multiple=32
        )


def test_step_breakdown_times_each_part_with_the_steps_asked_and_refuses_a_lora_harness(
    tiny_model_config, monkeypatch
):
    """Each part is timed by `best_seconds` and the whole step by `time`, each over the `steps` given (fakes
    record them here, and run each part once, timing nothing); a LoRA harness, whose parts are not these, is
    refused."""
    from nextquill_jax.config import LoraConfig

    cfg = tiny_model_config(vocab_size=128, compute_dtype="float32")
    batch, _ = synthetic_batch(
        4, 64, 2, context_tokens=8, entry_tokens=10, target_tokens=8, vocab=128, length_multiple=8
    )
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    asked = []

    def best_seconds(fn, *args, steps):
        asked.append(steps)
        jax.block_until_ready(fn(*args))
        return 2.0

    monkeypatch.setattr(harness, "best_seconds", best_seconds)
    monkeypatch.setattr(
        TrainingHarness,
        "time",
        lambda self, b, *, warmup, steps: asked.append(steps) or StepTiming(0, [3.0, 1.0], 0, 0, 0, None),
    )
    parts = harness.step_breakdown(TrainingHarness(cfg, mesh), batch, steps=5)
    assert parts == {"forward": 2.0, "forward+backward": 2.0, "loss": 2.0, "optimizer": 2.0, "step": 1.0}
    assert asked == [5] * 5
    with pytest.raises(ValueError, match="step_breakdown times full fine-tuning harnesses"):
        harness.step_breakdown(TrainingHarness(cfg, mesh, lora=LoraConfig(rank=2)), batch)


def test_the_synthetic_train_split_keeps_at_most_max_history_entries(tmp_path):
    """The same users with no history entry kept and with one: the with-history prompts of the first are the
    shorter (the without-history prompts are the same), so the count reached the preparation."""

    def prompts(max_history):
        split = harness.synthetic_train_split(
            tmp_path / str(max_history), users=2, seed=0, tokenizer="smollm2-135m", max_history=max_history
        )
        return [(len(split[i]["prompt_with"]), len(split[i]["prompt_without"])) for i in range(len(split))]

    none, one = prompts(0), prompts(1)
    assert len(none) == len(one) > 0
    assert [w for _, w in none] == [w for _, w in one]
    assert sum(w for w, _ in none) < sum(w for w, _ in one)


def test_a_harness_steps_with_the_settings_it_is_given(tiny_model_config):
    """micro_batches, operand_dtype, joint_forward and LoRA's scale (alpha / rank) and dropout reach the
    step's settings; an abstract harness refuses LoRA (it holds no parameters to adapt)."""
    from nextquill_jax.config import LoraConfig

    cfg = tiny_model_config(vocab_size=128, compute_dtype="float32")
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    settings = TrainingHarness(
        cfg, mesh, micro_batches=2, operand_dtype="bfloat16", joint_forward=True
    ).settings
    assert (settings.micro_batches, settings.operand_dtype, settings.joint_forward) == (2, "bfloat16", True)
    lora = LoraConfig(rank=2, alpha=4.0, dropout=0.25)
    settings = TrainingHarness(cfg, mesh, lora=lora).settings
    assert (settings.lora_scale, settings.lora_dropout) == (2.0, 0.25)
    with pytest.raises(ValueError, match=r"^an abstract harness takes neither a model nor lora"):
        TrainingHarness(cfg, mesh, lora=lora, abstract=True)


def test_a_harness_given_a_model_trains_that_models_parameters(tiny_model_config):
    from flax import nnx

    from nextquill_jax.models import CausalLM

    cfg = tiny_model_config(vocab_size=128, compute_dtype="float32")
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    model = CausalLM(cfg, rngs=nnx.Rngs(7))
    given = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = TrainingHarness(cfg, mesh, model=model, seed=0).state
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(given))


def test_the_loss_part_reads_a_tied_head_as_the_embedding_and_an_untied_one_as_its_kernel(tiny_model_config):
    """Logits h @ E.T of a tied head are an untied kernel E.T's: the tied harness's loss part on its
    embedding E [V, D] and the untied one's on E.T [D, V] give the same loss and hidden-state gradients, and
    head gradients transposed; each harness's `head_weight` is the matrix its model's head uses."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    tied, untied = (
        TrainingHarness(
            tiny_model_config(vocab_size=128, compute_dtype="float32", tie_word_embeddings=t), mesh
        )
        for t in (True, False)
    )
    embed = jax.device_get(tied.state.params["embed"])  # [V, D]
    assert embed.shape == (128, 32) and "lm_head" not in tied.state.params
    np.testing.assert_array_equal(jax.device_get(tied.head_weight(tied.state.params)), embed)
    np.testing.assert_array_equal(
        jax.device_get(untied.head_weight(untied.state.params)),
        jax.device_get(untied.state.params["lm_head"]),
    )
    rng = np.random.default_rng(0)
    h_w, h_o = (rng.normal(size=(2, 6, 32)).astype(np.float32) for _ in range(2))
    labels = rng.integers(0, 128, size=(2, 6)).astype(np.int32)
    labels[1, 4:] = -100
    with jax.set_mesh(mesh):
        loss_t, (gw_t, go_t, ghead_t) = tied.loss_value_and_grad()(h_w, h_o, embed, labels)
        loss_u, (gw_u, go_u, ghead_u) = untied.loss_value_and_grad()(h_w, h_o, embed.T.copy(), labels)
    np.testing.assert_allclose(float(loss_t), float(loss_u), rtol=1e-6)
    for a, b in ((gw_t, gw_u), (go_t, go_u), (ghead_t, np.asarray(ghead_u).T)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)

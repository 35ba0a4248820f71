"""The Grain batch pipeline: pairing of the two streams, packing, sharding, determinism, resume.

Test data: random prompts of different lengths and targets whose token ids name their example and position
(`TARGET_BASE + i * STRIDE + j`), so every label can be traced back to the example it came from and checked
against the arrays written to disk, independently of the pipeline's own bookkeeping.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nextquill_jax.config import Config, ModelRunConfig, TrainConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.assemble import RowShape, assemble_batch
from nextquill_jax.data.batch import BATCH_FIELDS, IGNORE_INDEX, OPTIONAL_FIELDS
from nextquill_jax.data.checksums import IntegrityError
from nextquill_jax.data.config import BatchingConfig, DataConfig
from nextquill_jax.data.packing import bucket_batches, bucket_of, first_fit_rows, most_per_row
from nextquill_jax.data.pipeline import BatchPipeline
from nextquill_jax.data.prepared_split import PreparedSplit, TokenizedExample, write_split
from nextquill_jax.train.setup import batching_losses, evaluation_pipeline, plan_steps

N = 150
TARGET_BASE, STRIDE = 10_000, 64


def _examples(n: int, seed: int, *, max_target: int = 30, with_dce: bool = False) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(1, max_target + 1))
        target = TARGET_BASE + i * STRIDE + np.arange(L)
        out.append(
            TokenizedExample(
                prompt_with=rng.integers(1, 1000, int(rng.integers(5, 60))).astype(np.int32),
                prompt_without=rng.integers(1, 1000, int(rng.integers(1, 20))).astype(np.int32),
                target=target.astype(np.int32),
                reference_dce=(i + np.arange(L) / 100).astype(np.float32) if with_dce else None,
            )
        )
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    examples = _examples(N, seed=0, with_dce=True)
    write_split(root, "train", examples)
    write_split(root, "long", _examples(20, seed=1, max_target=60))
    return root, examples


def _cfg(**kw) -> BatchingConfig:
    base = dict(seq_len_with=128, length_multiple=8, rows_per_batch=4, read_threads=2, prefetch_batches=3)
    return BatchingConfig(**{**base, **kw})


def _examples_in(batch: dict) -> set[int]:
    labels = batch["labels"]
    return {int(v - TARGET_BASE) // STRIDE for v in labels[labels != IGNORE_INDEX]}


def _check_batch(batch: dict, examples: list[TokenizedExample], seen: set[tuple[int, int]]) -> None:
    """Every slot against the source example: label, preceding target tokens and prompt, in both streams."""
    for key, (dtype, _) in BATCH_FIELDS.items():
        assert batch[key].dtype == np.dtype(dtype), key
    for key, (dtype, _) in OPTIONAL_FIELDS.items():
        assert key not in batch or batch[key].dtype == np.dtype(dtype), key
    B, R = batch["labels"].shape
    for b in range(B):
        for r in range(R):
            label = int(batch["labels"][b, r])
            if label == IGNORE_INDEX:
                assert batch["response_index_with"][b, r] == 0 and batch["response_index_without"][b, r] == 0
                assert batch["reference_dce"][b, r] == 0
                continue
            i, j = divmod(label - TARGET_BASE, STRIDE)
            ex = examples[i]
            assert (i, j) not in seen, f"target token {j} of example {i} appears twice"
            seen.add((i, j))
            segments = []
            for stream, prompt in (("with", ex.prompt_with), ("without", ex.prompt_without)):
                ids = batch[f"{stream}_ids"][b]
                pos = batch[f"{stream}_positions"][b]
                seg = batch[f"{stream}_segment_ids"][b]
                idx = int(batch[f"response_index_{stream}"][b, r])
                assert ids[idx + 1] == label
                np.testing.assert_array_equal(ids[idx + 1 - j : idx + 1], ex.target[:j])
                start = idx + 1 - j - len(prompt)
                np.testing.assert_array_equal(ids[start : idx + 1 - j], prompt)
                np.testing.assert_array_equal(pos[start : idx + 2], np.arange(len(prompt) + j + 1))
                assert len(set(seg[start : idx + 2].tolist())) == 1 and seg[idx] > 0
                segments.append(int(seg[idx]))
            assert segments[0] == segments[1]
            np.testing.assert_allclose(batch["reference_dce"][b, r], ex.reference_dce[j])
        for stream in ("with", "without"):
            pad = batch[f"{stream}_segment_ids"][b] == 0
            assert not batch[f"{stream}_ids"][b][pad].any() and not batch[f"{stream}_positions"][b][pad].any()


@pytest.mark.parametrize("mode", ["pack", "bucket", "random"])
def test_pairing_covers_every_target_token_once(data, mode):
    root, examples = data
    pipe = BatchPipeline(PreparedSplit(root, "train"), _cfg(mode=mode), process_index=0, process_count=1)
    seen: set[tuple[int, int]] = set()
    batches = list(pipe)
    for batch in batches:
        _check_batch(batch, examples, seen)
    assert seen == {(i, j) for i, ex in enumerate(examples) for j in range(len(ex.target))}
    if mode == "pack":
        assert len({tuple(b["with_ids"].shape) + tuple(b["labels"].shape) for b in batches}) == 1
        assert max(int(b["with_segment_ids"].max()) for b in batches) > 1  # rows really hold several examples
    else:
        assert max(int(b["with_segment_ids"].max()) for b in batches) == 1
        assert len({b["with_ids"].shape for b in batches}) > 1  # several buckets in use


@pytest.mark.parametrize("mode", ["pack", "bucket", "random"])
def test_epoch_stats_match_the_batches(data, mode):
    root, _ = data
    pipe = BatchPipeline(PreparedSplit(root, "train"), _cfg(mode=mode), process_index=0, process_count=1)
    batches = list(pipe)
    stats = pipe.epoch_stats(0)
    real = sum(int((b[f"{s}_segment_ids"] > 0).sum()) for b in batches for s in ("with", "without"))
    slots = sum(b[f"{s}_ids"].size for b in batches for s in ("with", "without"))
    assert stats.batches == len(batches) and stats.examples == N
    assert stats.shapes == len(
        {tuple(b[k].shape[1] for k in ("with_ids", "without_ids", "labels")) for b in batches}
    )
    assert stats.efficiency == pytest.approx(real / slots, abs=1e-12)
    assert stats.max_examples_per_row == max(int(b["with_segment_ids"].max()) for b in batches)
    assert stats.response_slot_use == pytest.approx(
        sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        / sum(b["labels"].size for b in batches)
    )


def test_random_batches_are_the_epoch_order_padded_to_their_longest_example(data):
    """Global batch k holds examples k*G .. k*G + G - 1 of the epoch's permutation, one per row, and each
    stream and the response slots are padded to the batch's longest, rounded up to length_multiple (8)."""
    root, examples = data
    split = PreparedSplit(root, "train")
    pipe = BatchPipeline(split, _cfg(mode="random", rows_per_batch=8), process_index=0, process_count=1)
    order = pipe.epoch_order(0)
    up = lambda n: -(-n // 8) * 8
    batches = list(pipe)
    assert len(batches) == -(-N // 8)
    spans = []
    for k, batch in enumerate(batches):
        chosen = order[8 * k : 8 * k + 8]
        rows = [_examples_in({"labels": batch["labels"][i]}) for i in range(len(chosen))]
        assert rows == [{int(i)} for i in chosen]
        exs = [examples[i] for i in chosen]
        L = [len(e.target) for e in exs]
        want = (
            up(max(len(e.prompt_with) + n for e, n in zip(exs, L, strict=True))),
            up(max(len(e.prompt_without) + n for e, n in zip(exs, L, strict=True))),
            up(max(L)),
        )
        assert (batch["with_ids"].shape[1], batch["without_ids"].shape[1], batch["labels"].shape[1]) == want
        spans.append(max(len(e.prompt_with) for e in exs) - min(len(e.prompt_with) for e in exs))
    assert max(spans) > 30  # a batch mixes short and long examples (no length grouping)


def test_first_fit_rows_respects_capacity_and_places_everything():
    rng = np.random.default_rng(3)
    need = np.stack([rng.integers(1, 50, 500), rng.integers(1, 20, 500), rng.integers(1, 10, 500)], axis=1)
    order = rng.permutation(500)
    cap = (100, 40, 20)
    rows = first_fit_rows(need, order, cap, open_rows=8)
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(500))
    for row in rows:
        assert (need[row].sum(axis=0) <= cap).all()
    with pytest.raises(ValueError, match="example"):
        first_fit_rows(need, order, (10, 40, 20), open_rows=8)


def _first_fit_statement(need, order, capacity, open_rows) -> list[list[int]]:
    """The docstring of `first_fit_rows` in plain Python: each example to the oldest open row it fits; none
    fitting with `open_rows` open, the oldest is emitted first; then the open rows, oldest first."""
    open_, done = [], []  # open: [members, free] pairs, oldest first
    for ex in order:
        row = next((r for r in open_ if all(f >= n for f, n in zip(r[1], need[ex], strict=True))), None)
        if row is None:
            if len(open_) == open_rows:
                done.append(open_.pop(0)[0])
            row = [[], list(capacity)]
            open_.append(row)
        row[0].append(int(ex))
        row[1] = [f - n for f, n in zip(row[1], need[ex], strict=True)]
    return done + [members for members, _ in open_]


@pytest.mark.parametrize("open_rows", [1, 3, 8])
def test_first_fit_rows_places_as_its_statement_says(open_rows):
    """Row for row and example for example, against `_first_fit_statement` (a valid packing that places an
    example in the newest row, or emits the newest row, passes the capacity test above)."""
    rng = np.random.default_rng(open_rows)
    need = np.stack([rng.integers(1, 50, 400), rng.integers(1, 20, 400), rng.integers(1, 10, 400)], axis=1)
    order = rng.permutation(400)
    rows = first_fit_rows(need, order, (100, 40, 20), open_rows=open_rows)
    assert [row.tolist() for row in rows] == _first_fit_statement(need, order, (100, 40, 20), open_rows)


def test_first_fit_rows_at_its_bounds_by_hand():
    """Capacity is inclusive: an example that needs a whole row is packed (alone), and two halves fill one
    row exactly. A too-big example is named by its index in `need`, not its position in `order`, and no
    open row is refused as a ValueError, not a crash inside the loop."""
    need = np.array([[5, 2, 1], [10, 4, 2], [5, 2, 1], [3, 1, 1]])
    # order 1, 0, 2, 3 with two open rows: 1 fills row A; 0 opens B; 2 fills B exactly; 3 opens C, closing A.
    rows = first_fit_rows(need, np.array([1, 0, 2, 3]), (10, 4, 2), open_rows=2)
    assert [row.tolist() for row in rows] == [[1], [0, 2], [3]]
    too_big = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 5, 1]])
    with pytest.raises(ValueError, match=r"^example 3 needs \[1, 5, 1\] but a row holds \[10, 4, 2\]$"):
        first_fit_rows(too_big, np.array([3, 0, 1, 2]), (10, 4, 2), open_rows=2)
    with pytest.raises(ValueError, match="open_rows must be >= 1, got 0"):
        first_fit_rows(need, np.arange(4), (10, 4, 2), open_rows=0)


def test_bucket_of_and_bucket_batches_against_their_statements():
    """By hand: an example that exactly fills a bucket belongs to it (capacity is inclusive), one that fits
    none gets -1; leftover partial batches come smallest bucket first, whatever order they were opened in."""
    shapes = np.array([[128, 64, 32], [256, 128, 64]])
    need = np.array([[128, 64, 32], [129, 10, 10], [256, 128, 64], [1, 1, 65], [300, 1, 1]])
    np.testing.assert_array_equal(bucket_of(need, shapes), [0, 1, 1, -1, -1])
    batches = bucket_batches(np.array([1, 0, 1, 0, 0]), np.array([0, 1, 2, 3, 4]), rows_per_batch=2)
    assert [(b, rows.tolist()) for b, rows in batches] == [(1, [0, 2]), (0, [1, 3]), (0, [4])]
    leftovers = bucket_batches(np.array([1, 0]), np.array([0, 1]), rows_per_batch=2)
    assert [(b, rows.tolist()) for b, rows in leftovers] == [(0, [1]), (1, [0])]


def test_most_per_row_bounds_every_packing():
    """Against brute force over every subset of a few examples, and against first fit in random orders."""
    rng = np.random.default_rng(5)
    cap = (40, 20, 10)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        need = np.stack([rng.integers(1, 25, n), rng.integers(1, 12, n), rng.integers(1, 6, n)], axis=1)
        bound = most_per_row(need, cap)
        fitting = (
            len(s)
            for k in range(n + 1)
            for s in itertools.combinations(range(n), k)
            if (need[list(s)].sum(axis=0) <= cap).all()
        )
        assert bound >= max(fitting)
        for open_rows in (1, n):
            assert bound >= max(len(r) for r in first_fit_rows(need, rng.permutation(n), cap, open_rows))
    # Equal examples reach the bound, set by the tightest resources (40 // 7 = 5, 20 // 3 = 6, 10 // 2 = 5).
    assert most_per_row(np.tile([7, 3, 2], (9, 1)), cap) == 5
    assert most_per_row(np.tile([7, 3, 2], (4, 1)), cap) == 4  # no more than there are examples


@pytest.mark.parametrize("mode", ["pack", "bucket", "random"])
def test_examples_per_row_bound_holds_for_every_epoch_of_an_endless_pipeline(data, mode):
    root, _ = data
    cfg = _cfg(mode=mode, num_epochs=None)
    pipe = BatchPipeline(PreparedSplit(root, "train"), cfg, process_index=0, process_count=1)
    epochs = 6
    batches = itertools.islice(pipe, sum(pipe.num_batches(e) for e in range(epochs)))
    most = max(int(b["with_segment_ids"].max()) for b in batches)  # counted from what the pipeline yields
    bound = pipe.examples_per_row_bound()
    assert most <= bound
    if mode == "pack":
        assert most > 1  # rows really hold several examples
    else:
        assert bound == 1


def test_shuffle_is_deterministic_by_seed_and_epoch(data):
    root, _ = data
    split = PreparedSplit(root, "train")
    a = BatchPipeline(split, _cfg(seed=7), process_index=0, process_count=1)
    b = BatchPipeline(split, _cfg(seed=7), process_index=0, process_count=1)
    c = BatchPipeline(split, _cfg(seed=8), process_index=0, process_count=1)
    np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    first_a, first_b = next(iter(a)), next(iter(b))
    for key in first_a:
        np.testing.assert_array_equal(first_a[key], first_b[key])


@pytest.mark.parametrize("mode", ["pack", "bucket", "random"])
def test_processes_see_disjoint_shards_whose_union_is_the_epoch(data, mode):
    root, _ = data
    split = PreparedSplit(root, "train")
    shards = [list(BatchPipeline(split, _cfg(mode=mode), process_index=p, process_count=2)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    for b0, b1 in zip(*shards, strict=True):
        assert {k: v.shape for k, v in b0.items()} == {k: v.shape for k, v in b1.items()}
    seen = [set().union(*(_examples_in(b) for b in s)) for s in shards]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N))
    # The global batch does not depend on the host count: one process with twice the rows sees the same rows.
    single = list(BatchPipeline(split, _cfg(mode=mode, rows_per_batch=8), process_index=0, process_count=1))
    for b0, b1, whole in zip(*shards, single, strict=True):
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([b0[key], b1[key]]))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("mode", ["pack", "bucket"])
def test_orbax_restore_yields_exactly_the_next_batches(data, tmp_path, mode):
    root, _ = data
    cfg = _cfg(mode=mode, rows_per_batch=8 if mode == "pack" else 24, num_epochs=3)
    pipe = BatchPipeline(PreparedSplit(root, "train"), cfg, process_index=0, process_count=1)
    assert pipe.num_batches(0) < 10  # the 10 batches below cross an epoch boundary
    it = iter(pipe.dataset())
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 5)

    fresh = BatchPipeline(PreparedSplit(root, "train"), cfg, process_index=0, process_count=1)
    it2 = iter(fresh.dataset())
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    _assert_same(_take(it2, 5), expected)


def test_get_set_state_resumes_and_rejects_other_settings(data):
    """A state saved in the first epoch or a later one (whose order another seed draws) resumes the
    uninterrupted iterator's next batches."""
    root, _ = data
    split = PreparedSplit(root, "train")
    cfg = _cfg(num_epochs=3)
    first_epoch = BatchPipeline(split, cfg, process_index=0, process_count=1).num_batches(0)
    for taken in (3, first_epoch + 2):
        it = iter(BatchPipeline(split, cfg, process_index=0, process_count=1))
        _take(it, taken)
        state = it.get_state()
        expected = list(it)
        it2 = iter(BatchPipeline(split, cfg, process_index=0, process_count=1))
        it2.set_state(state)
        _assert_same(list(it2), expected)
    other = iter(BatchPipeline(split, _cfg(num_epochs=2, seed=1), process_index=0, process_count=1))
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_an_iterator_whose_first_epoch_fails_to_start_still_closes(data, monkeypatch):
    # `close` read `_inner` before __init__ set it: an AttributeError at garbage collection, after the error.
    pipe = BatchPipeline(PreparedSplit(data[0], "train"), _cfg(), process_index=0, process_count=1)

    def fail(epoch: int) -> None:
        raise OSError("the split's files went away")

    monkeypatch.setattr(pipe, "_epoch_iterator", fail)
    with pytest.raises(OSError, match="went away") as raised:
        iter(pipe)
    tb = raised.value.__traceback__
    while tb.tb_frame.f_code.co_name != "__init__":
        tb = tb.tb_next
    tb.tb_frame.f_locals["self"].close()  # the iterator __init__ left half built


def test_a_state_resumes_the_same_batches_under_other_read_threads_and_prefetch(data):
    root, _ = data
    split = PreparedSplit(root, "train")
    uninterrupted = list(BatchPipeline(split, _cfg(num_epochs=2), process_index=0, process_count=1))
    it = iter(BatchPipeline(split, _cfg(num_epochs=2), process_index=0, process_count=1))
    _take(it, 5)
    state = it.get_state()
    for threads, prefetch in ((0, 0), (4, 1), (1, 8)):
        other = _cfg(num_epochs=2, read_threads=threads, prefetch_batches=prefetch)
        resumed = iter(BatchPipeline(split, other, process_index=0, process_count=1))
        resumed.set_state(state)
        _assert_same(list(resumed), uninterrupted[5:])


@pytest.mark.parametrize("past_an_end", [0, 1])
def test_an_endless_pipeline_changes_epoch_where_plan_steps_ends_them(data, past_an_end):
    """The epoch ends `plan_steps` gives an endless run (`num_epochs: null`) are the steps where its
    iterator's epochs end: found here from the batches themselves, an epoch ending once every example has
    appeared in it (each epoch holds every example once). Packed rows of 2 make the epochs differ in length
    (31 or 32 batches), so a plan that assumed the first epoch's length for all would be caught."""
    root, _ = data
    batching = _cfg(mode="pack", rows_per_batch=2, num_epochs=None)
    pipe = BatchPipeline(PreparedSplit(root, "train"), batching, process_index=0, process_count=1)
    seen, observed = set(), []
    for step, batch in enumerate(itertools.islice(pipe, 200), start=1):
        examples = _examples_in(batch)
        assert not examples & seen, f"step {step} repeats an example within one epoch"
        seen |= examples
        if len(seen) == N:
            observed.append(step)
            seen = set()
    assert len(set(np.diff([0, *observed]).tolist())) > 1  # epochs of different lengths
    max_steps = observed[2] + past_an_end  # the run stops at, or one step into the epoch after, an end
    cfg = Config(
        model=ModelRunConfig(preset="qwen2.5-0.5b"),
        data=DataConfig(batching=batching),
        train=TrainConfig(max_steps=max_steps),
    )
    assert plan_steps(pipe, cfg) == (max_steps, observed[:3])


def test_an_endless_plan_refuses_an_epoch_without_a_batch():
    """With drop_remainder, a later epoch's packing may fill no whole global batch: planning (and the
    iterator) would otherwise wait forever for the step that ends the run."""

    class Epochs:  # the first epoch has one batch, the second none
        def num_batches(self, epoch: int) -> int:
            return [1, 0][epoch]

    cfg = Config(
        model=ModelRunConfig(preset="qwen2.5-0.5b"),
        data=DataConfig(batching=_cfg(num_epochs=None)),
        train=TrainConfig(max_steps=5),
    )
    with pytest.raises(
        ConfigError, match=r"^epoch 1 of the training data fills no complete global batch"
    ) as e:
        plan_steps(Epochs(), cfg)
    assert str(e.value).endswith(
        "Fix: set data.batching.drop_remainder: false, or lower data.batching.rows_per_batch."
    )
    # A run that ends with the first epoch never reaches the empty one: planned, not refused.
    assert plan_steps(Epochs(), dataclasses.replace(cfg, train=TrainConfig(max_steps=1))) == (1, [1])


def test_the_drop_remainder_note_counts_the_first_epochs_examples_left_out(data):
    """Packed rows of 4 leave out a different number of examples in each shuffled epoch: the set-up note
    counts the first epoch's, found from its batches (the examples that appear in none of them)."""
    root, _ = data
    pipe = BatchPipeline(
        PreparedSplit(root, "train"),
        _cfg(mode="pack", rows_per_batch=4, num_epochs=2, drop_remainder=True),
        process_index=0,
        process_count=1,
    )
    seen = set()
    for batch in itertools.islice(pipe, pipe.num_batches(0)):
        seen |= _examples_in(batch)
    left_out = N - len(seen)
    assert left_out > 0 and pipe.epoch_stats(1).dropped_examples != left_out
    assert batching_losses({"train": pipe}) == [
        f"note: its first epoch leaves {left_out} of the {N} train examples out "
        "(data.batching.drop_remainder: its partly filled last batches)"
    ]


def test_num_epochs_and_drop_remainder(data):
    root, _ = data
    split = PreparedSplit(root, "train")
    pipe = BatchPipeline(split, _cfg(num_epochs=2), process_index=0, process_count=1)
    assert len(list(pipe)) == pipe.num_batches(0) + pipe.num_batches(1)
    for mode in ("bucket", "pack"):  # pack: a dropped row holds several examples, each counted
        dropping = BatchPipeline(
            split, _cfg(mode=mode, drop_remainder=True), process_index=0, process_count=1
        )
        batches = list(dropping)
        stats = dropping.epoch_stats(0)
        assert stats.dropped_examples > 0, mode
        assert stats.examples + stats.dropped_examples == N, mode
        assert sum(len(_examples_in(b)) for b in batches) == stats.examples, mode
        assert all((b["with_segment_ids"] > 0).any(axis=1).all() for b in batches)  # no padding rows


def test_too_long_examples_fail_or_are_truncated_and_counted(data):
    root, _ = data
    split = PreparedSplit(root, "long")
    cfg = dict(seq_len_with=64, seq_len_without=64, response_slots=40)
    stored = split.lengths("target")
    p_w = split.lengths("prompt_with")
    keep = np.minimum.reduce(
        [stored, 64 - p_w, 64 - split.lengths("prompt_without"), np.full_like(stored, 40)]
    )
    cut = int((keep < stored).sum())
    # ConfigErrors, which the CLI prints as one `error:` line (a plain ValueError was a traceback).
    with pytest.raises(ConfigError, match="too_long: truncate") as refused:
        BatchPipeline(split, _cfg(**cfg), process_index=0, process_count=1)
    assert (f"{cut} examples do not fit a row" if cut > 1 else "1 example does not fit a row") in str(
        refused.value
    )
    pipe = BatchPipeline(split, _cfg(**cfg, too_long="truncate"), process_index=0, process_count=1)
    stats = pipe.epoch_stats(0)
    assert stats.truncated_examples == cut > 0
    assert stats.truncated_tokens == int((stored - keep).sum())
    labels = np.concatenate([b["labels"].ravel() for b in pipe])
    assert (labels != IGNORE_INDEX).sum() == keep.sum()
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(split.dir))}: .* examples leave no room for a target token"
    ) as none:
        BatchPipeline(split, _cfg(seq_len_with=16, too_long="truncate"), process_index=0, process_count=1)
    assert "raise data.batching.seq_len_with" in str(none.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "stack"),
        ("seq_len_with", 0),
        ("rows_per_batch", 2.5),
        ("num_epochs", 0),
        ("too_long", "drop"),
        ("shuffle", "yes"),
        ("bucket_boundaries", [512, 256]),
        ("bucket_boundaries", [4096]),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"data.batching.{field}"):
        BatchingConfig(**{field: value})


def test_config_accepts_yaml_lists_and_derives_buckets():
    cfg = BatchingConfig(mode="bucket", seq_len_with=1024, bucket_boundaries=[256, 512])
    assert cfg.bucket_boundaries == (256, 512) and cfg.with_boundaries() == (256, 512, 1024)
    assert BatchingConfig(mode="bucket", seq_len_with=1024).with_boundaries() == (128, 256, 512, 1024)


def test_assemble_batch_refuses_an_empty_prompt_and_an_overflow_naming_the_row():
    """The pipeline refuses empty prompts before iteration (below); `assemble_batch` itself, a public
    function, refuses one too: its first target token would have no position to be predicted from."""
    example = {
        "prompt_with": np.array([5, 6], np.int32),
        "prompt_without": np.zeros(0, np.int32),
        "target": np.array([7, 8], np.int32),
        "reference_dce": np.array([0.1, 0.2], np.float32),
    }
    with pytest.raises(ValueError, match=r"^row 0 example 1: empty prompt_without; every prompt needs"):
        assemble_batch([[example]], RowShape(8, 8, 4), with_reference_dce=True)
    example["prompt_without"] = np.array([9], np.int32)
    with pytest.raises(ValueError, match=r"^row 0: examples need 4 response slots, row holds 3"):
        assemble_batch([[example, example]], RowShape(8, 8, 3), with_reference_dce=True)
    batch = assemble_batch([[example]], RowShape(8, 8, 4), with_reference_dce=True)
    np.testing.assert_array_equal(batch["without_ids"][0], [9, 7, 8, 0, 0, 0, 0, 0])
    assert batch["reference_dce"].dtype == np.float32


def _ex(prompt_with, prompt_without, target, dce) -> dict:
    return {
        "prompt_with": np.array(prompt_with, np.int32),
        "prompt_without": np.array(prompt_without, np.int32),
        "target": np.array(target, np.int32),
        "reference_dce": np.array(dce, np.float32),
    }


# Row 0: two examples (P_w 3, P_o 1, L 2; P_w 2, P_o 2, L 3), row 1: one (P_w 1, P_o 3, L 1).
_ROWS = [
    [_ex([11, 12, 13], [21], [31, 32], [0.5, 0.25]), _ex([14, 15], [22, 23], [33, 34, 35], [1.0, 2.0, 3.0])],
    [_ex([16], [24, 25, 26], [36], [4.0])],
]


def test_assemble_batch_lays_out_rows_as_its_module_states_by_hand():
    """The layout of `data/assemble.py`'s docstring, written out by hand: example k of a row has segment id
    k (from 1) and positions 0 .. P + L - 1 in each stream, right after the previous example; target token j
    is predicted from `start + P - 1 + j`; response slots are consecutive from 0; padding and unused slots
    are 0, labels IGNORE_INDEX."""
    X = IGNORE_INDEX
    batch = assemble_batch(_ROWS, RowShape(12, 10, 6), with_reference_dce=True)
    want = {
        "with_ids": [[11, 12, 13, 31, 32, 14, 15, 33, 34, 35, 0, 0], [16, 36] + [0] * 10],
        "with_positions": [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0], [0, 1] + [0] * 10],
        "with_segment_ids": [[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0], [1, 1] + [0] * 10],
        "without_ids": [[21, 31, 32, 22, 23, 33, 34, 35, 0, 0], [24, 25, 26, 36] + [0] * 6],
        "without_positions": [[0, 1, 2, 0, 1, 2, 3, 4, 0, 0], [0, 1, 2, 3] + [0] * 6],
        "without_segment_ids": [[1, 1, 1, 2, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1] + [0] * 6],
        "response_index_with": [[2, 3, 6, 7, 8, 0], [0, 0, 0, 0, 0, 0]],
        "response_index_without": [[0, 1, 4, 5, 6, 0], [2, 0, 0, 0, 0, 0]],
        "labels": [[31, 32, 33, 34, 35, X], [36, X, X, X, X, X]],
        "reference_dce": [[0.5, 0.25, 1.0, 2.0, 3.0, 0.0], [4.0, 0, 0, 0, 0, 0]],
    }
    assert sorted(batch) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)
        assert batch[key].dtype == (np.float32 if key == "reference_dce" else np.int32), key
    assert "reference_dce" not in assemble_batch(_ROWS, RowShape(12, 10, 6), with_reference_dce=False)


def test_assemble_batch_fills_a_row_exactly_and_refuses_one_token_or_slot_more():
    """Row 0 of `_ROWS` needs 10 with-stream tokens, 8 without-stream tokens and 5 response slots: that shape
    holds it exactly; one less of any is refused naming what the row's examples need."""
    row = [_ROWS[0]]
    batch = assemble_batch(row, RowShape(10, 8, 5), with_reference_dce=True)
    np.testing.assert_array_equal(batch["with_ids"][0], [11, 12, 13, 31, 32, 14, 15, 33, 34, 35])
    np.testing.assert_array_equal(batch["without_ids"][0], [21, 31, 32, 22, 23, 33, 34, 35])
    np.testing.assert_array_equal(batch["labels"][0], [31, 32, 33, 34, 35])
    for shape, message in [
        (RowShape(9, 8, 5), "row 0: examples need 10 with-stream tokens, row holds 9"),
        (RowShape(10, 7, 5), "row 0: examples need 8 without-stream tokens, row holds 7"),
        (RowShape(10, 8, 4), "row 0: examples need 5 response slots, row holds 4"),
    ]:
        with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
            assemble_batch(row, shape, with_reference_dce=True)


def test_empty_prompt_or_split_is_refused_before_iteration(tmp_path):
    # IntegrityErrors (data `data prepare` never writes), which the CLI prints as one `error:` line.
    examples = _examples(3, seed=2)
    examples[1] = TokenizedExample(examples[1].prompt_with, np.zeros(0, np.int32), examples[1].target)
    write_split(tmp_path, "train", examples)
    with pytest.raises(IntegrityError, match=r"1 example has an empty prompt_without, e\.g\. example 1") as e:
        BatchPipeline(PreparedSplit(tmp_path, "train"), _cfg(), process_index=0, process_count=1)
    assert str(e.value).endswith(
        f"Fix: prepare it again (`nextquill-jax data prepare --config FILE --out {tmp_path} --force`)."
    )
    write_split(tmp_path, "val", [])
    with pytest.raises(
        IntegrityError, match=f"^{re.escape(str(tmp_path / 'val'))}: the split holds no examples"
    ) as e:
        BatchPipeline(PreparedSplit(tmp_path, "val"), _cfg(), process_index=0, process_count=1)
    assert "Fix: prepare it again" in str(e.value)


def _lengths_split(root, name: str, lengths: list[tuple[int, int, int]]) -> PreparedSplit:
    """A split of examples with these (prompt_with, prompt_without, target) token counts."""
    examples = [
        TokenizedExample(
            prompt_with=np.full(p_w, 7, np.int32),
            prompt_without=np.full(p_o, 7, np.int32),
            target=np.arange(1, t + 1, dtype=np.int32),
        )
        for p_w, p_o, t in lengths
    ]
    write_split(root, name, examples)
    return PreparedSplit(root, name)


# Rows of (T_w=32, T_o=32, R=16): room for a target of min(32 - prompt_with, 32 - prompt_without, 16) tokens.
ROWS_32 = dict(seq_len_with=32, seq_len_without=32, response_slots=16)


def test_one_example_that_does_not_fit_is_named_in_the_singular(tmp_path):
    """Example 1 keeps min(20, 32 - 10, 32 - 5, 16) = 16 of its 20 target tokens: the only one cut, so the
    refusal counts it in the singular; truncated, it counts 1 example and 4 tokens."""
    split = _lengths_split(tmp_path, "one_cut", [(10, 5, 4), (10, 5, 20), (12, 3, 16)])
    with pytest.raises(
        ConfigError, match=r": 1 example does not fit a row \(T_w=32, T_o=32, R=16\), e\.g\. "
    ):
        BatchPipeline(split, _cfg(**ROWS_32), process_index=0, process_count=1)
    stats = BatchPipeline(
        split, _cfg(**ROWS_32, too_long="truncate"), process_index=0, process_count=1
    ).epoch_stats(0)
    assert (stats.truncated_examples, stats.truncated_tokens) == (1, 4)


@pytest.mark.parametrize("too_long", ["error", "truncate"])
def test_a_prompt_that_fills_its_row_leaves_no_room_and_is_counted_in_the_singular(tmp_path, too_long):
    """Example 1's prompt_with of 32 tokens fills T_w=32 exactly: min(3, 32 - 32, 32 - 5, 16) = 0 target
    tokens of room. Refused in either mode (truncating would keep an example with no target), as the one
    such example, in the singular ("1 examples leave" was written before)."""
    split = _lengths_split(tmp_path, "full_prompt", [(10, 5, 4), (32, 5, 3)])
    with pytest.raises(ConfigError) as refused:
        BatchPipeline(split, _cfg(**ROWS_32, too_long=too_long), process_index=0, process_count=1)
    assert (
        ": 1 example leaves no room for a target token, e.g. example 1 (prompt_with 32, prompt_without 5 "
        in (str(refused.value))
    )


def test_without_shuffle_every_epoch_is_in_stored_order(data):
    """`shuffle: false` reads the examples as stored, 0..N-1, every epoch (the order a user debugging one
    example counts on); the first global batch of random mode is then examples 0..3."""
    root, _ = data
    pipe = BatchPipeline(
        PreparedSplit(root, "train"), _cfg(mode="random", shuffle=False), process_index=0, process_count=1
    )
    for epoch in (0, 1):
        assert pipe.epoch_order(epoch).tolist() == list(range(N))
    assert _examples_in(pipe.local_batch(0, 0)) == {0, 1, 2, 3}


def test_evaluation_reads_every_example_once_in_stored_order_whatever_the_training_batching(data):
    """Training batching that shuffles, repeats 3 epochs and drops partly filled batches: evaluation batches
    the split as stored, once, its last batch of 150 % 4 = 2 examples kept (random mode: batch b holds
    examples 4b..4b+3)."""
    root, _ = data
    batching = _cfg(mode="random", shuffle=True, num_epochs=3, drop_remainder=True)
    cfg = Config(model=ModelRunConfig(preset="qwen2.5-0.5b"), data=DataConfig(batching=batching))
    pipe = evaluation_pipeline(cfg, PreparedSplit(root, "train"))
    assert pipe.epoch_order(0).tolist() == list(range(N))
    assert [_examples_in(batch) for batch in pipe] == [set(range(i, min(i + 4, N))) for i in range(0, N, 4)]


def test_pack_mode_derives_t_o_and_r_from_the_with_stream_ratio(tmp_path):
    """Pack mode sizes T_o and R by the data's proportions to a row of T_w, rounded up to length_multiple.
    Two examples of prompt_with 20, prompt_without 4, target 12 in T_w=32: the targets fit whole
    (12 <= 32 - 20), so with-stream tokens are 2 * 32 = 64, without-stream 2 * 16 = 32, targets 24:
    T_o = 32 * 32 / 64 = 16, R = 32 * 24 / 64 = 12, rounded up to 16 (multiple 8)."""
    split = _lengths_split(tmp_path, "ratio", [(20, 4, 12), (20, 4, 12)])
    pipe = BatchPipeline(split, _cfg(seq_len_with=32), process_index=0, process_count=1)
    assert [s.as_tuple() for s in pipe.shapes] == [(32, 16, 16)]

"""Grain pipeline from a `PreparedSplit` to process-local batches (the contract in `batch.py`).

Layout choice: the with-history and without-history sequences go into two separate streams, each packed into
its own fixed length (T_w, T_o), and an example's two sequences always share the same row. Separate streams
because the two forward passes are separate calls of the model anyway, and the with-history prompt is several
times longer than the without-history one: one shared length would pad the short stream heavily, while a
combined single stream would need attention masks between the two copies of a target and would double the
longest sequence. Same row because the response slots of a row can then name one position in each stream for
every target token (`assemble.py` lays this out).

Three batching modes (`BatchingConfig.mode`):
  - `pack`: examples are placed by first fit into rows of shape (T_w, T_o, R) (`packing.first_fit_rows`);
    one compiled shape for the whole run.
  - `bucket`: one example per row, padded to the smallest bucket that holds it (a few compiled shapes).
  - `random`: one example per row; a global batch is the next examples of the epoch's order (a uniform random
    sample, as the public code's sampler), padded to its longest example per stream and in response slots,
    rounded up to `length_multiple` (`packing.padded_shape`; as many compiled shapes as distinct paddings).

Order and sharding: every epoch, all processes plan the *global* epoch identically (a permutation from
(seed, epoch), then rows or buckets over integer lengths only) and cut it into global batches of
`rows_per_batch * process_count` rows; process p takes rows [p * rows_per_batch, (p + 1) * rows_per_batch)
of each global batch. So processes see disjoint examples whose union is the epoch, all processes run the
same number of steps with the same shapes (no host waits on a collective another host never enters), and
a global batch does not depend on how many hosts share it. A partly filled last batch is completed with
empty rows (segment 0, no labels), or dropped and counted with `drop_remainder`.

Examples longer than a row: with `too_long: error` (default) the pipeline refuses to start and names the
example and the fixes; with `too_long: truncate` the target's tail is cut to fit and the cut examples and
tokens are counted in `EpochStats`. Prompts are never cut here (history fitting belongs to `data prepare`).

Resuming: the iterator is a Grain `DatasetIterator`; its state is {epoch, position in the epoch, layout}
and `grain.checkpoint.CheckpointSave/CheckpointRestore` (or `get_state` / `set_state`) restore it so that
the next batch is exactly the one that would have come next. Batches are built in Grain's reader threads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.assemble import RowShape, assemble_batch
from nextquill_jax.data.checksums import IntegrityError
from nextquill_jax.data.config import BatchingConfig
from nextquill_jax.data.packing import bucket_batches, bucket_of, first_fit_rows, most_per_row, padded_shape
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.plural import counted

Batch = dict[str, np.ndarray]


def _round_up(x: float, multiple: int) -> int:
    return math.ceil(x / multiple) * multiple


@dataclass(frozen=True)
class EpochStats:
    """Token accounting of one epoch over all processes (global batches). Efficiencies are real tokens /
    token slots; `efficiency` counts both streams together."""

    epoch: int
    examples: int
    batches: int
    rows: int
    tokens_with: int
    slots_with: int
    tokens_without: int
    slots_without: int
    target_tokens: int
    slots_response: int
    truncated_examples: int
    truncated_tokens: int
    dropped_examples: int
    shapes: int  # distinct batch shapes (programs the step compiles for this epoch)
    max_examples_per_row: int  # the most examples packed into one row (segments per row; 1 unless pack)

    @property
    def efficiency_with(self) -> float:
        """Real tokens per slot of the with-history rows (0..1)."""
        return self.tokens_with / max(self.slots_with, 1)

    @property
    def efficiency_without(self) -> float:
        """Real tokens per slot of the without-history rows (0..1)."""
        return self.tokens_without / max(self.slots_without, 1)

    @property
    def efficiency(self) -> float:
        """Real tokens per slot of both rows together (0..1)."""
        return (self.tokens_with + self.tokens_without) / max(self.slots_with + self.slots_without, 1)

    @property
    def response_slot_use(self) -> float:
        """Target tokens per response slot (0..1)."""
        return self.target_tokens / max(self.slots_response, 1)


@dataclass(frozen=True)
class _EpochPlan:
    """Global batches of one epoch: (row shape, rows of example indices; len(rows) <= global rows)."""

    batches: list[tuple[RowShape, list[np.ndarray]]]
    stats: EpochStats


class BatchPipeline:
    """Batches of one `PreparedSplit` for one process.

    Args:
        split: the tokenised examples.
        cfg: the batching settings.
        process_index, process_count: this process and how many share the global batch; default
            `jax.process_index()` and `jax.process_count()`.

    Attributes:
        shapes: the row shape of every bucket (one in pack mode), smallest first.
        target_lengths: [N] int64 target tokens each example keeps (shorter than stored only when truncated).

    Raises:
        ValueError: `process_index` outside [0, `process_count`).
        IntegrityError: an empty split or an example with an empty prompt or target, which `data prepare`
            never writes (the fix: prepare the data again).
        ConfigError: an example that does not fit a row (naming it and the fixes: data.batching's lengths,
            the data's token limits, `too_long: truncate`); a split too small for one global batch with
            `drop_remainder`.
    """

    def __init__(
        self,
        split: PreparedSplit,
        cfg: BatchingConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, process_count={process_count})")
        self.split, self.cfg = split, cfg
        self.process_index, self.process_count = process_index, process_count
        self.global_rows = cfg.rows_per_batch * process_count
        self.has_reference_dce = "reference_dce" in split.fields
        # The data and config problems below are the user's to fix, so they raise errors that the CLI prints
        # as one `error:` line (`cli.expected_errors`), not a plain ValueError.
        again = split.prepare_again
        if len(split) == 0:
            raise IntegrityError(
                f"{split.dir}: the split holds no examples, and `data prepare` writes no split without "
                f"examples. {again}"
            )
        p_w = split.lengths("prompt_with")  # [N]
        p_o = split.lengths("prompt_without")  # [N]
        tgt = split.lengths("target")  # [N]
        for name, lengths in (("prompt_with", p_w), ("prompt_without", p_o), ("target", tgt)):
            empty = np.flatnonzero(lengths == 0)
            if empty.size:
                have = "has" if empty.size == 1 else "have"
                raise IntegrityError(
                    f"{split.dir}: {counted(empty.size, 'example')} {have} an empty {name}, e.g. example "
                    f"{int(empty[0])}; every prompt and target needs >= 1 token, as `data prepare` writes "
                    f"them. {again}"
                )
        self.shapes = self._resolve_shapes(p_w, p_o, tgt)
        self.target_lengths = self._fit_targets(p_w, p_o, tgt)
        L = self.target_lengths
        self._need = np.stack([p_w + L, p_o + L, L], axis=1)  # [N, 3]
        self._truncated = (int((tgt > L).sum()), int((tgt - L).sum()))
        shape_array = np.array([s.as_tuple() for s in self.shapes], dtype=np.int64)  # [S, 3]
        self._bucket = bucket_of(self._need, shape_array) if cfg.mode == "bucket" else None
        self._plans: dict[int, _EpochPlan] = {}
        if cfg.drop_remainder and self.num_batches(0) == 0:
            raise ConfigError(  # a config problem: the CLI prints it as one `error:` line
                f"{split.dir} ({counted(len(split), 'example')}) fills no complete "
                f"global batch of {self.global_rows} rows, and data.batching.drop_remainder is true, so "
                "there is nothing to train on. Fix: set data.batching.drop_remainder: false, or lower "
                f"data.batching.rows_per_batch (now {cfg.rows_per_batch})."
            )

    def _resolve_shapes(self, p_w: np.ndarray, p_o: np.ndarray, tgt: np.ndarray) -> tuple[RowShape, ...]:
        cfg = self.cfg
        L1 = np.clip(np.minimum(tgt, cfg.seq_len_with - p_w), 0, None)  # targets as far as T_w allows
        if cfg.mode == "pack":
            ratio_o = float((p_o + L1).sum()) / float((p_w + L1).sum())
            ratio_r = float(L1.sum()) / float((p_w + L1).sum())
            base_o, base_r = ratio_o * cfg.seq_len_with, ratio_r * cfg.seq_len_with
        else:
            base_o = base_r = 0.0
        t_o = cfg.seq_len_without or _round_up(max(base_o, float((p_o + L1).max())), cfg.length_multiple)
        r = cfg.response_slots or _round_up(max(base_r, float(L1.max()), 1.0), cfg.length_multiple)
        *lows, top = cfg.with_boundaries()
        return (*(RowShape(b, min(b, t_o), min(b, r)) for b in lows), RowShape(top, t_o, r))

    def _fit_targets(self, p_w: np.ndarray, p_o: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        """Target tokens kept per example under the largest row shape.

        Raises:
            ConfigError: an example with no room for a target token, or (`too_long: error`) one whose target
                does not fit, naming it and the fixes.
        """
        T_w, T_o, R = self.shapes[-1].as_tuple()
        keep = np.minimum.reduce([tgt, T_w - p_w, T_o - p_o, np.full_like(tgt, R)])  # [N]
        fixes = (
            "raise data.batching.seq_len_with / seq_len_without / response_slots, or lower the data's "
            "max_prompt_tokens / max_target_tokens and prepare again"
        )
        no_room = np.flatnonzero(keep < 1)
        if no_room.size:
            i = int(no_room[0])
            leave = "leaves" if no_room.size == 1 else "leave"
            raise ConfigError(
                f"{self.split.dir}: {counted(no_room.size, 'example')} {leave} no room for a target token, "
                f"e.g. example {i} (prompt_with {p_w[i]}, prompt_without {p_o[i]} tokens) in rows of "
                f"(T_w={T_w}, T_o={T_o}): {fixes}"
            )
        cut = np.flatnonzero(keep < tgt)
        if cut.size and self.cfg.too_long == "error":
            i = int(cut[0])
            do = "does" if cut.size == 1 else "do"
            raise ConfigError(
                f"{self.split.dir}: {counted(cut.size, 'example')} {do} not fit a row (T_w={T_w}, T_o={T_o}, "
                f"R={R}), "
                f"e.g. example {i} (prompt_with {p_w[i]}, prompt_without {p_o[i]}, target {tgt[i]} tokens): "
                f"{fixes}; or set data.batching.too_long: truncate to cut their targets (counted)"
            )
        return keep.astype(np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's example order, [N] int64: a permutation seeded by (seed, epoch), or 0..N-1."""
        n = len(self.split)
        if not self.cfg.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(n).astype(np.int64)

    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        cfg, G = self.cfg, self.global_rows
        order = self.epoch_order(epoch)
        if cfg.mode == "pack":
            rows = first_fit_rows(self._need, order, self.shapes[0].as_tuple(), cfg.open_rows)
            batches = [(self.shapes[0], rows[i : i + G]) for i in range(0, len(rows), G)]
        elif cfg.mode == "bucket":
            batches = [
                (self.shapes[b], [g[i : i + 1] for i in range(len(g))])
                for b, g in bucket_batches(self._bucket, order, G)
            ]
        else:
            batches = []
            for start in range(0, len(order), G):
                chunk = order[start : start + G]
                shape = RowShape(
                    *padded_shape(self._need[chunk], cfg.length_multiple, self.shapes[-1].as_tuple())
                )
                batches.append((shape, [chunk[i : i + 1] for i in range(len(chunk))]))
        dropped = 0
        if cfg.drop_remainder:
            dropped = sum(len(r) for _, rows in batches if len(rows) < G for r in rows)
            batches = [(s, rows) for s, rows in batches if len(rows) == G]
        used = np.concatenate([r for _, rows in batches for r in rows]) if batches else np.zeros(0, np.int64)
        need = self._need[used]  # [examples, 3]
        slots = np.array([s.as_tuple() for s, _ in batches], dtype=np.int64).reshape(-1, 3) * G
        stats = EpochStats(
            epoch=epoch,
            examples=int(used.size),
            batches=len(batches),
            rows=len(batches) * G,
            tokens_with=int(need[:, 0].sum()),
            slots_with=int(slots[:, 0].sum()),
            tokens_without=int(need[:, 1].sum()),
            slots_without=int(slots[:, 1].sum()),
            target_tokens=int(need[:, 2].sum()),
            slots_response=int(slots[:, 2].sum()),
            truncated_examples=self._truncated[0],
            truncated_tokens=self._truncated[1],
            dropped_examples=dropped,
            shapes=len({s for s, _ in batches}),
            max_examples_per_row=max((len(r) for _, rows in batches for r in rows), default=0),
        )
        plan = _EpochPlan(batches, stats)
        self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}  # keep at most two epochs
        self._plans[epoch] = plan
        return plan

    def epoch_stats(self, epoch: int) -> EpochStats:
        """Padding efficiency and counts of `epoch` (global over processes; needs no iteration)."""
        return self._plan(epoch).stats

    def examples_per_row_bound(self) -> int:
        """The most examples a row of any epoch can hold, without planning one: 1 unless `pack`; in pack mode
        the most of the split's examples that fit one row together (`packing.most_per_row`). It holds for
        every epoch because each epoch packs a permutation of the same examples (whatever its seed) into rows
        of the same shape; `epoch_stats(e).max_examples_per_row` is the count of one planned epoch."""
        if self.cfg.mode != "pack":
            return 1
        return most_per_row(self._need, self.shapes[0].as_tuple())

    def num_batches(self, epoch: int) -> int:
        """Steps in `epoch` (the same on every process)."""
        return len(self._plan(epoch).batches)

    def _local_rows(self, plan: _EpochPlan, index: int) -> list[np.ndarray]:
        """Example indices of every row of this process's part of batch `index` ([rows_per_batch] arrays;
        empty arrays are padding rows)."""
        _, rows = plan.batches[index]
        k = self.cfg.rows_per_batch
        mine = list(rows[self.process_index * k : (self.process_index + 1) * k])
        return mine + [np.zeros(0, np.int64)] * (k - len(mine))

    def local_batch(self, epoch: int, index: int) -> Batch:
        """This process's part of batch `index` of `epoch`: the dict of `batch.py`, [rows_per_batch, ...]."""
        return self._build(self._plan(epoch), index)

    def _build(self, plan: _EpochPlan, index: int) -> Batch:
        shape, _ = plan.batches[index]
        rows = [[self._example(int(i)) for i in row] for row in self._local_rows(plan, index)]
        return assemble_batch(rows, shape, with_reference_dce=self.has_reference_dce)

    def _example(self, i: int) -> dict[str, np.ndarray]:
        ex = self.split[i]
        L = int(self.target_lengths[i])
        ex["target"] = ex["target"][:L]
        if self.has_reference_dce:
            ex["reference_dce"] = ex["reference_dce"][:L]
        return ex

    def layout(self) -> dict[str, Any]:
        """What a saved iterator state must match to be restored here."""
        return {
            "num_examples": len(self.split),
            "mode": self.cfg.mode,
            "shapes": [list(s.as_tuple()) for s in self.shapes],
            "rows_per_batch": self.cfg.rows_per_batch,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "open_rows": self.cfg.open_rows,
            "drop_remainder": self.cfg.drop_remainder,
        }

    def _epoch_iterator(self, epoch: int) -> grain.DatasetIterator | None:
        if self.cfg.num_epochs is not None and epoch >= self.cfg.num_epochs:
            return None
        plan = self._plan(epoch)
        options = grain.ReadOptions(
            num_threads=self.cfg.read_threads, prefetch_buffer_size=self.cfg.prefetch_batches
        )
        ds = grain.MapDataset.range(len(plan.batches)).map(lambda k: self._build(plan, k))
        return iter(ds.to_iter_dataset(options))

    def dataset(self) -> grain.IterDataset:
        """A Grain `IterDataset` of this process's batches over `num_epochs` epochs."""
        return _EpochsDataset(self)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.dataset())


class _EpochsDataset(grain.IterDataset):
    """Epoch after epoch of a `BatchPipeline`, each a Grain `MapDataset` of batches read by threads."""

    def __init__(self, pipeline: BatchPipeline) -> None:
        super().__init__()
        self._pipeline = pipeline

    def __iter__(self) -> _EpochsIterator:
        return _EpochsIterator(self._pipeline)

    def __str__(self) -> str:
        return f"BatchPipeline({self._pipeline.split.dir}, {self._pipeline.cfg.mode})"


class _EpochsIterator(grain.DatasetIterator):
    """State: {"epoch", "epoch_iterator" (Grain's state within the epoch), "layout"}."""

    def __init__(self, pipeline: BatchPipeline) -> None:
        super().__init__()
        self._pipeline = pipeline
        self._epoch = 0
        # Set before planning epoch 0, which may raise: `close` (which Grain's __del__ calls) reads it.
        self._inner: grain.DatasetIterator | None = None
        self._inner = pipeline._epoch_iterator(0)

    def __next__(self) -> Batch:
        while self._inner is not None:
            try:
                return next(self._inner)
            except StopIteration:
                self._inner.close()
                self._epoch += 1
                self._inner = self._pipeline._epoch_iterator(self._epoch)
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "epoch_iterator": self._inner.get_state() if self._inner is not None else {},
            "layout": self._pipeline.layout(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Raises ValueError naming the first setting that differs from the one the state was saved with."""
        saved, here = state["layout"], self._pipeline.layout()
        for key in here:
            if saved.get(key) != here[key]:
                raise ValueError(
                    f"data iterator state was saved with {key}={saved.get(key)!r} but this pipeline has "
                    f"{key}={here[key]!r}; restore with the same data and data.batching settings"
                )
        if self._inner is not None:
            self._inner.close()
        self._epoch = int(state["epoch"])
        self._inner = self._pipeline._epoch_iterator(self._epoch)
        if self._inner is not None and state["epoch_iterator"]:
            self._inner.set_state(state["epoch_iterator"])

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
        super().close()

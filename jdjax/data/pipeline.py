"""Sources and grain pipelines shared by every task.

A *source* is anything with `__len__` and `get_batch(indices) -> dict[str, np.ndarray]`
(rows in the order of `indices`). Training batches come from a grain `MapDataset` in which
element `s` is this process's rows of global batch `s`: the global batch at a step depends
only on the seed and the step, never on the number of processes, so runs on 1 and on many
hosts see the same data, and the iterator state (a position) resumes exactly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grain
import numpy as np


@dataclass(frozen=True)
class ArraySource:
    """In-memory examples: a dict of arrays sharing their leading dimension."""

    arrays: dict[str, np.ndarray]

    def __post_init__(self):
        sizes = {k: len(v) for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ArraySource arrays differ in length: {sizes}.")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.arrays.items()}


@dataclass(frozen=True)
class RecordSource:
    """Random-access records (e.g. `tfds.data_source`) decoded and stacked into batches.

    Attributes:
      records: sequence of per-example dicts with `__len__` and `__getitem__(int)`.
      decode: maps one record to a dict of fixed-shape NumPy arrays.
    """

    records: object
    decode: Callable[[dict], dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(self.records)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.decode(self.records[int(i)]) for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that one process feeds."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not divide over {process_count} processes.")
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


AUGMENT_DRAWS = 8  # uniform numbers per example handed to `augment`


class _StepBatches:
    """Random access by step: element `s` is this process's rows of global batch `s`.

    Epoch `e` visits the examples in the order of permutation (seed, e); batches run on across
    epoch boundaries, so no example is dropped.
    """

    def __init__(self, source, global_batch: int, seed: int, rows: slice, augment):
        self.source, self.global_batch, self.seed, self.rows, self.augment = source, global_batch, seed, rows, augment
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        return self._perms[epoch]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        n, b = len(self.source), self.global_batch
        pos = np.arange(step * b, (step + 1) * b)[self.rows]
        epochs = pos // n
        indices = np.empty(len(pos), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            indices[sel] = self._perm(int(e))[pos[sel] % n]
        batch = self.source.get_batch(indices)
        if self.augment is None:
            return batch
        draws = np.random.default_rng([self.seed, 1 << 20, step]).random((b, AUGMENT_DRAWS))[self.rows]
        return self.augment(batch, draws)


def train_dataset(
    source,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    augment: Callable[[dict, np.ndarray], dict] | None = None,
) -> grain.MapDataset:
    """Infinite, shuffled (reshuffled every epoch) batches of this process's rows.

    Element `s` is step `s`'s batch: dict of arrays with leading dim global_batch/process_count.
    `augment(batch, draws)` gets `draws` [rows, AUGMENT_DRAWS] uniform(0, 1) numbers that depend
    only on (seed, step, global row), so an augmented global batch is the same whatever the number
    of processes.
    """
    if global_batch > len(source):
        raise ValueError(f"batch size {global_batch} exceeds the {len(source)} training examples.")
    rows = process_rows(global_batch, process_index, process_count)
    return grain.MapDataset.source(_StepBatches(source, global_batch, seed, rows, augment))


def train_iterator(
    ds: grain.MapDataset, prefetch: int = 4, threads: int = 1, to_device: Callable[[dict], dict] | None = None
) -> grain.DatasetIterator:
    """A prefetching iterator over `ds` whose `get_state`/`set_state` checkpoint its position.

    `to_device` (e.g. assembling global sharded arrays) runs in the prefetch thread, so the
    training thread receives batches already on device.
    """
    if to_device is not None:
        ds = ds.map(to_device)
    opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(opts))


def eval_batches(
    source, global_batch: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order; the last batch is padded and carries `mask`.

    Yields this process's rows of each global batch, with `mask` [local_batch] float32 (1 real,
    0 padding). All processes yield the same number of batches.
    """
    rows = process_rows(global_batch, process_index, process_count)
    n = len(source)
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)
        mask = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, 0)[rows]
        batch = source.get_batch(idx)
        batch["mask"] = mask[rows]
        yield batch


def split_indices(n: int, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """A fixed random partition of range(n) into named splits of the given fractions (sum <= 1)."""
    if sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"split fractions sum to more than 1: {fractions}.")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, frac in fractions.items():
        size = int(round(frac * n))
        out[name] = np.sort(perm[start : start + size])
        start += size
    return out

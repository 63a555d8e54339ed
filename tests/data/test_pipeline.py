"""Sources and grain pipelines (jdjax/data/pipeline.py): batching, shuffling, multi-process
slicing, resumable iterators, padded evaluation batches and fixed splits."""

import numpy as np
import pytest

from jdjax.data import pipeline
from jdjax.data.pipeline import ArraySource, RecordSource


def _source(n: int) -> ArraySource:
    """n examples: `x` is the example index, `image` a distinct [4, 4, 3] float image."""
    rng = np.random.default_rng(123)
    return ArraySource(
        {
            "x": np.arange(n, dtype=np.int32),
            "image": rng.normal(size=(n, 4, 4, 3)).astype(np.float32),
        }
    )


def _assert_batches_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- sources


def test_array_source_len_and_batch_in_index_order():
    src = _source(10)
    assert len(src) == 10
    idx = np.array([7, 2, 2, 9])
    batch = src.get_batch(idx)
    np.testing.assert_array_equal(batch["x"], idx)
    np.testing.assert_array_equal(batch["image"], src.arrays["image"][idx])
    assert batch["image"].shape == (4, 4, 4, 3)


def test_array_source_rejects_ragged_arrays():
    with pytest.raises(ValueError, match="differ in length"):
        ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


def test_record_source_decodes_and_stacks_in_index_order():
    records = [{"v": np.full((2,), i, np.uint8), "y": i} for i in range(6)]
    calls = []

    def decode(r):
        calls.append(int(r["y"]))
        return {"v": r["v"].astype(np.float32) * 2, "y": np.int32(r["y"])}

    src = RecordSource(records, decode)
    assert len(src) == 6
    batch = src.get_batch(np.array([4, 0, 3]))
    assert calls == [4, 0, 3]
    np.testing.assert_array_equal(batch["y"], [4, 0, 3])
    assert batch["y"].dtype == np.int32
    np.testing.assert_array_equal(batch["v"], [[8, 8], [0, 0], [6, 6]])
    assert batch["v"].shape == (3, 2) and batch["v"].dtype == np.float32


def test_record_source_batches_through_train_dataset():
    records = [{"y": i} for i in range(8)]
    src = RecordSource(records, lambda r: {"y": np.int32(r["y"])})
    ds = pipeline.train_dataset(src, global_batch=4, seed=0)
    epoch = np.concatenate([ds[0]["y"], ds[1]["y"]])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(8))


# ----------------------------------------------------------------------------- process rows


def test_process_rows():
    assert pipeline.process_rows(8, 0, 1) == slice(0, 8)
    assert pipeline.process_rows(8, 1, 2) == slice(4, 8)
    assert pipeline.process_rows(8, 3, 4) == slice(6, 8)
    with pytest.raises(ValueError, match="does not divide"):
        pipeline.process_rows(6, 0, 4)


# ----------------------------------------------------------------------------- train_dataset


def test_train_dataset_shapes():
    ds = pipeline.train_dataset(_source(12), global_batch=4, seed=0)
    b = ds[0]
    assert b["x"].shape == (4,)
    assert b["image"].shape == (4, 4, 4, 3)
    # The image rows belong to the same examples as the indices.
    np.testing.assert_array_equal(b["image"], _source(12).arrays["image"][b["x"]])


def test_train_dataset_deterministic_given_seed():
    a = pipeline.train_dataset(_source(12), 4, seed=7)
    b = pipeline.train_dataset(_source(12), 4, seed=7)
    c = pipeline.train_dataset(_source(12), 4, seed=8)
    steps = range(9)
    for s in steps:
        _assert_batches_equal(a[s], b[s])
    # Random access does not depend on access order.
    _assert_batches_equal(a[5], pipeline.train_dataset(_source(12), 4, seed=7)[5])
    seq_a = np.concatenate([a[s]["x"] for s in steps])
    seq_c = np.concatenate([c[s]["x"] for s in steps])
    assert not np.array_equal(seq_a, seq_c), "different seeds should give different orders"


def test_train_dataset_each_epoch_is_a_permutation_and_reshuffled():
    n, batch = 12, 4
    per_epoch = n // batch
    ds = pipeline.train_dataset(_source(n), batch, seed=3)
    epochs = []
    for e in range(4):
        order = np.concatenate([ds[e * per_epoch + i]["x"] for i in range(per_epoch)])
        np.testing.assert_array_equal(np.sort(order), np.arange(n), err_msg=f"epoch {e}")
        epochs.append(order)
    assert not np.array_equal(epochs[0], np.arange(n)), "first epoch is not shuffled"
    assert len({tuple(o) for o in epochs}) == len(epochs), "epochs should be reshuffled"


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_train_dataset_processes_concatenate_to_global_batch(process_count):
    src, global_batch, seed = _source(20), 8, 5
    single = pipeline.train_dataset(src, global_batch, seed)
    parts = [pipeline.train_dataset(src, global_batch, seed, i, process_count) for i in range(process_count)]
    for step in range(7):  # crosses epoch boundaries (20 is not a multiple of 8)
        local = [p[step] for p in parts]
        for b in local:
            assert b["x"].shape == (global_batch // process_count,)
        cat = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        _assert_batches_equal(cat, single[step])


def test_train_dataset_rejects_bad_sizes():
    with pytest.raises(ValueError, match="exceeds"):
        pipeline.train_dataset(_source(4), 8, seed=0)
    with pytest.raises(ValueError, match="does not divide"):
        pipeline.train_dataset(_source(12), 6, seed=0, process_index=0, process_count=4)


def _recording_augment(batch, draws):
    """Adds the row's first draw to the batch so the draws it received can be compared."""
    assert draws.shape == (len(batch["x"]), pipeline.AUGMENT_DRAWS)
    assert np.all((draws >= 0) & (draws < 1))
    return {**batch, "draw": draws[:, 0]}


def test_train_dataset_augment_rng_deterministic_per_step():
    src = _source(12)
    a = pipeline.train_dataset(src, 4, seed=1, augment=_recording_augment)
    b = pipeline.train_dataset(src, 4, seed=1, augment=_recording_augment)
    c = pipeline.train_dataset(src, 4, seed=2, augment=_recording_augment)
    draws_a = [float(a[s]["draw"][0]) for s in range(6)]
    # Same seed: same rng at every step, whatever the access order.
    assert [float(b[s]["draw"][0]) for s in reversed(range(6))] == draws_a[::-1]
    assert float(a[3]["draw"][0]) == draws_a[3]  # re-reading a step gives the same rng
    # Different steps get different rngs, and a different seed changes them.
    assert len(set(draws_a)) == len(draws_a)
    assert [float(c[s]["draw"][0]) for s in range(6)] != draws_a


def test_train_dataset_augment_applies_to_batch():
    from jdjax.data.images import random_shift

    src = _source(12)
    plain = pipeline.train_dataset(src, 4, seed=1)
    aug0 = pipeline.train_dataset(src, 4, seed=1, augment=random_shift(0))
    aug1 = pipeline.train_dataset(src, 4, seed=1, augment=random_shift(1))
    for s in range(3):
        _assert_batches_equal(aug0[s], plain[s])
        np.testing.assert_array_equal(aug1[s]["x"], plain[s]["x"])
        _assert_batches_equal(aug1[s], pipeline.train_dataset(src, 4, seed=1, augment=random_shift(1))[s])


def test_train_dataset_augmented_global_batch_independent_of_process_count():
    from jdjax.data.images import random_shift

    src, global_batch = _source(16), 8
    aug = random_shift(1)
    single = pipeline.train_dataset(src, global_batch, 0, augment=aug)
    parts = [pipeline.train_dataset(src, global_batch, 0, i, 2, augment=aug) for i in range(2)]
    for step in range(3):
        cat = np.concatenate([p[step]["image"] for p in parts])
        np.testing.assert_array_equal(cat, single[step]["image"])


# ----------------------------------------------------------------------------- train_iterator


@pytest.mark.parametrize("with_augment", [False, True])
def test_train_iterator_resumes_exactly(with_augment):
    from jdjax.data.images import random_shift

    def make():
        aug = random_shift(1) if with_augment else None
        return pipeline.train_dataset(_source(10), 4, seed=11, augment=aug)

    reference = pipeline.train_iterator(make(), prefetch=2)
    uninterrupted = [next(reference) for _ in range(9)]

    it = pipeline.train_iterator(make(), prefetch=2)
    first = [next(it) for _ in range(4)]
    state = it.get_state()
    for a, b in zip(first, uninterrupted[:4]):
        _assert_batches_equal(a, b)
    next(it)  # the original iterator moves on; the saved state must not

    restored = pipeline.train_iterator(make(), prefetch=2)
    restored.set_state(state)
    for a, b in zip([next(restored) for _ in range(5)], uninterrupted[4:]):
        _assert_batches_equal(a, b)


def test_train_iterator_matches_random_access():
    ds = pipeline.train_dataset(_source(10), 4, seed=2)
    it = pipeline.train_iterator(ds, prefetch=3)
    for s in range(6):
        _assert_batches_equal(next(it), ds[s])


# ----------------------------------------------------------------------------- eval_batches


@pytest.mark.parametrize("n,global_batch", [(10, 4), (8, 4), (3, 8), (1, 4)])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_cover_every_example_once(n, global_batch, process_count):
    src = _source(n)
    per_process = [list(pipeline.eval_batches(src, global_batch, i, process_count)) for i in range(process_count)]
    counts = {len(b) for b in per_process}
    assert counts == {-(-n // global_batch)}, "every process yields the same number of batches"
    local = global_batch // process_count
    real = []
    for batches in per_process:
        for b in batches:
            assert b["x"].shape == (local,) and b["image"].shape == (local, 4, 4, 3)
            assert b["mask"].shape == (local,) and b["mask"].dtype == np.float32
            assert set(np.unique(b["mask"])) <= {0.0, 1.0}
            real.append(b["x"][b["mask"] > 0])
            np.testing.assert_array_equal(b["image"], src.arrays["image"][b["x"]])
    real = np.concatenate(real)
    np.testing.assert_array_equal(np.sort(real), np.arange(n))  # union = data, each once
    assert sum(float(b["mask"].sum()) for bs in per_process for b in bs) == n


def test_eval_batches_in_order_with_padding_at_the_end():
    batches = list(pipeline.eval_batches(_source(10), 4))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:10], np.arange(10))
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
    for b in batches[:-1]:
        np.testing.assert_array_equal(b["mask"], 1)


def test_eval_batches_process_rows_concatenate_to_global():
    src = _source(10)
    single = list(pipeline.eval_batches(src, 8))
    parts = [list(pipeline.eval_batches(src, 8, i, 2)) for i in range(2)]
    for step, g in enumerate(single):
        cat = {k: np.concatenate([p[step][k] for p in parts]) for k in g}
        _assert_batches_equal(cat, g)


# ----------------------------------------------------------------------------- split_indices


def test_split_indices_disjoint_and_sized():
    n = 1000
    fr = {"train": 0.7, "val": 0.1, "test": 0.2}
    parts = pipeline.split_indices(n, fr, seed=0)
    assert list(parts) == ["train", "val", "test"]
    assert {k: len(v) for k, v in parts.items()} == {"train": 700, "val": 100, "test": 200}
    allidx = np.concatenate(list(parts.values()))
    assert len(np.unique(allidx)) == len(allidx) == n
    assert allidx.min() >= 0 and allidx.max() < n
    for v in parts.values():
        np.testing.assert_array_equal(v, np.sort(v))


def test_split_indices_partial_and_deterministic():
    a = pipeline.split_indices(50, {"a": 0.2, "b": 0.3}, seed=4)
    b = pipeline.split_indices(50, {"a": 0.2, "b": 0.3}, seed=4)
    c = pipeline.split_indices(50, {"a": 0.2, "b": 0.3}, seed=5)
    assert len(a["a"]) == 10 and len(a["b"]) == 15
    assert not set(a["a"]) & set(a["b"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["a"], c["a"])


def test_split_indices_rejects_oversized_fractions():
    with pytest.raises(ValueError, match="more than 1"):
        pipeline.split_indices(10, {"a": 0.6, "b": 0.5}, seed=0)

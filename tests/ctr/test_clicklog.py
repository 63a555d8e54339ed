"""The embedded click log: determinism, layout, splits, slice flags and the planted structure."""

import itertools

import numpy as np
import pytest

from jdjax.data import clicklog
from jdjax.metrics import ctr


@pytest.fixture(scope="module")
def small():
    return clicklog.generate("small", seed=0)


def test_deterministic_and_seeded():
    a, b, c = (clicklog.generate("tiny", seed=s) for s in (0, 0, 1))
    for k in a["train"]:
        np.testing.assert_array_equal(a["train"][k], b["train"][k])
    assert not np.array_equal(a["train"]["item"], c["train"]["item"])


def test_layout_and_flags():
    size = clicklog.SIZES["tiny"]
    log = clicklog.generate(size, seed=0)
    for split in log.values():
        hist, hist_cat = split["hist_item"], split["hist_cat"]
        assert hist.shape[1] == size.maxlen
        valid = hist != clicklog.PAD
        assert np.all(valid[:, :-1] | ~valid[:, 1:]), "padding only at the end"
        np.testing.assert_array_equal(hist_cat[valid], hist[valid] // size.items_per_category)
        np.testing.assert_array_equal(split["cat"], split["item"] // size.items_per_category)
        np.testing.assert_array_equal(split["new"], ~(hist_cat == split["cat"][:, None]).any(1))
        assert set(np.unique(split["label"])) <= {0.0, 1.0}
    assert log["train"]["repeat"].any() and log["train"]["new"].any() and log["train"]["infreq"].any()


def test_time_split_orders_impressions_and_user_split_separates_users():
    size = clicklog.SIZES["tiny"]
    log = clicklog.generate(size, seed=0, split="time")
    assert log["train"]["time"].max() < log["val"]["time"].min() <= log["val"]["time"].max() < log["test"]["time"].min()
    assert len(log["test"]["user"]) == size.num_users * size.eval_impressions
    by_user = clicklog.generate(size, seed=0, split="user")
    users = [set(by_user[s]["user"]) for s in ("train", "val", "test")]
    assert not (users[0] & users[1]) and not (users[0] & users[2]) and not (users[1] & users[2])


def test_clicked_targets_join_the_history():
    log = clicklog.generate("tiny", seed=3)
    d = log["train"]
    for u in np.unique(d["user"])[:20]:
        rows = np.flatnonzero(d["user"] == u)
        rows = rows[np.argsort(d["time"][rows])]
        for a, b in itertools.pairwise(rows):
            last = d["hist_item"][b][d["hist_item"][b] != clicklog.PAD][-1]
            if d["label"][a] == 1:
                assert last == d["item"][a]


def test_bad_arguments():
    with pytest.raises(ValueError, match="size 'huge' is unknown"):
        clicklog.generate("huge")
    with pytest.raises(ValueError, match="split must be 'time' or 'user'"):
        clicklog.generate("tiny", split="random")


def _estimates(split, world):
    """Planted-logit analogues of sum pooling, vanilla attention, KFAtt-base and KFAtt-freq, all
    with the world's true precisions: what each pooling form could reach with perfect learning."""
    p = world.planted
    hist, cat, item = split["hist_item"], split["cat"], split["item"]
    valid = hist != clicklog.PAD
    hist_cat = np.where(valid, world.item_cat[np.maximum(hist, 0)], 0)
    z = world.z[np.maximum(hist, 0)] * valid[..., None]  # [N, T, r]
    prec = world.precision[cat[:, None], hist_cat] * valid
    n = ((hist_cat[:, :, None] == hist_cat[:, None, :]) & valid[:, None, :]).sum(-1)  # clicks of each click's category
    per_click = np.where(prec > 0, 1.0 / (1.0 / np.maximum(prec, 1e-12) + p.random_var), 0.0)
    capped = np.where(prec > 0, 1.0 / (1.0 / np.maximum(prec, 1e-12) + p.random_var / np.maximum(n, 1)), 0.0) / np.maximum(n, 1)
    prior = world.pref[cat]

    def with_prior(w):
        return (p.prior_precision * prior + np.einsum("nt,ntr->nr", w, z)) / (p.prior_precision + w.sum(1))[:, None]

    vanilla_w = per_click + 1e-3 * valid
    estimates = {
        "sum": z.sum(1) / np.maximum(valid.sum(1), 1)[:, None],
        "vanilla": np.einsum("nt,ntr->nr", vanilla_w, z) / vanilla_w.sum(1)[:, None],
        "base": with_prior(per_click),
        "freq": with_prior(capped),
    }
    return {k: p.alpha * np.einsum("nr,nr->n", world.z[item], v) + world.cat_bias[cat] for k, v in estimates.items()}


def test_planted_structure_favours_the_prior_on_new_and_capping_on_repeat(small):
    world = clicklog.make_world("small", seed=0)
    test = small["test"]
    logits = _estimates(test, world)
    np.testing.assert_allclose(logits["freq"] + world.planted.bias, test["oracle_logit"], atol=1e-4)
    y = test["label"]

    def auc(name, flag=None):
        sel = np.ones(len(y), bool) if flag is None else test[flag]
        return ctr.auc(y[sel], logits[name][sel])

    assert auc("freq") > auc("base") > auc("vanilla") > auc("sum")
    assert auc("base", "new") > auc("vanilla", "new") + 0.05  # the prior carries the 'new' slice
    assert auc("freq", "repeat") > auc("base", "repeat") + 0.01  # capping carries the 'repeat' slice


# ---------------------------------------------------------------------------------------------
# Multi-scene files: every label and dense cell is a finite number, named by file:row:column.

SCENE_HEADER = ["label", "scene", "user", "item", "price"]


def _scene_rows(n, seed):
    rng = np.random.default_rng(seed)
    return [[str(rng.integers(0, 2)), str(rng.choice(["home", "cart"])), str(rng.integers(0, 5)),
             f"i{rng.integers(0, 6)}", f"{rng.random():.3f}"] for _ in range(n)]


def _write_scene_csvs(directory, rows_per_split=24, edit=None):
    """train/val/test CSV files; `edit` = (split, row index, column, text) replaces one cell."""
    for k, split in enumerate(("train", "val", "test")):
        rows = _scene_rows(rows_per_split, k)
        rows[0][0], rows[1][0] = "0", "1"  # both classes in every split
        if edit and edit[0] == split:
            rows[edit[1]][SCENE_HEADER.index(edit[2])] = edit[3]
        lines = [",".join(SCENE_HEADER)] + [",".join(r) for r in rows]
        (directory / f"{split}.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "split, column, text, shown",
    [
        ("test", "price", "nan", "'nan'"),
        ("test", "price", "inf", "'inf'"),
        ("train", "price", "-Infinity", "'-Infinity'"),
        ("val", "price", "", "an empty cell"),
        ("test", "price", "1e39", "'1e39'"),  # beyond float32: inf once converted
        ("train", "price", "n/a", "'n/a'"),
        ("test", "label", "nan", "'nan'"),
        ("train", "label", "", "an empty cell"),
    ],
)
def test_scene_files_name_the_cell_that_is_not_a_finite_number(tmp_path, split, column, text, shown):
    _write_scene_csvs(tmp_path, edit=(split, 4, column, text))  # data row 4 is line 6 (header = line 1)
    with pytest.raises(ValueError) as info:
        clicklog.load_scene_files(str(tmp_path), 4, dense=("price",))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / (split + '.csv')}:6:{column}: not a finite number ({shown})"), message
    assert "np.str_" not in message and "could not convert" not in message


def test_scene_files_label_must_be_0_or_1(tmp_path):
    _write_scene_csvs(tmp_path, edit=("val", 2, "label", "2"))
    with pytest.raises(ValueError, match=r"val\.csv:4:label: a label must be 0 or 1, got '2'"):
        clicklog.load_scene_files(str(tmp_path), 4, dense=("price",))


def test_scene_files_parquet_nan_and_null(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    for k, split in enumerate(("train", "val", "test")):
        rows = _scene_rows(10, k)
        cols = {h: [r[i] for r in rows] for i, h in enumerate(SCENE_HEADER)}
        cols["label"] = [float(v) for v in cols["label"]]
        cols["price"] = [float(v) for v in cols["price"]]
        if split == "test":
            cols["price"][3] = float("nan")
        if split == "val":
            cols["price"][7] = None  # a Parquet null
        pq.write_table(pa.table(cols), str(tmp_path / f"{split}.parquet"))
    with pytest.raises(ValueError, match=r"val\.parquet:7:price: not a finite number \(nan\)"):  # 0-based row
        clicklog.load_scene_files(str(tmp_path), 4, dense=("price",))
    table = pq.read_table(str(tmp_path / "val.parquet")).to_pydict()
    table["price"][7] = 0.5
    pq.write_table(pa.table(table), str(tmp_path / "val.parquet"))
    with pytest.raises(ValueError, match=r"test\.parquet:3:price: not a finite number \(nan\)"):
        clicklog.load_scene_files(str(tmp_path), 4, dense=("price",))


def test_nan_in_the_test_file_exits_2_and_writes_nothing(tmp_path):
    """The reported failure: a NaN dense value in test.csv used to give exit 0, NaN logloss and a bare
    NaN in results.json."""
    from jdjax import testing

    data = tmp_path / "data"
    data.mkdir()
    _write_scene_csvs(data, edit=("test", 9, "price", "NaN"))
    workdir = tmp_path / "run"
    proc = testing.run_main("configs/dadnn.py:smoke", str(workdir), "--config.data.name=scene_files",
                            f"--config.data.data_dir={data}", "--config.data.dense_columns=price")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{data / 'test.csv'}:11:price: not a finite number ('NaN')" in proc.stderr
    assert not workdir.exists()

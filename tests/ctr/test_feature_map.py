"""Feature maps on real inputs: raw ids -> rows across data directories, refusing a map built from
other data, a trained out-of-vocabulary row, and non-finite dense values."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.data.features import FeatureMap
from jdjax.nn import ctr
from jdjax.nn.ctr.features import NUM_SPECIAL_IDS, OOV_ID, PAD_ID

FEATURES = (
    ctr.SparseFeat("item", 4),
    ctr.VarLenFeat("hist_item", maxlen=3, embedding_dim=4, embedding_name="item", pad_value=-1),
)


def _directory(asins, seed):
    """An Amazon-like reader's output for one data directory: asins coded by their sorted order
    (codes differ between directories), the sorted asins as id_names."""
    names = np.array(sorted(asins))
    rng = np.random.default_rng(seed)
    items = rng.choice(names, 200)
    hist = rng.choice(np.r_[names, ["<pad>"] * 3], (200, 3))
    code = {a: i for i, a in enumerate(names)}
    columns = {"item": np.array([code[a] for a in items], np.int32),
               "hist_item": np.array([[code.get(a, -1) for a in row] for row in hist], np.int32)}
    return columns, {"item": names}, items


def test_one_new_asin_does_not_shift_the_rows_of_the_others():
    """The reported failure: the map stored per-directory ranks, so one new asin in another directory
    sent every later item to another item's row. Rows now follow the raw asin."""
    asins = [f"B00{i:03d}" for i in range(10)]
    cols_a, names_a, items_a = _directory(asins, 0)
    cols_b, names_b, items_b = _directory(["B00000A"] + asins, 1)  # sorts second: every later code shifts
    fmap = FeatureMap.fit(FEATURES, cols_a, id_names=names_a)
    np.testing.assert_array_equal(fmap.vocabularies["item"], asins)  # raw ids, not codes
    enc_a = fmap.encode(cols_a, id_names=names_a)["item"]
    enc_b = fmap.encode(cols_b, id_names=names_b)["item"]
    row_of = {a: i + NUM_SPECIAL_IDS for i, a in enumerate(asins)}
    np.testing.assert_array_equal(enc_a, [row_of[a] for a in items_a])
    np.testing.assert_array_equal(enc_b, [row_of.get(a, OOV_ID) for a in items_b])  # the new asin: OOV
    hist = fmap.encode(cols_a, id_names=names_a)["hist_item"]
    assert (hist[cols_a["hist_item"] == -1] == PAD_ID).all()
    # the same rows as a map fitted on the raw strings themselves (pads as "")
    strings = (FEATURES[0], ctr.VarLenFeat("hist_item", 3, 4, embedding_name="item", pad_value=""))
    hist_raw = np.where(cols_a["hist_item"] >= 0, names_a["item"][np.maximum(cols_a["hist_item"], 0)], "")
    raw = FeatureMap.fit(strings, {"item": items_a, "hist_item": hist_raw})
    assert raw.fingerprint() == fmap.fingerprint()
    np.testing.assert_array_equal(raw.encode({"item": items_a, "hist_item": hist_raw})["hist_item"], hist)


def test_a_map_from_other_data_is_refused(tmp_path):
    asins = [f"B00{i:03d}" for i in range(10)]
    cols_a, names_a, _ = _directory(asins, 0)
    cols_b, names_b, _ = _directory(["B00000A"] + asins, 1)
    path = tmp_path / "feature_map.json"
    FeatureMap.fit(FEATURES, cols_a, id_names=names_a).save(str(path))
    before = path.read_bytes()
    fmap = FeatureMap.load(str(path))
    fmap.check_data(FEATURES, cols_a, str(path), id_names=names_a)  # its own data: fine
    with pytest.raises(ValueError) as info:
        fmap.check_data(FEATURES, cols_b, str(path), data="data.data_dir='/data/b'", id_names=names_b)
    message = str(info.value)
    assert message.startswith(f"{path} (fingerprint ") and "data.data_dir='/data/b'" in message
    assert "table 'item': 1 of the data's 11 known ids are not in the map" in message
    assert "Leave --config.data.feature_map empty" in message
    with pytest.raises(ValueError, match="feature declarations differ.*embedding_dim=8"):
        fmap.check_data((ctr.SparseFeat("item", 8), FEATURES[1]), cols_a, str(path), id_names=names_a)
    with pytest.raises(ValueError, match="holds str ids in the map, int ids in the data"):
        fmap.check_data(FEATURES, cols_a, str(path))  # codes without their names
    assert path.read_bytes() == before


def test_old_edited_or_non_strict_maps_are_refused(tmp_path):
    cols, names, _ = _directory([f"B{i}" for i in range(5)], 0)
    path = tmp_path / "feature_map.json"
    FeatureMap.fit(FEATURES, cols, id_names=names).save(str(path))
    saved = json.loads(path.read_text())
    assert saved["vocabularies"]["item"]["id_type"] == "str" and "row k + 2" in saved["rows"]
    edited = dict(saved, vocabularies={"item": {"id_type": "str", "ids": ["B0", "B2", "B1", "B3", "B4"]}})
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="do not match its fingerprint.*rebuild"):
        FeatureMap.load(str(path))
    path.write_text(json.dumps({**saved, "version": 1}))
    with pytest.raises(ValueError, match="version 1 .*per-directory codes"):
        FeatureMap.load(str(path))


def test_missing_ids_and_bad_codes_are_named():
    with pytest.raises(ValueError, match="'item' holds 1 missing ids"):
        FeatureMap.fit(FEATURES[:1], {"item": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match=r"codes must be in 0\.\.1"):
        FeatureMap.fit(FEATURES[:1], {"item": np.array([0, 2])}, id_names={"item": np.array(["a", "b"])})


def test_training_encodes_a_fixed_fraction_as_out_of_vocabulary():
    rng = np.random.default_rng(0)
    train = {"item": rng.integers(0, 50, 20000), "hist_item": np.where(rng.random((20000, 3)) < 0.3, -1,
                                                                        rng.integers(0, 50, (20000, 3)))}
    fmap = FeatureMap.fit(FEATURES, train, oov_rate=0.05)
    plain = fmap.encode(train)
    assert (plain["item"] != OOV_ID).all()  # every training id is known: without oov_rate row 1 never trains
    enc = fmap.encode(train, train=True, seed=3)
    assert abs((enc["item"] == OOV_ID).mean() - 0.05) < 0.01
    pad = train["hist_item"] == -1
    assert (enc["hist_item"][pad] == PAD_ID).all() and abs((enc["hist_item"][~pad] == OOV_ID).mean() - 0.05) < 0.01
    kept = enc["item"] != OOV_ID
    np.testing.assert_array_equal(enc["item"][kept], plain["item"][kept])
    np.testing.assert_array_equal(fmap.encode(train, train=True, seed=3)["item"], enc["item"])  # seeded
    off = FeatureMap.fit(FEATURES, train, oov_rate=0.0)
    np.testing.assert_array_equal(off.encode(train, train=True)["item"], plain["item"])
    with pytest.raises(ValueError, match=r"oov_rate must be in \[0, 1\)"):
        FeatureMap.fit(FEATURES, train, oov_rate=1.0)


def test_the_ctr_task_trains_the_oov_row_that_unseen_test_ads_read():
    """CSCNN's val/test ads are all unseen: they read row 1 of the ad table, which now gets gradient."""
    from configs import cscnn as cscnn_config
    from jdjax.tasks import ctr as ctr_task

    cfg = cscnn_config.get_config("smoke")
    task = ctr_task.build(cfg)
    test = task.eval_sources["test"].get_batch(np.arange(len(task.eval_sources["test"])))
    assert (test["ad"] == OOV_ID).all()
    train = task.train_source.get_batch(np.arange(len(task.train_source)))
    oov = np.flatnonzero(train["ad"] == OOV_ID)
    assert 0.005 < len(oov) / len(train["ad"]) < 0.02
    batch = {k: jnp.asarray(v) for k, v in task.train_source.get_batch(oov[:8]).items()}
    # Compiled, not op by op (the CNN tower's init and gradient are this test's cost).
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, jax.jit(task.init)(jax.random.key(0)),
                          is_leaf=lambda x: hasattr(x, "value"))
    grads = jax.jit(jax.grad(lambda p: task.loss(p, batch, jax.random.key(1))[0]))(params)
    assert float(jnp.abs(grads["embeddings"]["ad"][OOV_ID]).sum()) > 0


def test_non_finite_dense_values_are_named_by_encode():
    fmap = FeatureMap.fit((ctr.DenseFeat("price"),), {})
    np.testing.assert_array_equal(fmap.encode({"price": np.array([1.0, 2.0])})["price"], [[1.0], [2.0]])
    for bad in (np.nan, np.inf, 1e39):
        with pytest.raises(ValueError, match=r"dense feature 'price': example 1 \(0-based\) is not a finite float32"):
            fmap.encode({"price": np.array([1.0, bad])})


def _scene_csvs(directory, items):
    rng = np.random.default_rng(0)
    directory.mkdir()
    for split in ("train", "val", "test"):
        rows = [f"{i % 2},{rng.choice(['home', 'cart'])},{rng.integers(0, 5)},{items[i % len(items)]}" for i in range(30)]
        (directory / f"{split}.csv").write_text("\n".join(["label,scene,user,item", *rows]) + "\n")


def test_the_task_refuses_a_map_of_another_directory_and_writes_nothing(tmp_path):
    from configs import dadnn as dadnn_config
    from jdjax import tasks as jtasks
    from jdjax.data import clicklog

    items = [f"B{i:03d}" for i in range(8)]
    _scene_csvs(tmp_path / "a", items)
    _scene_csvs(tmp_path / "b", ["B000A", *items])  # one new item
    features, splits = clicklog.load_scene_files(str(tmp_path / "a"), 8)
    path = tmp_path / "feature_map.json"
    FeatureMap.fit(features, splits["train"]).save(str(path))
    cfg = dadnn_config.get_config("smoke")
    cfg.data.name, cfg.data.data_dir, cfg.data.feature_map = "scene_files", str(tmp_path / "b"), str(path)
    workdir = tmp_path / "run"
    with pytest.raises(jtasks.UsageError) as info:
        jtasks.run(cfg, str(workdir))
    message = str(info.value)
    assert message.startswith(f"{path} (fingerprint") and f"data.data_dir={str(tmp_path / 'b')!r}" in message
    assert "table 'item': 1 of the data's 9 known ids are not in the map" in message
    assert not workdir.exists()

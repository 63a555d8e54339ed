"""The CTR task on the generic loop: a smoke run, metrics, validation, and row-sharded tables on
8 devices predicting exactly what 1 device predicts."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import dadnn as dadnn_config
from configs import kfatt as kfatt_config
from jdjax import tasks as jtasks
from jdjax.data.features import FeatureMap
from jdjax.tasks import ctr
from jdjax.train import loop
from jdjax.train import sharding as shd
from jdjax.train.checkpoint import read_state


def smoke(**overrides):
    cfg = kfatt_config.get_config("smoke")
    cfg.checkpoint.async_save = False
    cfg.logging.tensorboard = False
    cfg.update_from_flattened_dict(overrides)
    return cfg


def test_smoke_run_reports_auc_gauc_logloss_and_slices(tmp_path):
    cfg = smoke(num_train_steps=20, eval_every_steps=10)
    results = loop.train_and_evaluate(cfg, str(tmp_path), ctr.build(cfg))
    assert results["status"] == "completed" and results["selected_by"] == "val/auc"
    for key in ("test/auc", "test/gauc", "test/logloss", "test/new/auc", "test/repeat/count", "test/infreq/logloss"):
        assert key in results
    assert 0.0 <= results["test/auc"] <= 1.0 and np.isfinite(results["test/logloss"])
    fmap = FeatureMap.load(os.path.join(tmp_path, "feature_map.json"))
    assert [t.name for t in fmap.tables()] == ["user", "item", "cat"]


def test_dice_trains_its_running_averages_and_predicts_per_example(tmp_path):
    """DIN with Dice: the task carries 'batch_stats', training moves them, eval reads them (one example's
    probability does not depend on its batch). The multi-scene models refuse Dice."""
    cfg = smoke(**{"model.name": "din", "model.activation": "dice", "num_train_steps": 10, "eval_every_steps": 10,
                   "checkpoint.every_steps": 10})
    assert jtasks.validate(cfg) == []
    task = ctr.build(cfg)
    init = jax.jit(task.init_model_state)(jax.random.key(0))  # compiled: op by op is this test's slowest part
    assert set(init) == {"batch_stats"}
    results = loop.train_and_evaluate(cfg, str(tmp_path), task)
    assert results["status"] == "completed" and 0.0 <= results["test/auc"] <= 1.0
    state = read_state(str(tmp_path))
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), state["model_state"], init)
    assert all(jax.tree.leaves(moved)), moved  # every running mean and variance
    batch = task.eval_sources["test"].get_batch(np.arange(8))
    predict = jax.jit(task.predict)
    full = predict(state["params"], state["model_state"], batch)["prob"]
    # Example 3 among 7 copies of itself (a batch with other statistics, zero variance; the same
    # shape, so one compile): its probability is the one it has in the mixed batch.
    alone = predict(state["params"], state["model_state"], jax.tree.map(lambda v: np.repeat(v[3:4], 8, 0), batch))["prob"]
    np.testing.assert_allclose(alone, np.full(8, full[3]), rtol=1e-5, atol=1e-6)
    scenes = dadnn_config.get_config("smoke")
    scenes.model.activation = "dice"
    assert any("not supported by the multi-scene models" in e for e in jtasks.validate(scenes))


def test_summarize_per_slice():
    out = {
        "prob": np.array([0.9, 0.2, 0.7, 0.4, 0.6, 0.1]),
        "label": np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
        "group": np.array([0, 0, 1, 1, 2, 2]),
        "new": np.array([True, True, True, True, False, False]),
    }
    m = ctr.summarize(out)
    assert m["auc"] == pytest.approx(7 / 9)
    assert m["gauc"] == pytest.approx((2 * 1.0 + 2 * 0.0 + 2 * 1.0) / 6)
    assert m["new/auc"] == pytest.approx(0.75) and m["new/count"] == 4
    assert "repeat/auc" not in m


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.name": "dien"}, "model.name='dien' is not a CTR model"),
        ({"model.name": "dadnn_mlp"}, "needs data.name in ('scenes', 'scene_files')"),
        ({"model.activation": "gelu"}, "model.activation='gelu' is not supported by the CTR task"),
        ({"data.name": "amazon"}, "needs --config.data.data_dir"),
        ({"data.size": "huge"}, "data.size='huge' is unknown"),
        ({"model.prior": "flat"}, "model.prior must be 'learned' or 'unit'"),
    ],
)
def test_invalid_configs_are_named(overrides, message):
    errors = jtasks.validate(smoke(**overrides))
    assert any(message in e for e in errors), errors


def test_uneven_table_sharding_is_reported():
    cfg = smoke(**{"sharding_rules": "tensor_parallel", "mesh.data": -1, "mesh.model": 8, "model.table_row_multiple": 3})
    with pytest.raises(jtasks.UsageError, match="cannot be split evenly.*table_row_multiple"):
        jtasks.run(cfg, "/nonexistent/never-written")


def test_row_sharded_tables_on_8_devices_predict_like_1_device():
    cfg = smoke()
    task = ctr.build(cfg)
    rules = shd.rules_from_config("tensor_parallel")
    params = nn.meta.unbox(jax.jit(task.init)(jax.random.key(0)))

    def predictions(mesh):
        with nn.logical_axis_rules(rules):
            shardings = shd.logical_shardings(jax.eval_shape(task.init, jax.random.key(0)), mesh, rules)
        placed = shd.put_global(jax.tree.map(np.asarray, params), shardings)
        step = jax.jit(task.predict, in_shardings=(shardings, shd.batch_sharding(mesh)), out_shardings=shd.batch_sharding(mesh))
        seen = {}
        metrics = loop.evaluate(step, placed, task.eval_sources["test"], 64, mesh, lambda out: seen.update(out) or ctr.summarize(out))
        return placed, seen, metrics

    one = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = shd.make_mesh({"data": 1, "model": 8})
    placed, out8, m8 = predictions(eight)
    table = placed["embeddings"]["item"]
    assert table.sharding.spec == PartitionSpec("model", None)
    assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 8
    _, out1, m1 = predictions(one)
    np.testing.assert_allclose(out8["prob"], out1["prob"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out8["label"], out1["label"])
    assert m8["auc"] == pytest.approx(m1["auc"], abs=1e-6)


def test_compare_aggregates_finished_runs(tmp_path):
    """Finished runs (results.json present) are not retrained; the table holds mean and std over seeds."""
    aucs = {"sum": [0.70, 0.72], "kfatt_base": [0.80, 0.84]}
    for model, values in aucs.items():
        for seed, auc in enumerate(values):
            run = tmp_path / model / f"seed{seed}"
            run.mkdir(parents=True)
            slices = {"test/new/auc": 0.6} if model == "sum" else {}
            (run / "results.json").write_text(json.dumps({"status": "completed", "test/auc": auc, "test/gauc": auc - 0.1, "test/logloss": 0.5, **slices}))
    table = ctr.compare(smoke(), str(tmp_path), models=["sum", "kfatt_base"], seeds=[0, 1])
    base, ours = table["rows"]
    assert base["model"] == "sum" and base["relaimpr"] == 0.0
    assert ours["test/auc_mean"] == pytest.approx(0.82) and ours["test/auc_std"] == pytest.approx(np.std([0.8, 0.84], ddof=1))
    assert ours["relaimpr"] == pytest.approx((0.82 - 0.5) / (0.71 - 0.5) - 1)
    assert base["test/new/auc_mean"] == pytest.approx(0.6) and np.isnan(ours["test/new/auc_mean"])  # missing
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["rows"][1]["model"] == "kfatt_base"
    md = (tmp_path / "compare.md").read_text()
    assert "| kfatt_base | 0.8200 ± 0.0283 |" in md
    with pytest.raises(jtasks.UsageError, match="unknown models"):
        ctr.compare(smoke(), str(tmp_path), models=["dien"], seeds=[0])

"""SCPNet task: the train step's epoch switches and memory bank, config checks, and the embedded recipe end to end."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from jdjax import cli, tasks
from jdjax.data import multilabel
from jdjax.models import scpnet as scp
from jdjax.tasks import scpnet
from jdjax.train.loop import stateful_functions
from jdjax.train.optim import path_names
from jdjax.train.validation import UsageError


def smoke(*overrides):
    return cli.load_config("configs/scpnet.py:smoke", *overrides)


@pytest.fixture(scope="module")
def data():
    return scpnet.load_data(smoke().data)


def _task(config, data, method="scpnet"):
    relation = scpnet.relation_matrix(config, data, None)
    return scpnet.transfer_task(config, method, "", data, relation)


def _variables(task):
    """(params, model_state) of a fresh task, unboxed. The params are noise in the shapes task.init traces
    (scales around 1, the rest N(0, 0.2^2)): none of these tests depends on init's values, and compiling
    init's ~90 random initializers (threefry) takes about a minute on two cores, eagerly or under jit. The
    model state (BatchNorm statistics, the PESSL bank and step) is the task's own, jitted: XLA drops the
    unused parameter initializers, so it compiles in about a second."""
    shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    rng = np.random.default_rng(0)

    def fill(name, s):
        v = 0.2 * rng.normal(size=s.shape)
        return jnp.asarray(1.0 + v if name.endswith("/scale") else v, s.dtype)

    params = jax.tree.map(fill, path_names(shapes), shapes)
    return params, nn.meta.unbox(jax.jit(task.init_model_state)(jax.random.key(0)))


def _batch(task, config, rows):
    raw = task.train_source.get_batch(np.asarray(rows))
    draws = np.random.default_rng(0).uniform(size=(len(rows), 8))
    return jax.tree.map(jnp.asarray, task.augment(raw, draws))


@pytest.fixture(scope="module")
def single_view(data):
    """method -> (config, task, variables, the first batch without the weak/strong views, the jitted loss),
    built once per module: the single-view test and the BCE test share one compiled loss."""
    cache = {}

    def get(method):
        if method not in cache:
            config = smoke()
            task = _task(config, data, method)
            batch = _batch(task, config, np.arange(config.batch_size))
            without_views = {k: v for k, v in batch.items() if k not in ("image_w", "image_s")}
            cache[method] = (config, task, _variables(task), without_views, jax.jit(stateful_functions(task)[1]))
        return cache[method]

    return get


@pytest.mark.slow  # about 30 s: compiles the three-view SCPNet train step
def test_train_step_switches_splc_and_batchnorm_at_their_epochs_and_fills_the_bank(data):
    config = smoke()
    task = _task(config, data)
    per_epoch = scpnet.steps_per_epoch(config, len(data.splits["train"]))
    params, state = _variables(task)
    rows = np.arange(config.batch_size)
    batch = _batch(task, config, rows)
    loss = jax.jit(task.loss)

    # Epoch 0: BatchNorm on its running statistics (unchanged), the bank gets the batch's pseudo labels.
    total, metrics, new = loss(params, state, batch, jax.random.key(1))
    assert np.isfinite(float(total))
    assert int(new["pessl"]["step"]) == 1
    for a, b in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(new["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bank = np.asarray(new["pessl"]["bank"])
    assert bank.shape == (len(data.splits["train"]), len(data.class_names))
    assert not bank[config.batch_size:].any()  # only the batch's rows are written
    observed = np.asarray(batch["annotations"]) > 0
    assert bank[rows][observed].all()  # the observed positive is always in the pseudo-label set

    # Epoch 1: BatchNorm statistics move, SPLC may relabel (the loss differs from the epoch-0 loss).
    later = {**new, "pessl": {**new["pessl"], "step": jnp.int32(per_epoch)}}
    total1, _, new1 = loss(params, later, batch, jax.random.key(1))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(later["batch_stats"]), jax.tree.leaves(new1["batch_stats"]))]
    assert all(moved)
    assert np.isfinite(float(total1))


@pytest.mark.parametrize("method", ["no_pessl", "assume_negative"])
def test_single_view_methods_use_the_weak_view_only(single_view, method):
    _, _, variables, without_views, loss = single_view(method)
    total, _, new = loss(*variables, without_views, jax.random.key(1))
    assert np.isfinite(float(total))
    assert not np.asarray(new["pessl"]["bank"]).any()


def test_assume_negative_is_plain_bce_on_the_observed_positives(data, single_view):
    # The compiled loss of the single-view test (the batch without the weak/strong views, which the
    # single-view methods never read; that test checks it); logits from an independently built model.
    config, _, (params, state), batch, loss = single_view("assume_negative")
    total, _, _ = loss(params, state, batch, jax.random.key(1))
    model = scpnet.build_model(config, scpnet.METHODS["assume_negative"],
                               scpnet.make_tokenizer(config.data, data, config.model.ctx_init), data.class_names,
                               np.eye(len(data.class_names), dtype=np.float32))
    apply = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
    logits = np.asarray(apply({"params": params, "batch_stats": state["batch_stats"]}, batch["image"]), np.float64)
    y = np.asarray(batch["annotations"]) > 0
    bce = -(y * np.log(1 / (1 + np.exp(-logits))) + (1 - y) * np.log(1 / (1 + np.exp(logits)))).sum()
    np.testing.assert_allclose(float(total), bce, rtol=1e-4)


def test_unobserved_entries_can_be_kept_out_of_the_gcn_gradient(data):
    """scpnet.gcn_from_unobserved=False: with no label observed, the supervised loss still trains the
    image tower (every entry is a negative by assumption) but gives the GCN no gradient at all."""
    config = smoke("--config.scpnet.gcn_from_unobserved=False")
    task = _task(config, data, "no_pessl")
    params, state = _variables(task)
    batch = _batch(task, config, np.arange(config.batch_size))
    batch["annotations"] = jnp.zeros_like(batch["annotations"])
    grads = jax.jit(jax.grad(lambda p: task.loss(p, state, batch, jax.random.key(1))[0]))(params)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["gcn"]))
    assert np.abs(np.asarray(grads["visual"]["attnpool"]["c_proj"]["kernel"])).max() > 0


def test_no_prior_uses_identity_matrices_and_the_prior_is_row_stochastic(data):
    config = smoke()
    relation = scpnet.relation_matrix(config, data, None)
    np.testing.assert_allclose(relation, relation.T, atol=1e-6)
    g, s = scpnet.prior_matrices(config, relation, scpnet.METHODS["scpnet"])
    np.testing.assert_allclose(g.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(s.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(np.diag(g), 1 - config.scpnet.reweight_p, atol=1e-6)
    g0, s0 = scpnet.prior_matrices(config, relation, scpnet.METHODS["no_prior"])
    np.testing.assert_array_equal(g0, np.eye(len(relation)))
    np.testing.assert_array_equal(s0, np.eye(len(relation)))


def test_partial_protocol_trains_on_known_entries_only(data):
    config = smoke("--config.data.protocol=partial", "--config.data.known_proportion=0.3")
    task = _task(config, data)
    ann = task.train_source.annotations
    assert set(np.unique(ann)) <= {-1.0, 0.0, 1.0} and (ann == -1).any()
    params, state = _variables(task)
    batch = _batch(task, config, np.arange(config.batch_size))
    total, _, _ = jax.jit(task.loss)(params, state, batch, jax.random.key(1))
    assert np.isfinite(float(total))


def test_faint_split_ranks_the_faint_test_objects_against_the_absent_classes():
    config = smoke("--config.data.faint=0.4")
    data = scpnet.load_data(config.data)
    test = data.splits["test"]
    faint = scpnet.sources(config, data)["faint"]
    np.testing.assert_array_equal(faint.annotations, test.salient)
    plain = smoke("--config.data.faint=0")
    assert "faint" not in scpnet.sources(plain, scpnet.load_data(plain.data))
    scores = np.random.default_rng(0).normal(size=test.labels.shape)
    batch = faint.get_batch(np.arange(len(faint)))
    got = scpnet.summarize({"logits": scores, "labels": batch["labels"], "annotations": batch["annotations"]})
    ap = []
    for c in range(test.labels.shape[1]):  # salient positives left out; faint positives vs absent classes
        keep = test.salient[:, c] == 0
        y = test.labels[keep, c]
        ap.append(average_precision_score(y, scores[keep, c]) if y.any() else 0.0)
    np.testing.assert_allclose(got["hidden_mAP"], 100 * np.mean(ap), rtol=1e-9)


@pytest.mark.parametrize("override, message", [
    ("--config.method=scpnet,gcn_only", "must be one of"),
    ("--config.data.image_size=48", "multiple of 32"),
    ("--config.scpnet.relation=/nope/relation.npy", "existing .npy"),
    ("--config.data.name=coco2014", "data_dir"),
    ("--config.scpnet.epochs=5", "total_epochs"),
    ("--config.checkpoint.best_metric=val/loss", "val/mAP"),
    ("--config.data.crop_scale=(0.9, 0.5)", "crop_scale"),
    ("--config.data.faint=1.0", "data.faint"),
])
def test_bad_configs_are_named_before_anything_runs(tmp_path, override, message):
    config = smoke(override)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        tasks.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_relation_file_of_the_wrong_size_is_refused(tmp_path, data):
    path = tmp_path / "relation.npy"
    np.save(path, np.eye(5, dtype=np.float32))
    config = smoke(f"--config.scpnet.relation={path}")
    with pytest.raises(ValueError, match=r"\[8, 8\]"):
        scpnet.relation_matrix(config, data, None)


@pytest.mark.slow  # about 2 minutes on quiet cores (three compiled train steps); the CI's slow step runs it
def test_embedded_recipe_end_to_end_and_rerun_skips(tmp_path):
    """Pretraining, export with BatchNorm statistics, two methods, the comparison; a rerun reads it back."""
    config = smoke("--config.method=scpnet,assume_negative")
    workdir = tmp_path / "scp"
    out = tasks.run(config, str(workdir))
    assert out["status"] == "completed"
    rows = json.loads((workdir / "comparison.json").read_text())
    assert [r["run"] for r in rows] == ["scpnet", "assume_negative"]
    for row in rows:
        assert row["selected_weights"] in ("raw", "ema")
        for key in ("val/mAP", "test/mAP", "hidden/hidden_mAP"):
            assert 0 <= row[key] <= 100
    assert (workdir / "pretrain" / "backbone" / "batch_stats").is_dir()
    relation = np.load(workdir / "relation.npy")
    np.testing.assert_allclose(relation, multilabel.cooccurrence_relation(
        scpnet.load_data(config.data).splits["pretrain"].labels))
    results = json.loads((workdir / "scpnet" / "results.json").read_text())
    assert results["selected_weights"] == rows[0]["selected_weights"]
    again = tasks.run(config, str(workdir))
    assert again["runs"] == out["runs"]


def test_prior_tool_reports_the_calibration_diagonal(tmp_path):
    rng = np.random.default_rng(0)
    r = rng.uniform(0.43, 1.0, (20, 20)).astype(np.float32)
    r = (r + r.T) / 2
    np.fill_diagonal(r, 1.0)
    np.save(tmp_path / "r.npy", r)
    tool = [sys.executable, "-m", "jdjax.tools.scpnet_prior", "--topk=20", "--temperature=0.3"]
    # Both runs at once: each spends seconds importing jax.
    runs = [subprocess.Popen([*tool, f"--relation={tmp_path / name}"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for name in ("r.npy", "none.npy")]
    (stdout, stderr), (_, missing_stderr) = (run.communicate() for run in runs)
    assert runs[0].returncode == 0, stderr
    expected = scp.prior_report(r, 20, 0.2, 0.3)["s_diag_mean"]
    assert f"s_diag_mean: {expected:.4f}" in stdout
    assert runs[1].returncode == 2 and "does not exist" in missing_stderr

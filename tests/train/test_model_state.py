"""Mutable model state (BatchNorm statistics) and the EMA of the weights in the training loop: sharded
BatchNorm equals one device, resume is bit-identical, eval is per example, EMA arithmetic and the
raw-vs-EMA selection on validation, pretrained statistics loaded into the state."""

import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from jdjax.data.pipeline import ArraySource
from jdjax.train import loop
from jdjax.train import sharding as shd
from jdjax.train.checkpoint import read_state, saved_steps
from jdjax.train.task import Task
from jdjax.train.validation import UsageError

SIZE, CLASSES = 8, 3


class ConvBN(nn.Module):
    """Conv -> BatchNorm (Flax momentum 0.9 = PyTorch momentum 0.1) -> ReLU -> mean pool -> Dense."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)  # [B, S, S, 8]
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(CLASSES)(nn.relu(x).mean((1, 2)))  # [B, K]


def bn_task(**task_kwargs) -> Task:
    """Images [64, S, S, 3] whose class is the sign pattern of their channel means; stateful Task form."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, SIZE, SIZE, 3)).astype(np.float32) + rng.normal(size=(64, 1, 1, 3)).astype(np.float32)
    labels = (images.mean((1, 2)) > 0).sum(-1).clip(0, CLASSES - 1).astype(np.int32)
    source = ArraySource({"image": images, "label": labels})
    model = ConvBN()

    def variables(key):
        return model.init(key, jnp.zeros((1, SIZE, SIZE, 3)), train=False)

    def loss(params, model_state, batch, key):
        logits, model_state = model.apply({"params": params, **model_state}, batch["image"], train=True,
                                          mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}, model_state

    def predict(params, model_state, batch):
        logits = model.apply({"params": params, **model_state}, batch["image"], train=False)  # [B, K]
        return {"logits": logits, "correct": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}

    return Task(
        init=lambda key: variables(key)["params"], loss=loss, predict=predict,
        summarize=lambda out: {"accuracy": float(np.mean(out["correct"]))}, train_source=source,
        eval_sources={"val": source, "test": source},
        init_model_state=lambda key: {"batch_stats": variables(key)["batch_stats"]}, **task_kwargs,
    )


def config(**overrides) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.task = "model_state_test"
    c.data = ml_collections.ConfigDict({"prefetch": 2})
    c.update(batch_size=16, eval_batch_size=16, num_train_steps=6, eval_every_steps=3)
    c.checkpoint.update(every_steps=3, async_save=False)
    c.logging.update(every_steps=3, tensorboard=False)
    c.optimizer.update(name="sgd", learning_rate=0.1, momentum=0.9, warmup_steps=0, schedule="constant",
                       weight_decay=0.0, grad_clip_norm=0.0)
    c.update_from_flattened_dict(overrides)
    return c


def test_sharded_batchnorm_equals_one_device(tmp_path, monkeypatch, capsys):
    """On 8 devices the batch (16 rows) is split 2 per device; under jit BatchNorm's batch mean and
    variance are still over all 16 (GSPMD inserts the all-reduce), so params and running statistics
    equal the 1-device run's."""
    eight = str(tmp_path / "eight")
    loop.train_and_evaluate(config(), eight, bn_task())
    make_mesh = shd.make_mesh
    monkeypatch.setattr(shd, "make_mesh", lambda shape, devices=None: make_mesh(shape, jax.devices()[:1]))
    one = str(tmp_path / "one")
    loop.train_and_evaluate(config(), one, bn_task())
    out = capsys.readouterr().out
    assert "mesh {'data': 8, 'fsdp': 1, 'model': 1}" in out and "mesh {'data': 1, 'fsdp': 1, 'model': 1}" in out
    a, b = read_state(one), read_state(eight)
    assert int(b["step"]) == 6 and b["ema"] is None
    stats = b["model_state"]["batch_stats"]["BatchNorm_0"]
    assert not np.allclose(stats["mean"], 0.0) and not np.allclose(stats["var"], 1.0)  # the statistics moved
    chex.assert_trees_all_close(b["params"], a["params"], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(b["model_state"], a["model_state"], rtol=1e-5, atol=1e-5)


def test_resume_with_batch_stats_and_ema_is_bit_identical(tmp_path):
    cfg = config(ema_decay=0.5)
    full = str(tmp_path / "full")
    results = loop.train_and_evaluate(cfg, full, bn_task())
    assert saved_steps(full) == [3, 6]

    resumed = str(tmp_path / "resumed")  # the run as it was when step 3 was written
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "ckpt", "6"))
    for d in saved_steps(resumed, "best"):
        if d > 3:
            shutil.rmtree(os.path.join(resumed, "best", str(d)))
    again = loop.train_and_evaluate(cfg, resumed, bn_task())
    a, b = read_state(full, 6), read_state(resumed, 6)
    assert set(a["ema"]) == {"params", "model_state"} and "batch_stats" in a["ema"]["model_state"]
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert again == results and results["selected_weights"] in ("raw", "ema")


def test_eval_uses_running_statistics_per_example(tmp_path):
    """An example's prediction does not depend on the rest of its batch (train=False reads the running
    averages, which training moved away from their init)."""
    workdir = str(tmp_path)
    task = bn_task()
    loop.train_and_evaluate(config(), workdir, task)
    state = read_state(workdir)
    batch = task.train_source.get_batch(np.arange(16))
    full = task.predict(state["params"], state["model_state"], batch)["logits"]
    for i in (0, 7):
        alone = task.predict(state["params"], state["model_state"], jax.tree.map(lambda v: v[i:i + 1], batch))
        np.testing.assert_allclose(alone["logits"][0], full[i], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state["model_state"]["batch_stats"]["BatchNorm_0"]["var"], 1.0)


def _walk_task() -> Task:
    """w starts at 3 and SGD(lr=0.1) on (w - 1)^2 moves it to 1: w_t = 1 + 2 * 0.8^t. The model state
    counts steps (an integer leaf, copied into the EMA, not averaged). val/w reads the weights."""
    source = ArraySource({"x": np.zeros((16, 1), np.float32)})

    def loss(params, model_state, batch, rng):
        value = (params["w"] - 1.0) ** 2 + 0.0 * batch["x"].sum()
        return value, {}, {"count": {"n": model_state["count"]["n"] + 1}}

    def predict(params, model_state, batch):
        return {"w": jnp.broadcast_to(params["w"], batch["x"].shape[:1])}

    return Task(init=lambda rng: {"w": jnp.array(3.0)}, loss=loss, predict=predict,
                summarize=lambda out: {"w": float(np.mean(out["w"]))}, train_source=source,
                eval_sources={"val": source, "test": source},
                init_model_state=lambda rng: {"count": {"n": jnp.zeros((), jnp.int32)}})


@pytest.mark.parametrize("mode, weights, step", [("max", "ema", 2), ("min", "raw", 6)])
def test_ema_arithmetic_and_selection_on_validation(tmp_path, mode, weights, step):
    """The EMA lags behind the falling w: selecting the largest val/w picks the EMA at the first eval,
    the smallest picks the raw weights at the last; results.json names them and reports their metrics."""
    d = 0.5
    cfg = config(**{"ema_decay": d, "eval_every_steps": 2, "checkpoint.every_steps": 2,
                    "checkpoint.best_metric": "val/w", "checkpoint.best_mode": mode, "optimizer.momentum": 0.0})
    results = loop.train_and_evaluate(cfg, str(tmp_path), _walk_task())
    w = [1 + 2 * 0.8**t for t in range(7)]
    ema = [w[0]]
    for t in range(1, 7):
        ema.append(d * ema[-1] + (1 - d) * w[t])
    state = read_state(str(tmp_path))
    np.testing.assert_allclose(state["params"]["w"], w[6], rtol=1e-5)
    np.testing.assert_allclose(state["ema"]["params"]["w"], ema[6], rtol=1e-5)
    assert int(state["model_state"]["count"]["n"]) == int(state["ema"]["model_state"]["count"]["n"]) == 6
    assert results["selected_weights"] == weights and results["selected_step"] == step
    expected = (ema if weights == "ema" else w)[step]
    assert results["val/w"] == pytest.approx(expected, rel=1e-5)
    assert results["test/w"] == pytest.approx(expected, rel=1e-5)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m for m in logged if "val/w" in m}
    assert sorted(evals) == [2, 4, 6]
    assert evals[4]["val/w"] == pytest.approx(w[4], rel=1e-5)
    assert evals[4]["val_ema/w"] == pytest.approx(ema[4], rel=1e-5)


def test_without_ema_the_raw_weights_are_selected(tmp_path):
    results = loop.train_and_evaluate(config(), str(tmp_path), bn_task())
    assert results["selected_weights"] == "raw"
    assert json.loads((tmp_path / "results.json").read_text())["selected_weights"] == "raw"
    assert not any("val_ema/" in line for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_pretrained_batch_stats_are_loaded_into_state_and_ema():
    """load_pretrained maps {'params', 'batch_stats'} -> the same; the loaded statistics start both the
    model state and its EMA, and the state trains on (nothing aliased between them)."""
    seen = {}

    def load(variables):
        seen.update(variables)
        return {**variables, "batch_stats": jax.tree.map(lambda v: v + 2.0, variables["batch_stats"])}

    c = loop.compile_task(config(ema_decay=0.9), bn_task(load_pretrained=load))
    state = c.init_state()
    assert set(seen) == {"params", "batch_stats"}
    for stats in (state.model_state, state.ema["model_state"]):
        np.testing.assert_array_equal(stats["batch_stats"]["BatchNorm_0"]["var"], np.full(8, 3.0))
    batch = shd.global_batch_from_local(bn_task().train_source.get_batch(np.arange(16)), c.mesh)
    state, metrics = c.train_step(state, batch, c.rng)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_initial_state_is_the_plain_init_bit_for_bit():
    """The loop compiles the initial state with its own compiler options (loop.CPU_INIT_COMPILER_OPTIONS):
    the parameters equal a plain jit of task.init on the same key, bit for bit (truncated-normal
    kernels, i.e. erf_inv, among them)."""
    cfg, task = config(ema_decay=0.9), bn_task()
    state = loop.compile_task(cfg, task).init_state()
    init_rng, _ = jax.random.split(jax.random.key(cfg.seed))
    chex.assert_trees_all_equal(state.params, nn.meta.unbox(jax.jit(task.init)(init_rng)))
    chex.assert_trees_all_equal(state.ema["params"], state.params)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_ema_decay_out_of_range_is_a_usage_error(tmp_path, decay):
    with pytest.raises(UsageError, match=r"ema_decay must be in \[0, 1\)"):
        loop.train_and_evaluate(config(ema_decay=decay), str(tmp_path), bn_task())

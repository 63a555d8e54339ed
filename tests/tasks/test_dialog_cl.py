"""The dialogue task: group batches, sample picking, the reference frozen, the smoke recipe end to end."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dialog_cl as dialog_config
from jdjax import tasks
from jdjax.tasks import dialog_cl
from jdjax.train.checkpoint import read_state


def _tokens(n, lc=3, lr=2, offset=0):
    base = np.arange(n)[:, None] + offset
    return {"context": (base * 10 + np.arange(lc)).astype(np.int32),
            "response_in": (base * 10 + 100 + np.arange(lr)).astype(np.int32),
            "response_out": (base * 10 + 200 + np.arange(lr)).astype(np.int32)}


def test_group_source_lays_out_context_side_then_response_side():
    pool, own = _tokens(5), _tokens(3, offset=50)
    retrieved = np.array([[4, 1], [0, 0], [2, 3]], np.int32)
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    batch = dialog_cl.GroupSource(own, pool, retrieved, m).get_batch(np.array([2, 0]))
    assert batch["group_context"].shape == (2, 4, 3) and batch["group_response_out"].shape == (2, 4, 2)
    for row, i in enumerate([2, 0]):
        for j in range(2):  # context side: (c'_j, r)
            np.testing.assert_array_equal(batch["group_context"][row, j], pool["context"][retrieved[i, j]])
            np.testing.assert_array_equal(batch["group_response_out"][row, j], own["response_out"][i])
            # response side: (c, r'_j)
            np.testing.assert_array_equal(batch["group_context"][row, 2 + j], own["context"][i])
            np.testing.assert_array_equal(batch["group_response_in"][row, 2 + j], pool["response_in"][retrieved[i, j]])
    np.testing.assert_array_equal(batch["group_m"], m[[2, 0]])
    no_scores = dialog_cl.GroupSource(own, pool, retrieved).get_batch(np.array([1]))
    np.testing.assert_array_equal(no_scores["group_m"], np.full((1, 4), 0.5, np.float32))


def test_pick_samples_takes_whole_pairs_uniformly():
    pool, own = _tokens(6), _tokens(64, offset=50)
    retrieved = np.tile(np.arange(6, dtype=np.int32), (64, 1))  # R = 6, 12 pairs per example
    m = np.tile(np.arange(12, dtype=np.float32), (64, 1))
    batch = dialog_cl.GroupSource(own, pool, retrieved, m).get_batch(np.arange(64))
    draws = np.random.default_rng(0).random((64, 8))
    out = dialog_cl.pick_samples(6)(batch, draws)
    assert not any(k.startswith("group_") for k in out)
    assert out["sample_context"].shape == (64, 6, 3) and out["sample_m"].shape == (64, 6)
    j = out["sample_m"].astype(int)  # m = the pair's index: the picked pair's tokens must be that pair's
    for key in ("context", "response_in", "response_out"):
        np.testing.assert_array_equal(out[f"sample_{key}"], np.take_along_axis(batch[f"group_{key}"], j[:, :, None], 1))
    np.testing.assert_array_equal(j, np.minimum((draws[:, :6] * 12).astype(int), 11))
    assert 0.35 < np.mean(j < 6) < 0.65  # both sides, about as often


@pytest.mark.parametrize("override, message", [
    ({"data.name": "persona"}, "data.name"),
    ({"data.name": "dir", "data.data_dir": "/nonexistent"}, "not a directory"),
    ({"model.name": "gru"}, "model.name"),
    ({"cl.sample_k": 9}, "sample_k"),
    ({"cl.normalization": "sharp"}, "normalization"),
    ({"cl.num_cl_steps": 0}, "num_cl_steps"),
])
def test_bad_configs_are_named(override, message):
    c = dialog_config.get_config("smoke")
    for k, v in override.items():
        section, key = k.split(".")
        c[section][key] = v
    assert any(message in e for e in tasks.validate(c))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dialog"))
    c = dialog_config.get_config("smoke")
    out = tasks.run(c, workdir)
    return c, workdir, out


@pytest.mark.slow  # shares a module fixture that compiles and runs the whole smoke pipeline (60-80 s)
def test_smoke_recipe_writes_the_table_with_samples(recipe):
    c, workdir, out = recipe
    assert out["status"] == "completed"
    rows = json.load(open(os.path.join(workdir, "comparison.json")))
    assert [r["run"] for r in rows] == ["MLE", "CL", "samples"]
    for r in rows[:2]:
        assert all(math.isfinite(r[f"test/{k}"]) for _, k, _ in dialog_cl.COLUMNS)
    samples = rows[2]["samples"]
    assert len(samples) == c.num_samples and all({"context", "gold", "MLE", "CL"} <= set(s) for s in samples)
    assert len({s["context"] for s in samples}) == len(samples)  # distinct contexts
    table = open(os.path.join(workdir, "comparison.md")).read()
    assert "| MLE |" in table and "| CL |" in table
    # Vocabulary, retrieval lists and matcher scores are kept for a resumed run.
    for name in ("vocab.json", "matching_scores.npz", "retrieval"):
        assert os.path.exists(os.path.join(workdir, name))


@pytest.mark.slow  # shares a module fixture that compiles and runs the whole smoke pipeline (60-80 s)
def test_reference_is_frozen_and_the_model_starts_from_it(recipe):
    """The reference inside the contrastive run equals the reference run's selected weights at every
    saved step (checksum), while the trained model moved away from them."""
    _, workdir, _ = recipe
    reference = read_state(os.path.join(workdir, "reference"), kind="best")["params"]
    contrastive = read_state(os.path.join(workdir, "contrastive"), kind="ckpt")["params"]
    checksum = lambda tree: [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]  # noqa: E731
    assert checksum(contrastive["reference"]) == checksum(reference)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), contrastive["model"], reference))
    assert max(moved) > 0


@pytest.mark.slow  # shares a module fixture that compiles and runs the whole smoke pipeline (60-80 s)
def test_validation_cl_loss_is_log2_when_model_equals_reference(recipe):
    """h = sigmoid(l_m - l_n) = 1/2 when the model is the reference, so every pair's loss is log 2
    whatever its weight s (spec invariant), through the task's own predict."""
    c, workdir, _ = recipe
    from jdjax.data import dialogue
    from jdjax.data import text as text_data

    examples = dialog_cl.load_dialogues(c.data)
    vocab = text_data.WordVocab.load(os.path.join(workdir, "vocab.json"))
    tokens = {s: dialog_cl.encode_split(vocab, ex, c.data) for s, ex in examples.items()}
    retrieved = dialogue.retrieval_cache(examples, workdir, k_top=c.data.k_top, k_bottom=c.data.k_bottom, seed=0)
    val = dialog_cl.GroupSource(tokens["val"], tokens["train"],
                                np.concatenate([retrieved["val"]["top"], retrieved["val"]["bottom"]], 1),
                                np.random.default_rng(0).random((len(tokens["val"]["context"]), 14)).astype(np.float32))
    model = dialog_cl.build_model(c.model, vocab.size)
    task = dialog_cl.contrastive_task(c, model, {"train": val, "val": val}, vocab, os.path.join(workdir, "reference"))
    reference = read_state(os.path.join(workdir, "reference"), kind="best")["params"]
    params = {"model": reference, "reference": reference}
    out = jax.jit(task.predict)(params, task.init_model_state(None), val.get_batch(np.arange(8)))
    np.testing.assert_allclose(np.asarray(out["cl"]), np.log(2.0), rtol=1e-6)
    assert jnp.all(out["nll_count"] > 0)


@pytest.mark.slow  # compiles both branches of a Transformer train step: about 30 s on quiet cores
def test_loss_switches_from_mle_to_the_group_loss_at_pretrain_steps():
    """Before cl.pretrain_steps the loss is the plain token NLL (w = 0); from there the group loss with
    w = cl_weight(n); gradients reach 'model' only (the reference is stop-gradient). With the
    Transformer (the smoke recipe above trains the LSTM)."""
    c = dialog_config.get_config("smoke")
    c.model.name = "transformer"
    c.cl.pretrain_steps = 3
    rng = np.random.default_rng(0)
    vocab_size, lc, lr = 30, c.data.max_context, c.data.max_response

    def tokens(n):
        t = {"context": rng.integers(3, vocab_size, (n, lc)), "response_in": rng.integers(3, vocab_size, (n, lr)),
             "response_out": rng.integers(3, vocab_size, (n, lr))}
        t["response_in"][:, 0] = 1
        t["response_out"][:, -1] = 2
        return {k: v.astype(np.int32) for k, v in t.items()}

    pool = tokens(10)
    source = dialog_cl.GroupSource(tokens(4), pool, rng.integers(0, 10, (4, 5)).astype(np.int32),
                                   rng.random((4, 10)).astype(np.float32))
    model = dialog_cl.build_model(c.model, vocab_size)
    task = dialog_cl.contrastive_task(c, model, {"train": source}, None, "")
    params = jax.tree.map(lambda x: getattr(x, "value", x), task.init(jax.random.key(0)),
                          is_leaf=lambda x: hasattr(x, "value"))
    batch = dialog_cl.pick_samples(c.cl.sample_k)(source.get_batch(np.arange(4)), rng.random((4, 8)))
    def loss_fn(params, model_state, batch, rng):
        total, metrics, new_state = task.loss(params, model_state, batch, rng)
        return total, (metrics, new_state)

    loss = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    for step, expect_w in ((2, 0.0), (3, float(dialog_cl.cl.cl_weight(0, c.cl.speed))),
                           (5, float(dialog_cl.cl.cl_weight(2, c.cl.speed)))):
        (total, (metrics, state)), grads = loss(params, {"cl": {"step": jnp.int32(step)}}, batch, jax.random.key(1))
        assert int(state["cl"]["step"]) == step + 1
        np.testing.assert_allclose(float(metrics["w"]), expect_w, rtol=1e-4)
        assert np.isfinite(float(total))
        assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["reference"]))
        assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads["model"]))
        if step < 3:
            np.testing.assert_allclose(float(total), float(metrics["nll"]), rtol=1e-6)

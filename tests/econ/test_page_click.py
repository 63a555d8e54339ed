"""The ad-blending click model (jdjax.models.page_click, jdjax.tasks.page_click): shapes, the
no-context model's separability, the context attention's masking, the allocation interface
`make_ctr_fn`, metrics and config checks, and a training run in which the context model beats the
no-context baseline on a log with a strong competition externality."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import page_click as cp
from jdjax.econ import page_env
from jdjax.models.page_click import PageClickModel, make_ctr_fn, page_batch, page_ctr
from jdjax.tasks import page_click
from jdjax.train import loop

B, S, D, C, H = 4, 10, 8, 16, 2


def _model(context: bool, num_slots: int = S) -> PageClickModel:
    return PageClickModel(context=context, num_slots=num_slots, num_categories=8, width=C, num_heads=H,
                          mlp_hidden=(16,))


def _batch(seed: int = 0, b: int = B, s: int = S) -> dict:
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "user": jax.random.normal(k[0], (b, D)),
        "x": jax.random.normal(k[1], (b, s, D)),
        "cat": jax.random.randint(k[2], (b, s), 0, 8),
        "is_ad": jax.random.bernoulli(k[3], 0.3, (b, s)),
    }


@functools.partial(jax.jit, static_argnums=0)
def _init(model, batch):
    return nn.meta.unbox(model.init(jax.random.key(1), batch)["params"])


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, batch):
    """(logits, aux) of the model, compiled once per model and shape."""
    return model.apply({"params": params}, batch)


def _replace_slots(batch: dict, slots, seed: int) -> dict:
    """`batch` with the items (x, cat, is_ad) of `slots` replaced by other random items."""
    other = _batch(seed, *batch["cat"].shape)
    keep = np.ones(batch["cat"].shape[1], bool)
    keep[list(slots)] = False
    out = dict(batch)
    for k in ("x", "cat", "is_ad"):
        m = keep.reshape((1, -1) + (1,) * (batch[k].ndim - 2))
        out[k] = jnp.where(m, batch[k], other[k])
    return out


@pytest.mark.parametrize("context", [False, True])
def test_shapes_finite_grads_and_logical_names(context):
    model, batch = _model(context), _batch()
    boxed = jax.jit(model.init)(jax.random.key(1), batch)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)  # every parameter is named
    params = nn.meta.unbox(boxed)
    logits, aux = _apply(model, params, batch)
    chex.assert_shape(logits, (B, S))
    if context:
        chex.assert_shape(aux["weights"], (B, H, S, S))
        chex.assert_shape(aux["context"], (B, S, C))
    else:
        assert aux == {} and "context" not in params
    labels = jnp.asarray(np.random.default_rng(0).random((B, S)) < 0.3, jnp.float32)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, batch)[0], labels).mean()
    ))(params)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_no_context_logit_depends_only_on_its_own_slot():
    batch = _batch()
    for context in (False, True):
        model = _model(context)
        params = _init(model, batch)
        base = _apply(model, params, batch)[0]
        for i in (0, 4, 9):
            changed = _apply(model, params, _replace_slots(batch, [j for j in range(S) if j != i], seed=7))[0]
            if context:  # the context model sees the other items
                assert np.abs(changed[:, i] - base[:, i]).max() > 1e-4
            else:
                np.testing.assert_allclose(changed[:, i], base[:, i], rtol=1e-6, atol=1e-6)


def test_context_excludes_the_item_itself():
    model, batch = _model(True), _batch()
    params = _init(model, batch)
    weights = np.asarray(_apply(model, params, batch)[1]["weights"])  # [B, H, S, S]
    np.testing.assert_array_equal(weights[..., np.arange(S), np.arange(S)], 0.0)  # no attention to itself
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)  # a distribution over the other items
    # With two slots the context of each slot is its one neighbour, whatever the slot's own item.
    model2 = _model(True, num_slots=2)
    batch2 = _batch(3, s=2)
    params2 = _init(model2, batch2)
    ctx = _apply(model2, params2, batch2)[1]["context"]
    ctx_new = _apply(model2, params2, _replace_slots(batch2, [0], seed=11))[1]["context"]
    np.testing.assert_allclose(ctx_new[:, 0], ctx[:, 0], rtol=1e-6, atol=1e-6)
    assert np.abs(ctx_new[:, 1] - ctx[:, 1]).max() > 1e-4


def test_make_ctr_fn_matches_the_model_on_stacked_layouts():
    p = page_env.EnvParams.from_config(cp.env_config())
    assignments = jnp.array([[-1, -1, -1], [0, -1, 2], [5, 4, 3], [-1, 1, -1]], jnp.int32)  # A = 4 layouts

    @jax.jit
    def pages_and_layouts(key):
        pages = page_env.sample_pages(key, page_env.category_centres(0, p), p, 3)  # P = 3
        return pages, jax.vmap(lambda pg: jax.vmap(lambda a: page_env.layout(pg, a, p))(assignments))(pages)

    pages, lays = pages_and_layouts(jax.random.key(2))  # lays [P, A, S, ...]
    take = lambda tree, k: jax.tree.map(lambda v: v[k], tree)  # noqa: E731
    page0, lays0 = take(pages, 0), take(lays, 0)
    batch = {"user": jnp.tile(page0.user[None], (4, 1)), "x": lays0.x, "cat": lays0.cat, "is_ad": lays0.is_ad}
    chex.assert_trees_all_equal(page_batch(page0, lays0), batch)
    model = _model(True)
    params = _init(model, batch)
    ctr_fn = make_ctr_fn(model, params)
    expected = jax.nn.sigmoid(_apply(model, params, batch)[0])
    got = jax.jit(ctr_fn)(page0, lays0)
    chex.assert_shape(got, (4, S))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with_params = jax.jit(page_ctr, static_argnums=0)(model, params, page0, lays0)
    np.testing.assert_allclose(with_params, expected, rtol=1e-5, atol=1e-6)
    all_pages = jax.jit(jax.vmap(ctr_fn))(pages, lays)  # [P, A, S]: vmapped over pages, equal page by page
    chex.assert_shape(all_pages, (3, 4, S))
    for k in range(3):
        np.testing.assert_allclose(all_pages[k], jax.jit(ctr_fn)(take(pages, k), take(lays, k)), rtol=1e-5, atol=1e-6)


def test_summarize_reports_model_and_oracle_metrics():
    out = {
        "prob": np.array([[0.9, 0.2, 0.7], [0.4, 0.6, 0.1]]),
        "label": np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]),
        "is_ad": np.array([[True, True, False], [True, False, False]]),
        "ctr": np.array([[0.8, 0.1, 0.2], [0.7, 0.6, 0.1]]),
    }
    m = page_click.summarize(out)
    assert m["count"] == 6 and m["ad_count"] == 3
    assert m["auc"] == pytest.approx(7 / 9)
    assert m["ad_auc"] == pytest.approx(1.0)  # ads: scores 0.9, 0.2, 0.4, clicks 1, 0, 1
    assert m["organic_auc"] == pytest.approx(0.5)  # organic: scores 0.7, 0.6, 0.1, clicks 0, 1, 0
    assert m["oracle_auc"] == pytest.approx(1.0)
    assert m["oracle_logloss"] < m["logloss"]
    assert m["ctr_rmse"] == pytest.approx(np.sqrt(np.mean((out["prob"] - out["ctr"]) ** 2)))


def test_click_config_is_valid_and_errors_name_the_problem():
    cfg = cp.click_config()
    assert page_click.validate(cfg) == []
    cfg.model.num_heads = 3
    cfg.data.val_pages = 0
    cfg.env.variant = "nope"
    errors = " | ".join(page_click.validate(cfg))
    assert "model.width=32 must be a positive multiple of model.num_heads=3" in errors
    assert "data.val_pages=0" in errors and "env.variant='nope'" in errors
    with pytest.raises(ValueError, match="invalid click config"):
        page_click.click_model_task(cfg, context=True)


def _tiny_config(seed: int):
    cfg = cp.click_config()
    cfg.update_from_flattened_dict({
        "seed": seed, "batch_size": 64, "eval_batch_size": 1000, "num_train_steps": 300, "eval_every_steps": 100,
        "checkpoint.every_steps": 300, "checkpoint.async_save": False, "logging.every_steps": 10,
        "logging.tensorboard": False, "model.width": 16, "model.num_heads": 2, "model.mlp_hidden": (32,),
    })
    return cfg


@pytest.fixture(scope="module")
def strong_competition_logs():
    """2000 train and 2000 val pages of the competition variant with gamma = 1 (a same-category
    neighbour halves an item's clicks); equal sizes compile click_log once."""
    p = page_env.EnvParams.from_config(cp.env_config("competition"))._replace(gamma=1.0)
    return {split: page_env.click_log(0, p, 2000, stream) for split, stream in (("train", 0), ("val", 1))}


@pytest.mark.slow  # two training runs through the loop (~30 s each on 2 cores)
@pytest.mark.parametrize("seed", [0, 1])
def test_context_model_beats_no_context_model_on_competition(tmp_path, strong_competition_logs, seed):
    cfg = _tiny_config(seed)
    results = {}
    for context in (False, True):
        task = page_click.click_task_from_logs(page_click.build_model(cfg, context=context), strong_competition_logs)
        results[context] = loop.train_and_evaluate(cfg, str(tmp_path / f"context{context}"), task)
    no_ctx, ctx = results[False], results[True]
    assert ctx["selected_by"] == "val/auc"
    assert 0.5 < no_ctx["val/auc"] < ctx["val/auc"] <= ctx["val/oracle_auc"] + 0.01
    assert ctx["val/ctr_rmse"] < no_ctx["val/ctr_rmse"]

"""Optimizers from config (jdjax/train/optim.py) against plain NumPy / optax expectations."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax.train import optim


def _cfg(**over):
    base = dict(
        name="sgd",
        learning_rate=0.1,
        warmup_steps=0,
        warmup_init=0.0,
        schedule="constant",
        schedule_steps=0,
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        grad_clip_norm=0.0,
    )
    base.update(over)
    return SimpleNamespace(**base)


def _params():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    return {
        "encoder": {
            "block0": {"kernel": f(4, 3), "bias": f(3), "scale": f(3)},
            "block1": {"kernel": f(3, 3), "bias": f(3)},
        },
        "head": {"kernel": f(3, 2), "bias": f(2)},
        "pos": f(1, 5, 3),
    }


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)


def _leaves_under(tree, field: str):
    """Array leaves of `tree` whose path passes through an attribute/key named `field`."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        if field in names:
            out.append(leaf)
    return out


# ----------------------------------------------------------------------------- schedule


def test_schedule_warmup_then_cosine():
    cfg = _cfg(learning_rate=1.0, warmup_steps=10, warmup_init=0.1, schedule="cosine", min_lr_ratio=0.05)
    s = optim.learning_rate_schedule(cfg, 110)
    np.testing.assert_allclose(float(s(0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(s(5)), 0.1 + 0.9 * 5 / 10, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)  # peak at the end of warmup
    # Cosine from peak to min over the remaining 100 steps.
    for t in (10, 35, 60, 85, 110):
        frac = (t - 10) / 100
        expected = 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac))
        np.testing.assert_allclose(float(s(t)), expected, rtol=1e-5, err_msg=str(t))
    np.testing.assert_allclose(float(s(110)), 0.05, rtol=1e-5)  # min at the end
    values = np.array([float(s(t)) for t in range(0, 111)])
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 1e-7)
    assert values.max() == pytest.approx(1.0)


def test_schedule_constant_with_and_without_warmup():
    s = optim.learning_rate_schedule(_cfg(learning_rate=0.3, warmup_steps=4, schedule="constant"), 50)
    np.testing.assert_allclose([float(s(t)) for t in (0, 2, 4, 20, 50)], [0.0, 0.15, 0.3, 0.3, 0.3], rtol=1e-6)
    s0 = optim.learning_rate_schedule(_cfg(learning_rate=0.3, warmup_steps=0, schedule="constant"), 50)
    np.testing.assert_allclose([float(s0(t)) for t in (0, 25, 50)], 0.3, rtol=1e-6)


def test_schedule_warmup_clamped_to_run_length():
    cfg = _cfg(learning_rate=1.0, warmup_steps=100, schedule="cosine", min_lr_ratio=0.0)
    s = optim.learning_rate_schedule(cfg, 10)  # warmup longer than the run: peak still reached
    np.testing.assert_allclose(float(s(9)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 0.0, atol=1e-6)


def test_schedule_unknown_name():
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rate_schedule(_cfg(schedule="linear"), 10)


# ----------------------------------------------------------------------------- masks


def test_path_names():
    names = optim.path_names({"a": {"b": 1, "c": [2, 3]}, "d": 4})
    assert names == {"a": {"b": "a/b", "c": ["a/c/0", "a/c/1"]}, "d": "d"}


def test_trainable_mask_by_regex():
    p = _params()
    assert all(jax.tree.leaves(optim.trainable_mask(p, "")))
    assert all(jax.tree.leaves(optim.trainable_mask(p, ".*")))
    m = optim.trainable_mask(p, r"^head/|/bias$")
    assert m == {
        "encoder": {
            "block0": {"kernel": False, "bias": True, "scale": False},
            "block1": {"kernel": False, "bias": True},
        },
        "head": {"kernel": True, "bias": True},
        "pos": False,
    }
    m = optim.trainable_mask(p, "block1")
    assert m["encoder"]["block1"] == {"kernel": True, "bias": True}
    assert not any(jax.tree.leaves(m["encoder"]["block0"])) and not m["head"]["kernel"]


def test_decay_mask_skips_1d():
    m = optim.decay_mask(_params())
    assert m["encoder"]["block0"] == {"kernel": True, "bias": False, "scale": False}
    assert m["head"] == {"kernel": True, "bias": False}
    assert m["pos"] is True


def test_count_params():
    p = _params()
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
    assert optim.count_params(p) == total
    mask = optim.trainable_mask(p, "^head/")
    assert optim.count_params(p, mask) == 3 * 2 + 2


# ----------------------------------------------------------------------------- make_optimizer


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_frozen_params_zero_update_and_no_state(name):
    p = _params()
    pattern = r"^head/|block1/kernel"
    cfg = _cfg(name=name, momentum=0.9, weight_decay=0.1, grad_clip_norm=1.0)
    tx, _ = optim.make_optimizer(cfg, num_steps=10, trainable=pattern)
    state = tx.init(p)
    mask = optim.trainable_mask(p, pattern)
    n_train = optim.count_params(p, mask)
    n_train_leaves = sum(jax.tree.leaves(mask))
    moments = ("mu", "nu") if name == "adamw" else ("trace",)
    for field in moments:
        leaves = _leaves_under(state, field)
        assert len(leaves) == n_train_leaves, field
        assert sum(x.size for x in leaves) == n_train, field
    # Every parameter-shaped state leaf is a trainable one: total state is small.
    state_size = sum(np.size(x) for x in jax.tree.leaves(state))
    assert state_size <= len(moments) * n_train + 16
    grads = _grads(p)
    for _ in range(2):
        updates, state = tx.update(grads, state, p)
        for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask)):
            if m:
                assert np.abs(np.asarray(u)).max() > 0
            else:
                np.testing.assert_array_equal(np.asarray(u), 0.0)
        p = optax.apply_updates(p, updates)


def test_all_trainable_state_counts():
    p = _params()
    tx, _ = optim.make_optimizer(_cfg(name="adamw"), 10)
    state = tx.init(p)
    assert sum(x.size for x in _leaves_under(state, "mu")) == optim.count_params(p)
    assert sum(x.size for x in _leaves_under(state, "nu")) == optim.count_params(p)


def test_sgd_update_matches_numpy_with_decay_on_matrices_only():
    p = _params()
    lr, wd = 0.1, 0.01
    tx, _ = optim.make_optimizer(_cfg(name="sgd", learning_rate=lr, weight_decay=wd), 10)
    g = _grads(p)
    updates, _ = tx.update(g, tx.init(p), p)
    expected = jax.tree.map(
        lambda pp, gg: -lr * (np.asarray(gg) + (wd * np.asarray(pp) if pp.ndim > 1 else 0.0)), p, g
    )
    jax.tree.map(lambda u, e: np.testing.assert_allclose(np.asarray(u), e, rtol=1e-5, atol=1e-7), updates, expected)


def test_sgd_momentum_matches_numpy():
    p = _params()
    lr, mom = 0.1, 0.9
    tx, _ = optim.make_optimizer(_cfg(name="sgd", learning_rate=lr, momentum=mom), 10)
    state = tx.init(p)
    g1, g2 = _grads(p, 1), _grads(p, 2)
    _, state = tx.update(g1, state, p)
    u2, _ = tx.update(g2, state, p)
    expected = jax.tree.map(lambda a, b: -lr * (mom * np.asarray(a) + np.asarray(b)), g1, g2)
    jax.tree.map(lambda u, e: np.testing.assert_allclose(np.asarray(u), e, rtol=1e-5, atol=1e-7), u2, expected)


def test_adamw_first_step_matches_numpy_and_skips_decay_on_vectors():
    p = _params()
    lr, wd, eps = 0.01, 0.1, 1e-8
    tx, _ = optim.make_optimizer(_cfg(name="adamw", learning_rate=lr, weight_decay=wd, eps=eps), 10)
    g = _grads(p)
    updates, _ = tx.update(g, tx.init(p), p)

    def expected(pp, gg):
        pp, gg = np.asarray(pp), np.asarray(gg)
        # Bias-corrected first step: m_hat = g, v_hat = g^2.
        return -lr * (gg / (np.abs(gg) + eps) + (wd * pp if pp.ndim > 1 else 0.0))

    jax.tree.map(lambda u, pp, gg: np.testing.assert_allclose(np.asarray(u), expected(pp, gg), rtol=1e-5, atol=1e-7), updates, p, g)
    # With zero gradients only the decay remains, and only on >= 2-D parameters.
    zero = jax.tree.map(jnp.zeros_like, p)
    u0, _ = tx.update(zero, tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(u0["encoder"]["block0"]["bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(u0["head"]["bias"]), 0.0)
    np.testing.assert_allclose(np.asarray(u0["head"]["kernel"]), -lr * wd * np.asarray(p["head"]["kernel"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u0["pos"]), -lr * wd * np.asarray(p["pos"]), rtol=1e-6)


def test_lr_multipliers_scale_the_update():
    p = {"base": jnp.ones((2, 3)), "fast": jnp.ones((2, 3)), "both": jnp.ones((2,)), "frozen_fast": jnp.ones((3,))}
    g = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), p)
    cfg = _cfg(name="sgd", learning_rate=0.2, warmup_steps=4, warmup_init=0.0, schedule="cosine")
    tx, schedule = optim.make_optimizer(
        cfg, 20, trainable="^(base|fast|both)$", lr_multipliers=(("fast|both", 10.0), ("both", 3.0))
    )
    state = tx.init(p)
    for step in range(6):
        updates, state = tx.update(g, state, p)
        lr = float(schedule(step))
        np.testing.assert_allclose(np.asarray(updates["base"]), -lr * 0.5, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(np.asarray(updates["fast"]), -10.0 * lr * 0.5, rtol=1e-5, atol=1e-9)
        # first matching pattern wins
        np.testing.assert_allclose(np.asarray(updates["both"]), -10.0 * lr * 0.5, rtol=1e-5, atol=1e-9)
        # frozen beats a matching multiplier
        np.testing.assert_array_equal(np.asarray(updates["frozen_fast"]), 0.0)
        if step > 0:
            np.testing.assert_allclose(np.asarray(updates["fast"]), 10.0 * np.asarray(updates["base"]), rtol=1e-5)


def test_lr_multipliers_with_adamw():
    p = {"base": jnp.ones((2, 3)), "fast": jnp.ones((2, 3))}
    g = {"base": jnp.full((2, 3), 0.3), "fast": jnp.full((2, 3), 0.3)}
    tx, _ = optim.make_optimizer(_cfg(name="adamw", weight_decay=0.05), 10, lr_multipliers=(("fast", 4.0),))
    state = tx.init(p)
    for _ in range(3):
        updates, state = tx.update(g, state, p)
        np.testing.assert_allclose(np.asarray(updates["fast"]), 4.0 * np.asarray(updates["base"]), rtol=1e-5)


@pytest.mark.parametrize("scale", [10.0, 0.5])
def test_gradient_clipping_by_global_norm(scale):
    p = _params()
    lr, clip = 1.0, 1.0
    tx, _ = optim.make_optimizer(_cfg(name="sgd", learning_rate=lr, grad_clip_norm=clip), 10)
    g = _grads(p)
    norm = np.sqrt(sum(float(np.sum(np.asarray(x) ** 2)) for x in jax.tree.leaves(g)))
    g = jax.tree.map(lambda x: x * (scale / norm), g)  # global norm == scale
    updates, _ = tx.update(g, tx.init(p), p)
    factor = min(1.0, clip / scale)
    jax.tree.map(
        lambda u, gg: np.testing.assert_allclose(np.asarray(u), -lr * factor * np.asarray(gg), rtol=1e-5, atol=1e-7),
        updates,
        g,
    )
    unorm = np.sqrt(sum(float(np.sum(np.asarray(x) ** 2)) for x in jax.tree.leaves(updates)))
    np.testing.assert_allclose(unorm, min(scale, clip), rtol=1e-5)


def test_no_clipping_when_disabled():
    p = _params()
    tx, _ = optim.make_optimizer(_cfg(name="sgd", learning_rate=1.0, grad_clip_norm=0.0), 10)
    g = jax.tree.map(lambda x: x * 100.0, _grads(p))
    updates, _ = tx.update(g, tx.init(p), p)
    jax.tree.map(lambda u, gg: np.testing.assert_allclose(np.asarray(u), -np.asarray(gg), rtol=1e-6), updates, g)


def test_make_optimizer_returns_schedule_and_jits():
    p = _params()
    cfg = _cfg(name="adamw", learning_rate=0.5, warmup_steps=2, schedule="cosine", grad_clip_norm=1.0, weight_decay=0.1)
    tx, schedule = optim.make_optimizer(cfg, 10, trainable="head")
    np.testing.assert_allclose(float(schedule(2)), 0.5, rtol=1e-6)
    state = tx.init(p)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    u_jit, _ = step(_grads(p), state, p)
    u_eager, _ = tx.update(_grads(p), state, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), u_jit, u_eager)


# ----------------------------------------------------------------------------- onecycle, adam_l2 (SCPNet)


def _torch_onecycle(num_steps, max_lr, steps):
    """PyTorch OneCycleLR as SCPNet builds it (pct_start 0.2, other arguments default): per group
    (learning rate, Adam beta1) at each of `steps`."""
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in max_lr]
    opt = torch.optim.Adam([{"params": [p]} for p in params], lr=max_lr[0])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=list(max_lr), total_steps=num_steps, pct_start=0.2,
                                                anneal_strategy="cos", three_phase=False)
    out = {}
    for t in range(max(steps) + 1):
        if t in steps:
            out[t] = [(g["lr"], g["betas"][0]) for g in opt.param_groups]
        opt.step()
        sched.step()
    return out


def test_onecycle_matches_pytorch_onecycle_lr():
    steps = (0, 1, 5, 9, 10, 11, 25, 48, 49)
    ref = _torch_onecycle(50, [0.3, 0.03], steps)
    cfg = _cfg(name="adam_l2", learning_rate=0.3, schedule="onecycle")
    lr = optim.learning_rate_schedule(cfg, 50)
    b1 = optim.adam_b1(cfg, 50)
    for t in steps:
        np.testing.assert_allclose(float(lr(t)), ref[t][0][0], rtol=1e-5, err_msg=str(t))
        np.testing.assert_allclose(float(0.1 * lr(t)), ref[t][1][0], rtol=1e-5, err_msg=str(t))
        np.testing.assert_allclose(float(b1(t)), ref[t][0][1], rtol=1e-6, err_msg=str(t))
    # Hand values: 0.3 / 25 at the start, the peak at step 0.2 * 50 - 1 = 9, 0.3 / 25 / 1e4 at step 49,
    # b1 0.95 -> 0.85 (at the peak) -> 0.95.
    np.testing.assert_allclose([float(lr(t)) for t in (0, 9, 49)], [0.012, 0.3, 1.2e-6], rtol=1e-5)
    np.testing.assert_allclose([float(b1(t)) for t in (0, 9, 49)], [0.95, 0.85, 0.95], rtol=1e-6)
    with pytest.raises(ValueError, match="schedule_steps"):
        optim.learning_rate_schedule(cfg, 5)


def test_schedule_steps_stretch_the_schedule_past_the_run():
    cfg = _cfg(name="adam_l2", learning_rate=1.0, schedule="onecycle", schedule_steps=50)
    _, schedule = optim.make_optimizer(cfg, num_steps=30)  # the run stops at 30 of the schedule's 50 steps
    full = optim.learning_rate_schedule(cfg, 50)
    np.testing.assert_allclose([float(schedule(t)) for t in (0, 9, 29)], [float(full(t)) for t in (0, 9, 29)])
    assert float(schedule(29)) > 0.4  # mid-way down, not at the end of a 30-step cycle


def test_adam_l2_with_onecycle_matches_pytorch_adam_updates():
    """make_optimizer('adam_l2', 'onecycle', two lr groups) against torch.optim.Adam(weight_decay) +
    OneCycleLR(max_lr=[lr, gcn_lr]) over 12 steps: coupled decay on matrices only, b1 cycling,
    per-group learning rates, bias correction with a changing b1."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,)), "gcn": rng.normal(size=(2, 2))}
    grads = [{k: rng.normal(size=v.shape) for k, v in init.items()} for _ in range(12)]
    lr, gcn_lr, wd, n = 0.05, 0.2, 0.1, 20
    cfg = _cfg(name="adam_l2", learning_rate=lr, schedule="onecycle", weight_decay=wd, eps=1e-8)
    tx, _ = optim.make_optimizer(cfg, n, lr_multipliers=(("^gcn$", gcn_lr / lr),))
    p = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
    state = tx.init(p)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    groups = [{"params": [tp["b"]], "weight_decay": 0.0}, {"params": [tp["w"]], "weight_decay": wd},
              {"params": [tp["gcn"]], "weight_decay": wd}]
    opt = torch.optim.Adam(groups, lr=lr, eps=1e-8, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr, gcn_lr], total_steps=n, pct_start=0.2)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
        for k, v in g.items():
            tp[k].grad = torch.tensor(v)
        opt.step()
        sched.step()
    for k in init:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_coupled_and_decoupled_decay_differ_as_expected():
    """One step, p = 2, g = 0.5, lr = 0.1, wd = 0.1, b1 = 0.9, b2 = 0.999, eps ~ 0 (bias-corrected first
    step: Adam(x) = x / |x|). adamw: u = -lr (g/|g| + wd p) = -0.1 (1 + 0.2) = -0.12;
    adam_l2: u = -lr (g + wd p) / |g + wd p| = -0.1 (0.7 / 0.7) = -0.1. A zero gradient: adamw still
    decays (-lr wd p = -0.02), adam_l2 normalises the decay term to a full step (-0.1). Vectors: no decay."""
    p = {"m": jnp.full((2, 2), 2.0), "v": jnp.full((2,), 2.0)}
    out = {}
    for name in ("adamw", "adam_l2"):
        tx, _ = optim.make_optimizer(_cfg(name=name, learning_rate=0.1, weight_decay=0.1, eps=1e-12), 10)
        for g in (0.5, 0.0):
            out[name, g] = tx.update(jax.tree.map(lambda x: jnp.full(x.shape, g), p), tx.init(p), p)[0]
    np.testing.assert_allclose(out["adamw", 0.5]["m"], -0.12, rtol=1e-5)  # float32 bias correction
    np.testing.assert_allclose(out["adam_l2", 0.5]["m"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(out["adamw", 0.0]["m"], -0.02, rtol=1e-6)
    np.testing.assert_allclose(out["adam_l2", 0.0]["m"], -0.1, rtol=1e-5)
    for name in ("adamw", "adam_l2"):
        np.testing.assert_allclose(out[name, 0.5]["v"], -0.1, rtol=1e-5)
        np.testing.assert_allclose(out[name, 0.0]["v"], 0.0, atol=1e-12)


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="optimizer.name"):
        optim.make_optimizer(_cfg(name="lamb"), 10)

"""PYRA end to end: schedules and parameter counts from the spec, the trainable set, the separate
PYRA learning rate, init equivalence with the frozen backbone, validation, and the whole recipe."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pyra as pyra_config
from jdjax import tasks as jtasks
from jdjax import testing
from jdjax.nn.lora import fold_lora
from jdjax.tasks import pyra
from jdjax.train import optim


def config(arg="smoke", **overrides):
    cfg = pyra_config.get_config(arg)
    cfg.checkpoint.async_save = False
    cfg.update_from_flattened_dict(overrides)
    return cfg


# Compile speed only (these programs are tiny): backend optimization level 0 (~2x faster) and XLA's
# elemental fusion emitter instead of the MLIR one (~1.5x faster again on 2 cores).
FAST = testing.FAST_COMPILE
compiled = testing.compiled


def abstract_params(model, image_size):
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape))["params"])


def trainable_count(params) -> int:
    mask = optim.trainable_mask(params, pyra.TRAINABLE)
    return optim.count_params(params, mask)


@pytest.mark.parametrize("arg, low_tokens, high_tokens", [("vit_b16", 11, 5), ("vit_l16", 7, 5), ("vit_s16", 11, 5)])
def test_paper_token_counts(arg, low_tokens, high_tokens):
    cfg = config(arg, init_from="x.npz")
    assert pyra.build_model(cfg, "pyra", "low", 100).token_counts()[-1] == low_tokens
    high = pyra.build_model(cfg, "pyra", "high", 100).token_counts()
    assert high[-1] == high_tokens
    if arg == "vit_b16":  # spec §3.1
        assert high == [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]


def test_paper_trainable_parameter_counts():
    """Spec §5.9: PYRA ViT-B low = 294,912 LoRA + 27,834 PYRA + head (768 x K + K)."""
    cfg = config("vit_b16", init_from="x.npz")
    k = 100
    counts = {m: trainable_count(abstract_params(pyra.build_model(cfg, m, "low", k), 224)) for m in ("lora", "pyra")}
    head = 768 * k + k
    assert counts["lora"] == 294_912 + head
    assert counts["pyra"] == 294_912 + 27_834 + head


def test_only_lora_pyra_and_head_are_trainable():
    cfg = config()
    params = abstract_params(pyra.build_model(cfg, "pyra", "high", 10), cfg.data.image_size)
    mask = optim.trainable_mask(params, pyra.TRAINABLE)
    names = optim.path_names(params)
    trainable = sorted(n for n, t in zip(jax.tree.leaves(names), jax.tree.leaves(mask)) if t)
    assert trainable, "nothing is trainable"
    for name in trainable:
        assert "_lora/" in name or "/pyra_" in name or name.startswith("head/"), name
    frozen = [n for n, t in zip(jax.tree.leaves(names), jax.tree.leaves(mask)) if not t]
    assert any("attn/qkv/kernel" in n for n in frozen) and any("mlp/fc1" in n for n in frozen)


def primitive_dtypes(jaxpr) -> dict[str, set[str]]:
    """primitive name -> dtypes of its operands, over `jaxpr` and every sub-jaxpr (jit, remat, vmap bodies)."""
    out = {}
    for eqn in jaxpr.eqns:
        out.setdefault(eqn.primitive.name, set()).update(str(v.aval.dtype) for v in eqn.invars
                                                         if hasattr(v.aval, "dtype"))
        for sub in jax.tree.leaves(list(eqn.params.values()), is_leaf=lambda v: hasattr(v, "eqns")):
            for name, dtypes in (primitive_dtypes(sub) if hasattr(sub, "eqns") else {}).items():
                out.setdefault(name, set()).update(dtypes)
    return out


def test_bf16_compute_keeps_f32_parameters_matching_and_softmax():
    """model.dtype='bfloat16': float32 parameters, the matmuls in bf16, logits close to the float32
    model's at the same parameters; matching (argmax, sort), softmax (exp), PYRA's sigmoids and the
    merged sizes stay float32."""
    f32 = config()
    bf16 = config(**{"model.dtype": "bfloat16"})
    model32, model16 = (pyra.build_model(c, "pyra", "high", c.data.num_classes) for c in (f32, bf16))
    size = f32.data.image_size
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(4, size, size, 3)), jnp.float32)  # [B, S, S, 3]
    shapes = abstract_params(model16, size)  # the same tree as model32's
    assert {s.dtype for s in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    rng = np.random.default_rng(1)  # random values everywhere: LoRA B, W_D and the head are zero at init
    params = {"params": jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype),
                                     nn.meta.unbox(shapes))}
    run = lambda m: compiled(lambda p, x: m.apply(p, x, return_info=True), params, x)  # noqa: E731
    (logits32, _), (logits16, info16) = run(model32), run(model16)
    assert logits16.dtype == jnp.float32 and info16["tokens"].dtype == jnp.bfloat16
    assert info16["size"].dtype == jnp.float32 and info16["tokens"].shape[1] == model16.token_counts()[-1]
    scale = float(np.abs(logits32).max())
    np.testing.assert_allclose(logits16, logits32, atol=5e-2 * scale)
    dtypes = primitive_dtypes(jax.make_jaxpr(lambda p, x: model16.apply(p, x, return_info=True))(params, x).jaxpr)
    assert "bfloat16" in dtypes["dot_general"] and "bfloat16" in dtypes["conv_general_dilated"]
    for name in ("argmax", "sort", "exp", "logistic"):  # matching, softmax, PYRA's modulation
        assert "bfloat16" not in dtypes[name], (name, dtypes[name])


def test_pyra_learning_rate_reaches_the_pyra_weights():
    """One Adam step moves each parameter by ~lr; the PYRA weights must move by pyra_learning_rate."""
    cfg = config(**{"optimizer.schedule": "constant", "optimizer.warmup_steps": 0, "optimizer.grad_clip_norm": 0.0,
                    "optimizer.weight_decay": 0.0, "optimizer.learning_rate": 1e-3, "pyra_learning_rate": 1e-2})
    model = pyra.build_model(cfg, "pyra", "high", 10)
    # The update does not depend on the parameters' values (no weight decay): random ones of the model's
    # shapes, and one jitted update (op by op, init and the update of every leaf took ~1 min under load).
    shapes = nn.meta.unbox(abstract_params(model, cfg.data.image_size))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    tx, _ = optim.make_optimizer(cfg.optimizer, 10, pyra.TRAINABLE, pyra.lr_multipliers(cfg))
    grads = jax.tree.map(jnp.ones_like, params)
    updates = jax.device_get(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params))
    step = {n: float(np.max(np.abs(u))) for n, u in zip(jax.tree.leaves(optim.path_names(params)), jax.tree.leaves(updates))}
    for name, size in step.items():
        if "/pyra_" in name:
            assert size == pytest.approx(1e-2, rel=1e-3), name
        elif "_lora/" in name or name.startswith("head/"):
            assert size == pytest.approx(1e-3, rel=1e-3), name
        else:
            assert size == 0.0, name
    assert pyra.lr_multipliers(config()) == ()  # 0 = the base rate: no extra group


def test_transfer_model_at_init_equals_frozen_backbone_with_merging(tmp_path):
    """Spec §5.10: LoRA B = 0 and W_D = 0, so PYRA+LoRA on a loaded backbone computes exactly the
    backbone with ToMe merging (and the new head)."""
    from jdjax.nn import convert

    cfg = config()
    size, k = cfg.data.image_size, cfg.data.num_classes
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, size, size, 3)), jnp.float32)
    backbone = pyra.build_model(cfg, "tome", "high", k, lora=False)
    # Each step one compiled program (FAST): op by op, every new primitive shape compiled on its own
    # took ~1 min under load.
    backbone_params = nn.meta.unbox(compiled(backbone.init, jax.random.key(1), x[:1])["params"])
    kwargs = dict(num_classes=k, image_size=size, **pyra.model_dims(cfg.model))
    convert.save_converted(convert.Converted(jax.device_get(backbone_params), "ViT", kwargs, "jdjax"), str(tmp_path / "bb"))
    task = pyra.transfer_task(cfg, "pyra", "high", str(tmp_path / "bb"), log=lambda *_: None)
    loaded = nn.meta.unbox(task.load_pretrained({"params": compiled(task.init, jax.random.key(2))})["params"])
    model = pyra.build_model(cfg, "pyra", "high", k)
    head = {"head": loaded["head"]}
    want = compiled(backbone.apply, {"params": {**backbone_params, **head}}, x)
    model_apply = jax.jit(model.apply).lower({"params": loaded}, x).compile(FAST)
    got = model_apply({"params": loaded}, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and LoRA folds away exactly too once trained weights are non-zero
    trained = jax.tree.map(lambda p: p + 0.05, loaded)
    folded = fold_lora(trained)
    dense = pyra.build_model(cfg, "pyra", "high", k, lora=False)
    np.testing.assert_allclose(compiled(dense.apply, {"params": folded}, x), model_apply({"params": trained}, x), atol=2e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "pyra,dense"}, "method="),
        ({"compression": "medium"}, "compression="),
        ({"schedules.high": (5, 2, 1)}, "50% clamp"),
        ({"schedules.low": (1, 1, 1, 1)}, "entries for a 3-layer model"),
        ({"model.lora_rank": 0}, "lora_rank"),
        ({"pyra_learning_rate": -1.0}, "pyra_learning_rate"),
    ],
)
def test_validation_names_the_problem(overrides, message):
    errors = jtasks.validate(config(**overrides))
    assert any(message in e for e in errors), errors


def test_paper_model_needs_init_from():
    errors = jtasks.validate(config("vit_b16"))
    assert any("init_from" in e for e in errors), errors


@pytest.mark.slow  # the same recipe is CI's README command 1; this adds the rerun check
def test_recipe_end_to_end_and_rerun_skips_finished_runs(tmp_path):
    workdir = str(tmp_path)
    proc = testing.run_main("configs/pyra.py:smoke", workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "comparison.json")) as f:
        rows = {r["run"]: r for r in json.load(f)}
    assert sorted(rows) == ["lora", "pyra-high"]
    assert rows["lora"]["final_tokens"] == 10 and rows["pyra-high"]["final_tokens"] == 3
    assert rows["pyra-high"]["gmacs"] < rows["lora"]["gmacs"]
    assert rows["pyra-high"]["trainable_params"] > rows["lora"]["trainable_params"]
    for r in rows.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0
    assert os.path.exists(os.path.join(workdir, "pretrain", "backbone", "model.json"))
    assert "| pyra-high |" in proc.stdout
    rerun = testing.run_main("configs/pyra.py:smoke", workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "pyra: " not in rerun.stdout.split("| run |")[0], "finished runs must not train again"

"""CLIP contrastive task: the loss against a NumPy InfoNCE, captions and tokens, a smoke run through the
generic loop, FSDP on 8 devices equals 1 device, and the real CLIP shapes resolve FSDP-sharded
without allocating."""

import json
import math
import os
import subprocess

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import clip as clip_configs
from jdjax import tasks as jtasks
from jdjax import testing
from jdjax.nn.clip import clip_config
from jdjax.tasks import contrastive
from jdjax.train import loop
from jdjax.train import sharding as shd
from jdjax.train.checkpoint import read_state
from jdjax.train.optim import count_params

SMOKE = "configs/clip.py:smoke"
# As in tests/train/test_loop.py: Adam divides by sqrt(v) + eps, and the attention key bias has a
# true gradient of exactly 0 (softmax ignores it), so its gradient is float noise whose sign differs
# between device counts; with eps=1e-8 Adam turns that noise into learning-rate-sized steps. eps=1e-6
# (also CLIP's own value and this config's default, passed explicitly so the test does not depend on
# it) keeps the comparison about the arithmetic, not about amplified noise.
DEVICE_COMPARISON = ("--config.num_train_steps=10", "--config.optimizer.eps=1e-6")
# Speed only, for both runs alike: no TensorBoard events (tensorboardX imports torch, ~4 s per run; the
# metrics.jsonl is written either way and nothing here reads the events), and XLA's backend at
# optimization level 0 with the elemental fusion emitter (the programs compile ~3x faster; the same
# computation, less optimized code).
FAST_RUN = ("--config.logging.tensorboard=False",)


def config(arg="smoke"):
    cfg = clip_configs.get_config(arg)
    cfg.checkpoint.async_save = False
    return cfg


# ------------------------------------------------------------------------------------------- loss


@jax.jit
def jitted_loss(image, text, logit_scale):
    return contrastive.contrastive_loss(contrastive.clip_logits(image, text, logit_scale))


def numpy_info_nce(image, text, logit_scale):
    """Plain NumPy reference: normalise, scale by min(exp(s), 100), mean of the two cross-entropies."""
    u = image / np.linalg.norm(image, axis=1, keepdims=True)
    v = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = min(math.exp(logit_scale), 100.0) * u @ v.T
    i2t = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(len(u))])
    t2i = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(len(u))])
    return (i2t + t2i) / 2


@pytest.mark.parametrize("logit_scale", [0.0, math.log(1 / 0.07), math.log(100.0) + 1.0])
def test_loss_matches_numpy_reference(logit_scale):
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(2, 8, 4))
    got = jitted_loss(image, text, jnp.float32(logit_scale))
    np.testing.assert_allclose(got, numpy_info_nce(image, text, logit_scale), rtol=1e-5)


def test_loss_properties():
    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(2, 8, 4)).astype(np.float32)
    loss = lambda i, t, s=2.0: float(jitted_loss(i, t, jnp.float32(s)))
    # Symmetric in the two modalities; invariant to embedding norms and to a joint permutation of the pairs.
    np.testing.assert_allclose(loss(image, text), loss(text, image), rtol=1e-6)
    np.testing.assert_allclose(loss(3.0 * image, 0.5 * text), loss(image, text), rtol=1e-5)
    perm = rng.permutation(8)
    np.testing.assert_allclose(loss(image[perm], text[perm]), loss(image, text), rtol=1e-5)
    # Aligned pairs beat random ones, and more so at a higher temperature scale; at scale 1 with equal
    # logits the loss is log(B).
    assert loss(image, image) < loss(image, text)
    assert loss(image, image, 4.0) < loss(image, image, 2.0)
    np.testing.assert_allclose(loss(np.ones((8, 4)), np.ones((8, 4)), 0.0), math.log(8), rtol=1e-6)
    # The clamp: beyond log(100) the scale (and so the loss) no longer changes, and has no gradient.
    np.testing.assert_allclose(loss(image, text, 5.0), loss(image, text, 7.0), rtol=1e-6)
    grad = jax.jit(jax.grad(jitted_loss, argnums=2))(image, text, jnp.float32(6.0))
    assert float(grad) == 0.0


def test_captions_and_tokens():
    labels = np.arange(40) % 10
    caps = contrastive.captions(labels, "train", seed=0)
    assert caps == contrastive.captions(labels[:20], "train", seed=0) + caps[20:]  # per-index, not per-split-size
    assert len(set(caps)) > 10  # several templates
    names = contrastive.class_names()
    assert names[3] == "solid ring" and names[8] == "striped ring"
    assert all(names[y] in c for y, c in zip(labels, caps))
    tok = contrastive.make_tokenizer(config().data)
    ids = tok(caps, 16)  # [40, 16]
    assert ids.dtype == np.int32 and ids.shape == (40, 16)
    assert (ids[:, 0] == tok.sot_token_id).all()
    # CLIP's text tower pools at argmax(ids): that must be the EOT position, followed by padding 0.
    eot = ids.argmax(-1)
    assert (ids[np.arange(40), eot] == tok.eot_token_id).all()
    assert all((row[e + 1:] == 0).all() and (row[1:e] > 1).all() for row, e in zip(ids, eot))
    assert tok.decode(ids[3]) == caps[3].lower().replace(".", " .")


# ---------------------------------------------------------------------------------- runs (subprocess)


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory):
    """The smoke config for 10 steps on 1 device and, with `fsdp`, on 8 devices; run side by side."""
    dirs = {n: str(tmp_path_factory.mktemp(n)) for n in ("one", "eight")}

    procs = {
        n: subprocess.Popen(testing.main_command(config_arg, dirs[n], *DEVICE_COMPARISON, *FAST_RUN),
                            cwd=testing.REPO_ROOT, env=testing.subprocess_env(devices, fast_compile=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
        for n, config_arg, devices in (("one", SMOKE, 1), ("eight", SMOKE + ",fsdp", 8))
    }
    outs = {n: p.communicate(timeout=600) for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, outs[n][1][-3000:]
    return dirs, {n: o[0] for n, o in outs.items()}


def test_smoke_run_reports_val_and_test(device_runs):
    dirs, _ = device_runs
    with open(os.path.join(dirs["one"], "results.json")) as f:
        results = json.load(f)
    assert results["status"] == "completed" and results["step"] == 10
    assert results["selected_by"] == "val/zero_shot_accuracy"
    for split in ("val", "test"):
        assert 0.0 <= results[f"{split}/zero_shot_accuracy"] <= 1.0
        assert math.isfinite(results[f"{split}/loss"]) and results[f"{split}/loss"] > 0
        assert results[f"{split}/count"] == 64.0
        for key in ("image_to_text_r1", "text_to_image_r1"):
            assert 0.0 <= results[f"{split}/{key}"] <= 1.0


def test_fsdp_eight_devices_match_one(device_runs):
    dirs, stdout = device_runs
    assert "mesh {'data': 1, 'fsdp': 8, 'model': 1}; 8 devices" in stdout["eight"]
    one, eight = read_state(dirs["one"]), read_state(dirs["eight"])
    assert int(eight["step"]) == 10
    chex.assert_trees_all_close(eight["params"], one["params"], rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(eight["opt_state"], one["opt_state"], rtol=2e-3, atol=1e-6)


def test_fsdp_run_really_shards_the_kernels():
    """The shardings the 8-device run uses (loop.compile_task on the same config): the widths of the big
    kernels and their Adam moments are split 8 ways over `fsdp`, and each device holds 1/8 of them."""
    assert jax.device_count() == 8
    cfg = config("smoke,fsdp")
    c = loop.compile_task(cfg, contrastive.build(cfg))
    p = c.param_sh
    assert p["visual"]["block0"]["attn"]["qkv"]["kernel"].spec == PartitionSpec("fsdp", None, None, None)
    assert p["text"]["token_embedding"]["embedding"].spec == PartitionSpec(None, "fsdp")
    assert p["visual"]["proj"].spec == PartitionSpec("fsdp", None)
    assert p["logit_scale"].spec == PartitionSpec()
    state = c.init_state()
    kernel = state.params["text"]["block0"]["mlp"]["fc1"]["kernel"]  # [D=32, 4D]
    assert kernel.sharding.spec[0] == "fsdp"
    assert {s.data.shape for s in kernel.addressable_shards} == {(32 // 8, kernel.shape[1])}
    mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == kernel.shape]
    assert mu and all(m.sharding.spec[0] == "fsdp" for m in mu)


# ------------------------------------------------------------------------------ real shapes, abstract


def test_clip_b16_variant_validates():
    cfg = config("clip_b16,fsdp")
    assert jtasks.validate(cfg) == []
    assert contrastive.model_kwargs(cfg, 100) == {**contrastive.model_kwargs(cfg, 100), **clip_config("ViT-B/16")}


def test_clip_l14_shapes_resolve_fsdp_sharded_without_allocating():
    cfg = config("clip_l14,fsdp")
    assert jtasks.validate(cfg) == []
    mesh = shd.make_mesh(dict(cfg.mesh))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "model": 1}
    rules = shd.rules_from_config(cfg.sharding_rules)
    boxed, shardings = contrastive.abstract_params(cfg, mesh, rules)  # jax.eval_shape: nothing allocated
    params = nn.meta.unbox(boxed)
    assert count_params(params) == 427_616_513  # OpenAI's ViT-L/14 CLIP
    width = contrastive.model_dims(cfg.model)["vision_width"]  # 1024: L/14's, from model.name
    assert params["visual"]["block0"]["mlp"]["fc1"]["kernel"].shape == (width, 4 * width)
    sharded = [(s.spec, x.shape) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)) if x.size > 1e6]
    assert sharded and all("fsdp" in spec for spec, _ in sharded)
    for spec, shape in sharded:  # every split dimension divides over the 8 devices
        assert all(n % 8 == 0 for n, axis in zip(shape, spec) if axis == "fsdp")

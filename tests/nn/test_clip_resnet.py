"""CLIP's ResNet image tower (jdjax/nn/clip_resnet.py) inside `CLIP`: parity with open_clip and OpenAI.

No download: the references are built from configs with random weights: open_clip's `CLIP` with its
`ModifiedResNet` tower, and OpenAI's own `clip/model.py` (from the `openai-clip` package, loaded from its
file: `clip/__init__` imports more than the model needs). Every parameter gets noise and every
BatchNorm random running statistics, so no weight keeps its structured init. A reduced ResNet (one
Bottleneck per stage, stem width 16, 64 px images: a 2x2 attention-pool grid) keeps the tests fast;
the full RN50 at 224 px is the `slow` test.
"""

import importlib.util
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jdjax.nn import convert as cv
from jdjax.nn.clip import CLIP, clip_config
from jdjax.nn.clip_resnet import ModifiedResNet
from jdjax.nn.vit import MergeConfig
from jdjax.testing import random_images, randomize_torch, torch_nchw, torch_numpy
from jdjax.train import sharding as shd

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

LAYERS, WIDTH, IMAGE, EMBED = (1, 1, 1, 1), 16, 64, 24
HEADS = WIDTH * 32 // 64  # OpenAI's attention-pool heads
VOCAB, CTX, TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS = 50, 8, 32, 2, 2
TINY = dict(embed_dim=EMBED, image_size=IMAGE, patch_size=None, vision_width=WIDTH, vision_layers=LAYERS,
            vision_heads=HEADS, context_length=CTX, vocab_size=VOCAB, text_width=TEXT_WIDTH, text_layers=TEXT_LAYERS,
            text_heads=TEXT_HEADS)


def _relative_close(ours, ref, tol=1e-4):
    """|ours - ref| <= tol * (max |ref| + |ref|): 1e-4 relative to the feature scale."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.abs(ref).max())


def _randomize(model, seed=0):
    """Noise on every parameter (randomize_torch) and random BatchNorm running statistics; eval mode."""
    randomize_torch(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def _open_clip_model(quick_gelu=False, layers=LAYERS, width=WIDTH, image=IMAGE, seed=0):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        EMBED, vision_cfg=dict(layers=list(layers), width=width, image_size=image, patch_size=None),
        text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=TEXT_WIDTH, heads=TEXT_HEADS, layers=TEXT_LAYERS),
        quick_gelu=quick_gelu,
    )
    return _randomize(model, seed)


def _openai_model_module():
    """OpenAI's clip/model.py, loaded from its file in the `openai-clip` package."""
    spec = importlib.util.find_spec("clip")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.py") if spec else None
    if not path or not os.path.exists(path):
        pytest.fail("OpenAI's clip/model.py is not installed; install the test extra: pip install -e '.[test]'.")
    module_spec = importlib.util.spec_from_file_location("_openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _ids(seed=0):
    """SOT 48, random words, EOT 49 (the largest id), padding 0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((3, CTX), np.int64)
    for i, n in enumerate([3, 8, 5]):
        ids[i, 0], ids[i, 1 : n - 1], ids[i, n - 1] = 48, rng.integers(1, 48, size=n - 2), 49
    return ids


@pytest.fixture(scope="module")
def reference():
    return _open_clip_model()


@pytest.fixture(scope="module")
def converted(reference):
    return cv.from_open_clip(reference.state_dict(), text_heads=TEXT_HEADS)


@pytest.fixture(scope="module")
def apply_fns():
    """Jitted CLIP applies per (config, method, train), compiled once per module."""
    cache = {}

    def get(config, method=None, train=False, return_info=False):
        key = (tuple(sorted(config.items())), method, train, return_info)
        if key not in cache:
            model = CLIP(**config)
            fn = getattr(CLIP, method) if method else CLIP.__call__
            kw = dict(train=train, **({"return_info": True} if return_info else {}))
            mutable = ["batch_stats"] if train else False
            cache[key] = jax.jit(lambda v, *a: model.apply(v, *a, method=fn, mutable=mutable, **kw))
        return cache[key]

    return get


def _variables(c):
    return jax.tree.map(jnp.asarray, c.variables())


# ----------------------------------------------------------------------------- configs and layout


def test_clip_config_resnets():
    rn50 = clip_config("RN50")
    assert rn50["vision_layers"] == (3, 4, 6, 3) and rn50["patch_size"] is None
    assert (rn50["embed_dim"], rn50["vision_width"], rn50["vision_heads"], rn50["image_size"]) == (1024, 64, 32, 224)
    assert (rn50["text_width"], rn50["text_heads"], rn50["text_layers"], rn50["context_length"]) == (512, 8, 12, 77)
    assert clip_config("RN101")["vision_layers"] == (3, 4, 23, 3)
    x4 = clip_config("RN50x4")
    assert (x4["embed_dim"], x4["image_size"], x4["vision_width"], x4["vision_heads"], x4["text_heads"]) == (
        640, 288, 80, 40, 10)
    assert isinstance(CLIP(**rn50).vision_tower(embed_dim=1024, image_size=224, width=64, depth=(3, 4, 6, 3),
                                                num_heads=32), ModifiedResNet)


def test_rn50_parameter_count_matches_open_clip():
    """Shapes only (traced): the RN50 CLIP has exactly open_clip's parameters and BatchNorm buffers."""
    model = CLIP(**clip_config("RN50"))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                                             jnp.zeros((1, 77), jnp.int32))))
    count = lambda tree: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))  # noqa: E731
    ref = open_clip.create_model("RN50", pretrained=None)
    buffers = sum(b.numel() for n, b in ref.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert count(shapes["params"]) == sum(p.numel() for p in ref.parameters()) == 102_007_137
    assert count(shapes["batch_stats"]) == buffers
    visual = shapes["params"]["visual"]
    assert visual["attnpool"]["positional_embedding"].shape == (50, 2048)
    assert visual["attnpool"]["q_proj"]["kernel"].shape == (2048, 32, 64)
    assert visual["attnpool"]["c_proj"]["kernel"].shape == (32, 64, 1024)
    assert visual["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert "downsample_conv" in visual["layer2_0"] and "downsample_conv" not in visual["layer2_1"]


def test_logical_axes_are_in_the_vocabulary():
    model = ModifiedResNet(LAYERS, EMBED, HEADS, IMAGE, WIDTH)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3))))["params"]
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    names = {a for spec in specs for a in spec if a is not None}
    assert names and names <= set(shd.LOGICAL_AXES)
    assert all(len(s) for s in specs)  # every parameter is annotated


def test_vit_only_options_are_rejected():
    images, ids = jnp.zeros((1, IMAGE, IMAGE, 3)), jnp.zeros((1, CTX), jnp.int32)
    with pytest.raises(ValueError, match=r"ResNet image tower .* \['merge'\]"):
        jax.eval_shape(lambda: CLIP(**TINY, merge=MergeConfig(r=1)).init(jax.random.key(0), images, ids))
    with pytest.raises(ValueError, match="no token sequence"):
        CLIP(**TINY).token_counts()
    with pytest.raises(ValueError, match="4 stages"):
        jax.eval_shape(lambda: ModifiedResNet((1, 1, 1)).init(jax.random.key(0), images))


# ----------------------------------------------------------------------------- parity


def test_open_clip_parity(reference, converted, apply_fns):
    """Eval mode (running statistics): image, text features and logits of open_clip's RN CLIP."""
    cfg = converted.config
    assert cfg["vision_layers"] == LAYERS and (cfg["vision_width"], cfg["vision_heads"]) == (WIDTH, HEADS)
    assert (cfg["image_size"], cfg["embed_dim"], cfg["activation"]) == (IMAGE, EMBED, "gelu")
    assert set(converted.dropped) == {k for k in reference.state_dict() if k.endswith("num_batches_tracked")}
    images, ids = random_images((2, IMAGE, IMAGE, 3)), _ids()
    with torch.no_grad():
        ref_image = reference.encode_image(torch_nchw(images))
        ref_text = reference.encode_text(torch.from_numpy(ids))
        ref_logits, _ = reference.get_logits(torch_nchw(images), torch.from_numpy(ids))
        ref_tokens = reference.visual.forward_intermediates(torch_nchw(images), indices=[4],
                                                            intermediates_only=True)["image_intermediates"][0]
    out = apply_fns(cfg)(_variables(converted), images, jnp.asarray(ids, jnp.int32))
    chex.assert_shape(out["image_embeds"], (2, EMBED))
    assert out["image_embeds"].dtype == jnp.float32
    _relative_close(out["image_embeds"], torch_numpy(ref_image))
    _relative_close(out["text_embeds"], torch_numpy(ref_text))
    _relative_close(out["logits_per_image"], torch_numpy(ref_logits))
    _, info = apply_fns(cfg, "encode_image", return_info=True)(_variables(converted), images)
    chex.assert_shape(info["tokens"], (2, (IMAGE // 32) ** 2, 32 * WIDTH))
    _relative_close(info["tokens"], torch_numpy(ref_tokens).transpose(0, 2, 3, 1).reshape(2, -1, 32 * WIDTH))


def test_train_mode_matches_and_updates_batch_stats(reference, converted, apply_fns):
    """train=True: batch statistics in every BatchNorm (as torch's train mode); the running means move
    exactly as torch's (momentum 0.1), the variances by the biased batch variance (torch: unbiased)."""
    images = random_images((2, IMAGE, IMAGE, 3), seed=1)
    visual = _open_clip_model(seed=0).visual.train()  # a fresh copy of the reference's weights
    with torch.no_grad():
        ref = visual(torch_nchw(images))
    variables = _variables(converted)
    out, state = apply_fns(converted.config, "encode_image", train=True)(variables, images)
    _relative_close(out, torch_numpy(ref))
    old = variables["batch_stats"]["visual"]
    new = state["batch_stats"]["visual"]
    for path, bn in (("bn1", visual.bn1), ("layer3_0/bn2", visual.layer3[0].bn2)):
        *blocks, leaf = path.split("/")
        before, after = old, new
        for b in blocks + [leaf]:
            before, after = before[b], after[b]
        _relative_close(after["mean"], torch_numpy(bn.running_mean), tol=1e-5)
        n = images.shape[0] * np.prod(_bn_input_hw(path))
        torch_step = torch_numpy(bn.running_var) - 0.9 * np.asarray(before["var"])
        _relative_close(torch_step, (np.asarray(after["var"]) - 0.9 * np.asarray(before["var"])) * n / (n - 1))
    assert not np.allclose(new["layer4_0"]["bn3"]["mean"], old["layer4_0"]["bn3"]["mean"])
    # the joint model in training mode: the same image features, the same statistics (the text tower has none)
    joint, joint_state = apply_fns(converted.config, train=True)(variables, images, jnp.asarray(_ids()[:2], jnp.int32))
    _relative_close(joint["image_embeds"], out, tol=1e-6)
    assert list(joint_state["batch_stats"]) == ["visual"]
    jax.tree.map(lambda a, b: _relative_close(a, b, tol=1e-6), joint_state["batch_stats"], state["batch_stats"])


def _bn_input_hw(path):
    """Pixels per image that the BatchNorm at `path` normalises (64 px input)."""
    return {"bn1": (IMAGE // 2, IMAGE // 2), "layer3_0/bn2": (IMAGE // 8, IMAGE // 8)}[path]


def test_openai_layout_round_trip(tmp_path, apply_fns):
    """OpenAI's own clip/model.py (QuickGELU): its state dict, with the archive's scalar entries, through the
    converter, the converted directory (params/ + batch_stats/) and load_converted."""
    openai = _openai_model_module()
    torch.manual_seed(3)
    ref = _randomize(openai.CLIP(EMBED, IMAGE, LAYERS, WIDTH, None, CTX, VOCAB, TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS),
                     seed=3)
    sd = dict(ref.state_dict())
    sd.update(input_resolution=torch.tensor(IMAGE), context_length=torch.tensor(CTX), vocab_size=torch.tensor(VOCAB))
    path = tmp_path / "RN-tiny.pt"
    torch.save(sd, path)
    dst = tmp_path / "converted"
    cv.save_converted(cv.convert(str(path), "openai_clip", text_heads=TEXT_HEADS), str(dst))
    assert sorted(os.listdir(dst)) == ["batch_stats", "model.json", "params"]
    trees, kwargs = cv.load_converted(str(dst))
    assert set(trees) == {"params", "batch_stats"} and kwargs["vision_layers"] == LAYERS
    assert kwargs["activation"] == "quick_gelu" and kwargs["vision_heads"] == HEADS
    dropped = set(cv.read_info(str(dst))["dropped"])
    assert {"input_resolution", "context_length", "vocab_size", "visual.bn1.num_batches_tracked"} <= dropped
    images, ids = random_images((2, IMAGE, IMAGE, 3), seed=2), _ids(1)
    with torch.no_grad():
        ref_image = ref.encode_image(torch_nchw(images))
        ref_text = ref.encode_text(torch.from_numpy(ids))
    out = apply_fns(kwargs)(jax.tree.map(jnp.asarray, trees), images, jnp.asarray(ids, jnp.int32))
    _relative_close(out["image_embeds"], torch_numpy(ref_image))
    _relative_close(out["text_embeds"], torch_numpy(ref_text))
    # the same weights in open_clip names convert to the same trees
    oc = cv.from_open_clip(ref.state_dict(), activation="quick_gelu", text_heads=TEXT_HEADS)
    jax.tree.map(np.testing.assert_array_equal, oc.variables(), trees)
    # a raw source through load_converted gives the same {'params', 'batch_stats'} form
    raw, raw_kwargs = cv.load_converted(str(path), "openai_clip", text_heads=TEXT_HEADS)
    assert raw_kwargs == kwargs
    jax.tree.map(np.testing.assert_array_equal, raw, trees)


def test_cli_reports_batch_statistics(reference, tmp_path, capsys):
    from jdjax.tools.convert import cli

    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, path)
    dst = tmp_path / "out"
    assert cli(["convert", "--format=open_clip", f"--src={path}", f"--dst={dst}", "--model=RN50-quickgelu"]) == 2
    assert "(1, 1, 1, 1) blocks per ResNet stage but the chosen model" in capsys.readouterr().err
    assert cli(["convert", "--format=open_clip", f"--src={path}", f"--dst={dst}", f"--text_heads={TEXT_HEADS}"]) == 0
    out = capsys.readouterr().out
    stats = sum(v.numel() for k, v in reference.state_dict().items() if k.endswith(("running_mean", "running_var")))
    assert f"{sum(p.numel() for p in reference.parameters()):,} parameters" in out
    assert f"{stats:,} BatchNorm statistics" in out


# ----------------------------------------------------------------------------- converter errors


def test_resnet_converter_errors_name_the_tensor(reference):
    sd = dict(reference.state_dict())
    bad = {**sd, "visual.layer2.0.bn1.running_var": torch.ones(WIDTH * 2 + 1)}
    with pytest.raises(cv.ConversionError, match=r"^open_clip key 'visual\.layer2\.0\.bn1\.running_var' has shape "
                                                 rf"\({WIDTH * 2 + 1},\), but .* needs shape \({WIDTH * 2},\) there "
                                                 r"\(jdjax batch statistic 'visual/layer2_0/bn1/var'"):
        cv.from_open_clip(bad, text_heads=TEXT_HEADS)
    missing = {k: v for k, v in sd.items() if k != "visual.layer3.0.downsample.1.running_mean"}
    with pytest.raises(cv.ConversionError, match=r"no key 'visual\.layer3\.0\.downsample\.1\.running_mean' "
                                                 r"\(needed for jdjax batch statistic 'visual/layer3_0/downsample_bn/"):
        cv.from_open_clip(missing, text_heads=TEXT_HEADS)
    bad = {**sd, "visual.layer1.0.conv2.weight": torch.zeros(WIDTH, WIDTH, 5, 5)}
    with pytest.raises(cv.ConversionError, match=r"'visual\.layer1\.0\.conv2\.weight' has shape \(16, 16, 5, 5\), "
                                                 r"but .* needs shape \(16, 16, 3, 3\)"):
        cv.from_open_clip(bad, text_heads=TEXT_HEADS)
    with pytest.raises(cv.ConversionError, match=r"has vision_layers=\(3, 4, 6, 3\)"):
        cv.from_open_clip(sd, model="RN50")


# ----------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_rn50_at_224_matches_open_clip():
    """The real RN50 (3, 4, 6, 3) x 64 at 224 px, random weights and statistics, eval mode."""
    torch.manual_seed(0)
    ref = open_clip.create_model("RN50", pretrained=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # small noise: the 50-layer product of random weights stays finite
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    ref.eval()
    c = cv.from_open_clip(ref.state_dict(), model="RN50")
    assert c.config == {**clip_config("RN50"), "ln_eps": 1e-5, "activation": "gelu", "eot_token_id": None,
                        "vision_mlp_dim": None, "text_mlp_dim": 2048}
    images = random_images((2, 224, 224, 3))
    with torch.no_grad():
        want = torch_numpy(ref.encode_image(torch_nchw(images)))
    model = CLIP(**c.config)
    got = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_image))(_variables(c), images)
    _relative_close(got, want)
    flat = traverse_util.flatten_dict(c.batch_stats, sep="/")
    assert len(flat) == 2 * sum(1 for n, m in ref.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow  # about 30 s: two compiled ResNets per mode
@pytest.mark.parametrize("mode", [True, False])
def test_traced_train_switch_equals_the_static_modes(mode):
    """A traced `train` (SCPNet's epoch switch inside one compiled step) gives the static mode's output
    and running-statistics update (the caller discards the update in eval mode)."""
    from jdjax.nn.clip_resnet import ModifiedResNet

    model = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = model.init(jax.random.key(0), x[:1])
    switched, stats = jax.jit(lambda v, x, t: model.apply(v, x, train=t, mutable=["batch_stats"]))(
        variables, x, jnp.asarray(mode))
    if mode:
        static, static_stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(static_stats)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        static = model.apply(variables, x, train=False)
    np.testing.assert_allclose(switched, static, rtol=1e-5, atol=1e-5)

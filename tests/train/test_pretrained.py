"""init_from (jdjax.train.pretrained): a pretrained ViT backbone merged into a fresh model with LoRA,
PYRA, a new head, scanned blocks, another resolution or boxed (logically partitioned) leaves.

The backbone is a random tiny jdjax ViT (no torch); the merged model must compute what the backbone
computes wherever the new parts are neutral.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jdjax.nn import convert as cv
from jdjax.nn.lora import LoRAConfig
from jdjax.nn.vit import MergeConfig, ViT
from jdjax.testing import random_images
from jdjax.train import pretrained as pt

WIDTH, HEADS, LAYERS, CLASSES = 32, 2, 2, 5
BACKBONE = dict(num_classes=CLASSES, patch_size=4, width=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_dim=64,
                image_size=16)


def _fresh(model, size=16, seed=5, unbox=True):
    """Random NumPy parameters of `model` (shapes traced, nothing compiled); boxed unless `unbox`."""
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]  # noqa: E731
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init()) if unbox else init())
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def backbone():
    return cv.Converted(_fresh(ViT(**BACKBONE), seed=0), "ViT", BACKBONE, "jdjax")


def _tokens(kwargs, params, images):
    return ViT(**kwargs).apply({"params": params}, images, return_info=True)[1]["tokens"]


def test_merge_backbone_into_lora_pyra_model(backbone):
    """PYRA recipe: pretrained backbone, fresh 3-class head, LoRA and PYRA leaves left alone."""
    kwargs = {**BACKBONE, "num_classes": 3, "lora": LoRAConfig(rank=2), "merge": MergeConfig(r=2, mode="pyra")}
    fresh = _fresh(ViT(**kwargs))
    with pytest.raises(cv.ConversionError, match=r"'head/kernel' has shape \(32, 5\).*\(32, 3\)"):
        pt.merge_pretrained(fresh, backbone.params)
    merged, report = pt.merge_pretrained(fresh, backbone.params, exclude=r"^head/")
    flat_m, flat_f, flat_p = (traverse_util.flatten_dict(t, sep="/") for t in (merged, fresh, backbone.params))
    assert set(report.loaded) == set(flat_p) - {"head/kernel", "head/bias"}
    assert set(report.excluded) == {"head/kernel", "head/bias"} and not report.unused
    assert any("qkv_lora" in k for k in report.kept) and any("pyra_w_r" in k for k in report.kept)
    assert set(report.kept) == set(flat_f) - set(flat_p)
    for k in report.loaded:
        np.testing.assert_array_equal(flat_m[k], flat_p[k])
    for k in report.kept + report.excluded:
        np.testing.assert_array_equal(flat_m[k], flat_f[k])
    assert "loaded" in report.summary()
    # with LoRA-B = 0 and no merging, the merged model's features are the backbone's
    plain = {**kwargs, "merge": MergeConfig()}
    fresh = {k: np.zeros_like(v) if k.endswith("qkv_lora/b") else v
             for k, v in traverse_util.flatten_dict(_fresh(ViT(**plain)), sep="/").items()}
    merged, _ = pt.merge_pretrained(traverse_util.unflatten_dict(fresh, sep="/"), backbone.params, exclude=r"^head/")
    images = random_images((2, 16, 16, 3))
    np.testing.assert_allclose(_tokens(plain, merged, images), _tokens(BACKBONE, backbone.params, images),
                               rtol=1e-5, atol=1e-5)


def test_merge_into_scanned_model_and_other_resolution(backbone):
    """Stacked `blocks` filled from block{i}; the 16 px position grid resized (bicubic) to 24 px, which
    equals the backbone resampling its positions on the fly."""
    kwargs = {**BACKBONE, "scan": True, "image_size": 24}
    merged, report = pt.merge_pretrained({"params": _fresh(ViT(**kwargs), size=24)}, backbone.params)
    assert report.resized == ["pos_embedding"] and not report.kept and not report.unused
    assert merged["params"]["blocks"]["attn"]["qkv"]["kernel"].shape == (LAYERS, WIDTH, 3, HEADS, WIDTH // HEADS)
    images = random_images((2, 24, 24, 3))
    logits = ViT(**kwargs).apply(merged, images)
    ref = ViT(**BACKBONE, pos_interpolation="bicubic").apply({"params": backbone.params}, images)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_boxed_leaves_keep_their_names(backbone):
    """Parameters as `init` returns them (nn.Partitioned leaves) stay boxed with their axis names."""
    fresh = _fresh(ViT(**BACKBONE), unbox=False)
    merged, report = pt.merge_pretrained(fresh, backbone.params)
    qkv = merged["block0"]["attn"]["qkv"]["kernel"]
    assert isinstance(qkv, nn.Partitioned) and qkv.names == fresh["block0"]["attn"]["qkv"]["kernel"].names
    np.testing.assert_array_equal(qkv.value, backbone.params["block0"]["attn"]["qkv"]["kernel"])
    assert len(report.loaded) == len(jax.tree.leaves(backbone.params)) and not report.kept


def test_make_load_pretrained(backbone, tmp_path):
    dst = cv.save_converted(backbone, str(tmp_path / "ckpt"))
    fresh = _fresh(ViT(**{**BACKBONE, "num_classes": 7}))
    logs = []
    merged = pt.make_load_pretrained(dst, log=logs.append)({"params": fresh})
    assert set(merged) == {"params"}
    np.testing.assert_array_equal(merged["params"]["cls"], backbone.params["cls"])
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], fresh["head"]["kernel"])
    assert len(logs) == 1 and "excluded" in logs[0]
    with pytest.raises(cv.ConversionError, match="not a converted checkpoint"):
        pt.make_load_pretrained(str(tmp_path))


@pytest.mark.parametrize("form", ["converter", "collections", "bare"])
def test_make_load_pretrained_loads_batch_stats(backbone, tmp_path, form):
    """BatchNorm statistics of a converted checkpoint (the converter's batch_stats, a tree
    {'params', 'batch_stats'}, or a top-level 'batch_stats' beside bare parameters) land in the
    model's 'batch_stats'; a model without that collection is told they went unused."""
    stats = {"bn": {"mean": np.full(4, 0.5, np.float32), "var": np.full(4, 2.0, np.float32)}}
    if form == "converter":
        converted = cv.Converted(backbone.params, "ViT", BACKBONE, "jdjax", batch_stats=stats)
    elif form == "collections":
        converted = cv.Converted({"params": backbone.params, "batch_stats": stats}, "ViT", BACKBONE, "jdjax")
    else:
        converted = cv.Converted({**backbone.params, "batch_stats": stats}, "ViT", BACKBONE, "jdjax")
    dst = cv.save_converted(converted, str(tmp_path / "ckpt"))
    fresh = _fresh(ViT(**BACKBONE))
    fresh_stats = {"bn": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)},
                   "other": {"mean": np.ones(2, np.float32)}}
    logs = []
    merged = pt.make_load_pretrained(dst, log=logs.append)({"params": fresh, "batch_stats": fresh_stats})
    assert set(merged) == {"params", "batch_stats"} and "batch_stats" not in merged["params"]
    np.testing.assert_array_equal(merged["params"]["cls"], backbone.params["cls"])
    np.testing.assert_array_equal(merged["batch_stats"]["bn"]["var"], stats["bn"]["var"])
    np.testing.assert_array_equal(merged["batch_stats"]["other"]["mean"], fresh_stats["other"]["mean"])
    assert "batch_stats: loaded 2" in logs[0]
    logs.clear()
    assert set(pt.make_load_pretrained(dst, log=logs.append)({"params": fresh})) == {"params"}
    assert "batch_stats: not in the model, 2 pretrained leaves unused" in logs[0]

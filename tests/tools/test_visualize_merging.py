"""Merge visualisation: PNG size, patch labels form a partition with one group per patch token."""

import os
import subprocess
import sys

import flax.linen as nn
import numpy as np
import pytest
from PIL import Image

from jdjax.nn.vit import MergeConfig, ViT
from jdjax.testing import REPO_ROOT, subprocess_env
from jdjax.tools import visualize_merging as vm

SIZE = 32  # 8x8 patches of 4 px + CLS = 65 tokens
TINY = dict(num_classes=0, patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=64, image_size=SIZE)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    model = ViT(**TINY, merge=MergeConfig(r=[20, 9, 6], trace_source=True))
    image = vm.resize_crop(vm.load_image("flower"), SIZE)
    out = str(tmp_path_factory.mktemp("vis") / "flower.png")
    info = vm.visualize(image, model, vm.random_params(model, SIZE), [0, 1, 2], out, weights_note=vm.RANDOM_NOTE)
    return model, image, out, info


def test_png_has_the_expected_size(drawn):
    _, _, out, info = drawn
    scale = -(-256 // SIZE)  # panels are upscaled to at least 256 px
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == vm.figure_size(4, SIZE * scale) == info["size"]  # input + 3 layers
    assert "RANDOM" in info["title"]


def test_labels_partition_patches_into_token_count(drawn):
    model, _, _, info = drawn
    counts = model.token_counts()
    assert counts == [65, 45, 36, 30]
    previous = np.arange(64).reshape(8, 8)
    for layer in (0, 1, 2):
        labels = info["labels"][layer]
        assert labels.shape == (8, 8) and labels.dtype == np.int32
        # every patch has exactly one label; the labels are exactly the N_l - 1 patch tokens
        assert sorted(np.unique(labels)) == list(range(counts[layer + 1] - 1))
        assert info["tokens"][layer] == counts[layer + 1]
        # merges only coarsen: patches that shared a token still share one
        for group in np.unique(previous):
            assert len(np.unique(labels[previous == group])) == 1
        previous = labels


def test_patch_labels_rejects_a_non_partition():
    source = np.eye(5, dtype=np.float32)[:4]  # patch 4 is covered by no token
    with pytest.raises(ValueError, match="partition"):
        vm.patch_labels(source, (2, 2))


def test_colours_and_boundaries():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:, :2] = 200  # left column of patches bright
    image[0, 2:] = 100
    labels = np.array([[0, 1], [0, 1]], np.int32)  # 2x2 patches of 2 px: left / right tokens
    np.testing.assert_allclose(vm.token_colours(image, labels), [[200, 200, 200], [25, 25, 25]])
    panel = vm.render_panel(image, labels, scale=2)  # [8, 8, 3]
    assert panel.shape == (8, 8, 3)
    np.testing.assert_array_equal(panel[:, 3], 255)  # boundary column left of the token edge
    np.testing.assert_array_equal(panel[:, 0], 200)
    np.testing.assert_array_equal(panel[:, 7], 25)


def test_flag_parsing():
    assert vm.parse_r("16") == 16
    assert vm.parse_r("16,-1") == (16, -1.0) and vm.parse_r("(16, 1)") == (16, 1.0)
    assert vm.parse_r("40,34,30") == [40, 34, 30] and vm.parse_r("8,8") == [8, 8] and vm.parse_r("[5]") == [5]
    with pytest.raises(vm.UsageError):
        vm.parse_r("sixteen")
    assert vm.default_layers(12) == [2, 5, 8, 11] and vm.default_layers(2) == [0, 1]
    assert vm.parse_layers("-1,0", 12) == [0, 11]
    with pytest.raises(vm.UsageError, match="0..11"):
        vm.parse_layers("12", 12)
    image = vm.resize_crop(vm.load_image("china"), 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    x = vm.normalize(image)
    assert x.min() >= -1 and x.max() <= 1


def test_params_from_a_converted_checkpoint(monkeypatch, tmp_path):
    """--params goes through jdjax.nn.convert.load_params (+ read_info for the architecture);
    a stand-in converter keeps this test independent of the real one's file format."""
    config = {**TINY, "num_classes": 7}
    params = nn.meta.unbox(vm.random_params(ViT(**config), SIZE))["params"]  # plain arrays, as the converter's
    monkeypatch.setattr(vm.convert, "load_params", lambda path: params)
    monkeypatch.setattr(vm.convert, "read_info", lambda path: {"model": "ViT", "config": config})
    ckpt = tmp_path / "tiny_ckpt"
    ckpt.mkdir()
    out = tmp_path / "ckpt.png"
    info = vm.run(image="china", r="20,9,6", layers="-1", out=str(out), params=str(ckpt), image_size=224)
    assert "RANDOM" not in info["title"] and str(ckpt) in info["title"]
    assert info["tokens"] == {2: 30}  # the checkpoint's 32 px resolution, not --image_size
    assert sorted(np.unique(info["labels"][2])) == list(range(29))
    with Image.open(out) as im:
        assert im.size == vm.figure_size(2, SIZE * 8)


def test_cli_bad_image_exits_2(tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "jdjax.tools.visualize_merging", "--image=/no/such.jpg", f"--out={out}"],
        check=False, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "neither a sample image" in proc.stderr and not os.path.exists(out)

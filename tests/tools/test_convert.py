"""The converter command line (`python -m jdjax.tools.convert`): flags -> `jdjax.nn.convert`, the
written directory, the printed summary and exit status 2 with one message on errors.

Parity of the conversions with PyTorch is tested in tests/nn/test_convert.py; here the sources are
random arrays in the Google npz layout and tiny random transformers models saved with save_pretrained,
and the command's output must equal the library's conversion of the same file.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jdjax.nn import convert as cv
from jdjax.testing import REPO_ROOT
from jdjax.tools.convert import cli

WIDTH, HEADS, MLP, LAYERS, CLASSES, PATCH, IMAGE = 32, 2, 64, 2, 5, 4, 16


def _run(*args):
    return cli(["convert", *args])


def _google_npz(path):
    """Random arrays in the google-research/vision_transformer layout of a tiny ViT (+ pre_logits)."""
    rng = np.random.default_rng(0)
    dh, tokens = WIDTH // HEADS, (IMAGE // PATCH) ** 2 + 1
    shapes = {"embedding/kernel": (PATCH, PATCH, 3, WIDTH), "embedding/bias": (WIDTH,), "cls": (1, 1, WIDTH),
              "Transformer/posembed_input/pos_embedding": (1, tokens, WIDTH),
              "Transformer/encoder_norm/scale": (WIDTH,), "Transformer/encoder_norm/bias": (WIDTH,),
              "head/kernel": (WIDTH, CLASSES), "head/bias": (CLASSES,),
              "pre_logits/kernel": (WIDTH, WIDTH), "pre_logits/bias": (WIDTH,)}
    for i in range(LAYERS):
        b = f"Transformer/encoderblock_{i}/"
        att = b + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[b + ln + "/scale"] = shapes[b + ln + "/bias"] = (WIDTH,)
        for name in ("query", "key", "value"):
            shapes[att + name + "/kernel"], shapes[att + name + "/bias"] = (WIDTH, HEADS, dh), (HEADS, dh)
        shapes[att + "out/kernel"], shapes[att + "out/bias"] = (HEADS, dh, WIDTH), (WIDTH,)
        for j, (d_in, d_out) in enumerate(((WIDTH, MLP), (MLP, WIDTH))):
            shapes[b + f"MlpBlock_3/Dense_{j}/kernel"], shapes[b + f"MlpBlock_3/Dense_{j}/bias"] = (d_in, d_out), (d_out,)
    np.savez(path, **{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})
    return str(path)


def _assert_same(dst, converted):
    params, kwargs = cv.load_converted(str(dst))
    assert kwargs == converted.config and cv.read_info(str(dst))["model"] == converted.model
    jax.tree.map(np.testing.assert_array_equal, params, converted.params)


def test_google_vit_npz(tmp_path, capsys):
    src = _google_npz(tmp_path / "ViT-tiny_4.npz")
    dst = tmp_path / "converted"
    assert _run("--format=google_vit_npz", f"--src={src}", f"--dst={dst}") == 0  # heads from [C, H, Dh]
    out = capsys.readouterr().out
    assert f"wrote {dst}: ViT(patch_size={PATCH}, width={WIDTH}" in out and "dropped source keys" in out
    _assert_same(dst, cv.convert(src, "google_vit_npz"))
    assert cv.read_info(str(dst))["source"] == src
    assert _run("--format=google_vit_npz", f"--src={src}", f"--dst={dst}") == 2  # exists: --overwrite replaces it
    assert "--overwrite" in capsys.readouterr().err
    assert _run("--format=google_vit_npz", f"--src={src}", f"--dst={dst}", "--overwrite") == 0


def test_hf_directories_and_head_flags(tmp_path):
    """save_pretrained directories; --num_heads / --text_heads go to the CLIP towers' head counts."""
    transformers = pytest.importorskip("transformers")
    tower = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    transformers.ViTModel(transformers.ViTConfig(image_size=IMAGE, patch_size=PATCH, **tower)).save_pretrained(
        tmp_path / "vit")
    assert _run("--format=hf_vit", f"--src={tmp_path / 'vit'}", f"--dst={tmp_path / 'vit_out'}") == 0
    _assert_same(tmp_path / "vit_out", cv.convert(str(tmp_path / "vit"), "hf_vit"))
    transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=50, max_position_embeddings=8, **tower),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, **tower), projection_dim=24,
    )).save_pretrained(tmp_path / "clip")
    assert _run("--format=hf_clip", f"--src={tmp_path / 'clip'}", f"--dst={tmp_path / 'clip_out'}",
                "--num_heads=4", "--text_heads=8") == 0
    _assert_same(tmp_path / "clip_out", cv.convert(str(tmp_path / "clip"), "hf_clip", vision_heads=4, text_heads=8))


def test_errors_exit_2(tmp_path, capsys):
    assert _run("--format=timm_vit", f"--src={tmp_path / 'missing.pth'}", f"--dst={tmp_path / 'x'}") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run("--format=bogus", "--src=a", "--dst=b") == 2
    assert _run("--format=timm_vit") == 2
    assert "--src is required" in capsys.readouterr().err
    assert _run("--format=timm_vit", "--src=a", "--dst=b", "--text_heads=2") == 2
    assert "CLIP formats only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    # the module entry point, in a subprocess (fails before jax is imported)
    proc = subprocess.run([sys.executable, "-m", "jdjax.tools.convert", "--format=timm_vit",
                           f"--src={tmp_path / 'missing.pth'}", f"--dst={tmp_path / 'x'}"],
                          capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def test_help():
    proc = subprocess.run([sys.executable, "-m", "jdjax.tools.convert", "--help"], capture_output=True, text=True,
                          check=False, cwd=REPO_ROOT)
    assert proc.returncode == 0 and "--format=" in proc.stdout and "--[no]allow_pickle" in proc.stdout

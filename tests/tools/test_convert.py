"""The converter command line (`python -m jdjax.tools.convert`): flags -> `jdjax.nn.convert`, the
written directory, the printed summary and exit status 2 with one message on errors.

Parity of the conversions with PyTorch is tested in tests/nn/test_convert.py; here the sources are
random arrays in the Google npz layout and tiny random transformers models saved with save_pretrained,
and the command's output must equal the library's conversion of the same file.
"""

import json
import os
import subprocess
import sys
import warnings

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


# ----------------------------------------------------------------------------- bad input files (issue 16)


def _assert_refused(tmp_path, capsys, args, *expected):
    """Exit status 2, one message containing `expected`, nothing at --dst (not even an empty directory)."""
    before = sorted(os.listdir(tmp_path))
    dst = tmp_path / "out" / "converted"
    assert _run(*args, f"--dst={dst}") == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m jdjax.tools.convert: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    assert sorted(os.listdir(tmp_path)) == before and not os.path.exists(tmp_path / "out")
    return err


def test_empty_src_is_one_line_exit_2(tmp_path):
    """An empty file used to end in torch's EOFError with an empty message and a 36-line IndexError traceback."""
    pytest.importorskip("torch")
    src = tmp_path / "ViT-B-32.pt"
    src.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "jdjax.tools.convert", "--format=open_clip", f"--src={src}",
                           f"--dst={tmp_path / 'out'}"], capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{src} is empty (0 bytes)" in proc.stderr and "fetch the file again" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["ViT-B-32.pt"]


def _torch_files(tmp_path):
    """{name: (path, format)}: one small complete file per format that the converters read."""
    torch = pytest.importorskip("torch")
    sd = {"a.weight": torch.ones(32, 32), "b": torch.zeros(32)}
    files = {"npz": (_google_npz(tmp_path / "vit.npz"), "google_vit_npz")}
    torch.save(sd, tmp_path / "zip.pt")
    files["torch .pt"] = (str(tmp_path / "zip.pt"), "timm_vit")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    files["legacy .bin"] = (str(tmp_path / "legacy.bin"), "hf_vit")
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "model.safetensors")
    files["safetensors"] = (str(tmp_path / "model.safetensors"), "hf_clip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_scripted(torch)).save(str(tmp_path / "ViT-tiny.pt"))
    files["TorchScript"] = (str(tmp_path / "ViT-tiny.pt"), "openai_clip")
    return files


def _scripted(torch):
    """A module with one parameter, for a TorchScript archive."""

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(32, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    return Scripted()


@pytest.mark.parametrize("kind", ["torch .pt", "legacy .bin", "TorchScript", "safetensors", "npz"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file_of_each_format(kind, keep, tmp_path, capsys):
    os.makedirs(tmp_path / "files")
    path, fmt = _torch_files(tmp_path / "files")[kind]
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    truncated = {"legacy .bin": "The file ends early"}.get(kind, f"{path} is truncated (")
    _assert_refused(tmp_path, capsys, [f"--format={fmt}", f"--src={path}"], truncated, "fetch the file again")


def test_missing_key_and_wrong_shape_name_the_key(tmp_path, capsys):
    src = _google_npz(tmp_path / "vit.npz")
    arrays = dict(np.load(src))
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"
    np.savez(src, **{k: v for k, v in arrays.items() if k != key})
    _assert_refused(tmp_path, capsys, ["--format=google_vit_npz", f"--src={src}"],
                    f"has no key {key!r} (needed for jdjax parameter 'block1/mlp/fc2/bias')")
    np.savez(src, **{**arrays, key: np.zeros(WIDTH + 3, np.float32)})
    _assert_refused(tmp_path, capsys, ["--format=google_vit_npz", f"--src={src}"],
                    f"key {key!r} has shape ({WIDTH + 3},)", f"needs shape ({WIDTH},) there")


def test_damaged_save_pretrained_directory(tmp_path, capsys):
    from safetensors.numpy import save_file

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "vit", "hidden_size": 32,\n "num_attention')  # cut short
    save_file({"a": np.zeros(2, np.float32)}, str(src / "model.safetensors"))
    _assert_refused(tmp_path, capsys, ["--format=hf_vit", f"--src={src}"],
                    f"{src / 'config.json'}:2: not valid JSON", "truncated")
    (src / "config.json").write_text('{"model_type": "vit"}')
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _assert_refused(tmp_path, capsys, ["--format=hf_vit", f"--src={src}"],
                    "lists the shard 'model-00001-of-00002.safetensors', which is not in", "incomplete")

"""Draws which image patches ToMe merged into which token, as a PNG (like the ToMe paper figure).

    python -m jdjax.tools.visualize_merging                                # tiny ViT, china.jpg, r=16
    python -m jdjax.tools.visualize_merging --image=flower --model=B/16 --r=16 --layers=2,5,8,11
    python -m jdjax.tools.visualize_merging --model=B/16 --r=16,-1 --out=/tmp/tome.png
    python -m jdjax.tools.visualize_merging --params=ckpt/vit_b16          # a converted checkpoint

The image (scikit-learn's bundled sample photographs `china` or `flower`, or a file path) is
resized (shorter side) and centre-cropped to the model's resolution and run once through a ViT
with `MergeConfig(trace_source=True)`; the [N_l, N_0] source map after every selected block says
which original patches each token covers. Each panel paints every token's patches with the token's
mean pixel colour and draws white boundaries between tokens (tokens need not be contiguous).

Weights: `--params` loads a converted checkpoint with `jdjax.nn.convert.load_params` (and takes
the architecture and resolution from the checkpoint's model.json, when it has one, instead of
--model / --image_size); without --params the ViT
is randomly initialised and the figure title says so. Merging
on random weights still groups similar patches: the metric is the keys, which in the first
blocks are a random linear map of the (layer-normalised) patch embedding of the pixels.

`--r` is an int (every block), `r,inflect` with a negative or fractional inflect such as
`16,-1` (ToMe's decreasing schedule, `schedules.parse_r((16, -1), L)`), or a list of per-block
ints `40,34,30,...`. `--layers` takes block indices 0..L-1 (negative counts from the end).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from jdjax.nn import convert

SAMPLE_IMAGES = ("china", "flower")
# width, depth, heads, mlp: fast on a CPU at 224 px, same 12-block schedule as ViT-B.
TINY = dict(patch_size=16, width=96, depth=12, num_heads=3, mlp_dim=384)
NORMS = {"inception": (0.5, 0.5), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
EXIT_USAGE = 2

# Figure layout in pixels (dpi 100): a title band, a caption band above each panel, gaps.
DPI = 100
TITLE_PX, CAPTION_PX, GAP_PX = 56, 26, 12


class UsageError(Exception):
    """A bad flag or file; the message says how to fix it."""


# ----------------------------------------------------------------------------- inputs


def load_image(name_or_path: str) -> np.ndarray:
    """'china' / 'flower' (scikit-learn's sample photographs) or an image file -> uint8 [H, W, 3]."""
    if name_or_path in SAMPLE_IMAGES:
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name_or_path}.jpg"), np.uint8)
    if not os.path.isfile(name_or_path):
        raise UsageError(
            f"--image={name_or_path!r} is neither a sample image {SAMPLE_IMAGES} nor an existing file; "
            "pass one of those names or the path of a JPEG/PNG."
        )
    from PIL import Image

    try:
        with Image.open(name_or_path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except OSError as e:
        raise UsageError(f"could not read --image={name_or_path!r} as an image ({e}); pass a JPEG or PNG.") from e


def resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: bicubic resize of the shorter side, centre crop."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)


def normalize(image: np.ndarray, norm: str = "inception") -> np.ndarray:
    """uint8 [H, W, 3] -> float32: 'inception' maps to [-1, 1] (Google ViT / augreg), 'imagenet'
    uses the ImageNet mean/std (timm in1k models, PYRA)."""
    if norm not in NORMS:
        raise UsageError(f"--norm must be one of {sorted(NORMS)}, got {norm!r}.")
    mean, std = (np.asarray(v, np.float32) for v in NORMS[norm])
    return ((image.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def parse_r(text: str) -> int | tuple[int, float] | list[int]:
    """'16' -> 16; '16,-1' or '(16,-1)' -> (16, -1.0) (decreasing); '40,34,30' or '[8,8]' -> a list.

    Two numbers form a (r, inflect) tuple when the second is negative or not an integer, or the
    text is in parentheses; otherwise they are a per-block list.
    """
    t = text.strip().replace(" ", "")
    paren, bracket = t.startswith("("), t.startswith("[")
    parts = [p for p in t.strip("()[]").split(",") if p]
    try:
        if len(parts) == 1 and not bracket and not paren:
            return int(parts[0])
        if len(parts) == 2 and not bracket and (paren or "." in parts[1] or parts[1].startswith("-")):
            return int(parts[0]), float(parts[1])
        return [int(p) for p in parts]
    except ValueError as e:
        raise UsageError(
            f"--r={text!r} is not a schedule; use an int (16), r,inflect (16,-1) or per-block ints (40,34,30)."
        ) from e


def default_layers(depth: int, panels: int = 4) -> list[int]:
    """`panels` block indices spread evenly over the depth, ending with the last block."""
    k = min(panels, depth)
    return sorted({round((i + 1) * depth / k) - 1 for i in range(k)})


def parse_layers(text: str | None, depth: int) -> list[int]:
    if not text:
        return default_layers(depth)
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise UsageError(f"--layers={text!r} must be comma-separated block indices, e.g. 2,5,8,11.") from e
    bad = [v for v in layers if not -depth <= v < depth]
    if bad or not layers:
        raise UsageError(f"--layers={text!r}: the model has blocks 0..{depth - 1} (negative counts from the end).")
    return sorted({v % depth for v in layers})


# ----------------------------------------------------------------------------- model


def build_model(name: str, merge_r, num_classes: int = 0, image_size: int = 224, config: dict | None = None):
    """'tiny' or a ViT name like 'B/16' (or, from a converted checkpoint, its ViT keyword
    arguments `config`) -> ViT with trace_source=True and the schedule as a list per block."""
    from jdjax.merging import schedules
    from jdjax.nn.vit import MergeConfig, ViT, vit_config

    try:
        if config is not None:
            dims = dict(config)
        else:
            dims = dict(TINY) if name == "tiny" else vit_config(name)
            dims.update(num_classes=num_classes)
        schedule = schedules.parse_r(merge_r, dims["depth"])
    except (ValueError, KeyError) as e:
        raise UsageError(f"cannot build the model: {type(e).__name__}: {e}") from e
    if image_size % dims["patch_size"]:
        raise UsageError(f"--image_size={image_size} is not divisible by the patch size {dims['patch_size']}.")
    dims.update(merge=MergeConfig(r=schedule, trace_source=True), image_size=image_size)
    return ViT(**dims)


def load_checkpoint(path: str) -> tuple[dict, dict | None]:
    """({'params': ...}, ViT keyword arguments or None) of a converted checkpoint, read with
    `jdjax.nn.convert.load_params`; the keyword arguments come from its model.json (`read_info`)
    when it has one. Raises a UsageError naming the fix."""
    if not os.path.exists(path):
        raise UsageError(f"--params={path!r} does not exist; pass a converted checkpoint or omit --params.")
    try:
        params = convert.load_params(path)
    except Exception as e:  # any converter failure means the file is unusable here
        raise UsageError(f"jdjax.nn.convert.load_params could not read {path!r}: {type(e).__name__}: {e}") from e
    variables = params if isinstance(params, dict) and "params" in params else {"params": params}
    config = None
    try:
        info = convert.read_info(path)
    except convert.ConversionError:  # no model.json (e.g. the params/ directory itself): fall back to --model
        info = None
    if info and info.get("model", "ViT") != "ViT":
        raise UsageError(f"{path!r} holds a {info['model']} checkpoint; this tool draws ViT image models.")
    if info and info.get("config"):
        config = dict(info["config"])
    return variables, config


def head_classes(variables) -> int:
    head = variables["params"].get("head") if isinstance(variables.get("params"), dict) else None
    return int(np.shape(head["kernel"])[-1]) if head and "kernel" in head else 0


def random_params(model, image_size: int, seed: int = 0):
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(model.init)(jax.random.key(seed), x)


def block_sources(model, variables, image: np.ndarray) -> list[np.ndarray]:
    """Runs `model` (merge.trace_source=True) on one float image [S, S, 3]; returns the source map
    [N_l, N_0] after every block (identity before the first merge), float32 0/1."""
    import jax
    import jax.numpy as jnp

    from jdjax.nn.vit import EncoderBlock

    def run(v, x):
        _, state = model.apply(
            v, x, capture_intermediates=lambda mdl, _: isinstance(mdl, EncoderBlock), mutable=["intermediates"]
        )
        return [state["intermediates"][f"block{i}"]["__call__"][0][2] for i in range(model.depth)]

    sources = jax.jit(run)(variables, jnp.asarray(image)[None])
    n0 = model.token_counts(image.shape[0])[0]
    return [np.eye(n0, dtype=np.float32) if s is None else np.asarray(s[0]) for s in sources]


# ----------------------------------------------------------------------------- drawing


def patch_labels(source: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Source map [N_l, N_0] (token 0 = class token) -> int32 [gh, gw]: the output token holding
    each patch, numbered 0..N_l - 2 over the patch tokens (output index - 1)."""
    patches = source[:, 1:]  # [N_l, gh * gw]
    if not np.all(patches.sum(0) == 1) or np.any(source[0, 1:]):
        raise ValueError("the source map is not a partition of the patches (a column does not sum to 1).")
    return (patches.argmax(0) - 1).astype(np.int32).reshape(grid)


def token_colours(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean pixel colour [K, 3] of every token's patches; image uint8 [S, S, 3], labels [gh, gw]."""
    p = image.shape[0] // labels.shape[0]
    pix = np.repeat(np.repeat(labels, p, 0), p, 1).ravel()  # [S * S]
    k = int(labels.max()) + 1
    count = np.bincount(pix, minlength=k)
    sums = np.stack([np.bincount(pix, image[..., c].ravel().astype(np.float64), minlength=k) for c in range(3)], -1)
    return sums / np.maximum(count, 1)[:, None]


def render_panel(image: np.ndarray, labels: np.ndarray, scale: int = 1, edge=(255, 255, 255)) -> np.ndarray:
    """uint8 [S*scale, S*scale, 3]: every pixel painted with its token's mean colour; pixels
    whose right or lower neighbour belongs to another token are drawn in `edge`."""
    p = image.shape[0] // labels.shape[0] * scale
    pix = np.repeat(np.repeat(labels, p, 0), p, 1)  # [S', S']
    out = np.rint(token_colours(image, labels)[pix]).astype(np.uint8)
    boundary = np.zeros(pix.shape, bool)
    boundary[:, :-1] |= pix[:, :-1] != pix[:, 1:]
    boundary[:-1, :] |= pix[:-1, :] != pix[1:, :]
    out[boundary] = edge
    return out


def figure_size(num_panels: int, panel_px: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG with `num_panels` panels of panel_px x panel_px."""
    return num_panels * panel_px + (num_panels + 1) * GAP_PX, TITLE_PX + CAPTION_PX + panel_px + GAP_PX


def draw(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], title: str, out: str) -> tuple[int, int]:
    """Writes the input image and the panels side by side to `out` (PNG); returns (width, height)."""
    from matplotlib.figure import Figure

    panel_px = image.shape[0]
    items = [("input", image)] + list(panels)
    width, height = figure_size(len(items), panel_px)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    fig.text(0.5, 1 - 6 / height, title, ha="center", va="top", fontsize=9, wrap=True)
    for i, (caption, img) in enumerate(items):
        left = GAP_PX + i * (panel_px + GAP_PX)
        ax = fig.add_axes((left / width, GAP_PX / height, panel_px / width, panel_px / height))
        ax.imshow(img, interpolation="nearest", aspect="auto", extent=(0, img.shape[1], img.shape[0], 0))
        ax.set_axis_off()
        ax.set_title(caption, fontsize=8, pad=4)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", facecolor="white")
    return width, height


def visualize(
    image: np.ndarray,
    model,
    variables,
    layers: Sequence[int],
    out: str,
    *,
    norm: str = "inception",
    weights_note: str = "",
    model_name: str = "",
) -> dict:
    """Draws the merge groups after each block in `layers` for a uint8 [S, S, 3] image.

    Returns {'size': (width, height), 'labels': {layer: int32 [gh, gw]}, 'tokens': {layer: N_l},
    'title': str}.
    """
    size = image.shape[0]
    grid = (size // model.patch_size, size // model.patch_size)
    sources = block_sources(model, variables, normalize(image, norm))
    counts = model.token_counts(size)
    scale = max(1, math.ceil(256 / size))
    big = np.repeat(np.repeat(image, scale, 0), scale, 1)
    labels, panels = {}, []
    for layer in layers:
        labels[layer] = patch_labels(sources[layer], grid)
        n = counts[layer + 1]
        panels.append((f"after block {layer}: {n} tokens", render_panel(image, labels[layer], scale)))
    title = (
        f"ToMe merge groups, ViT {model_name} at {size}px, r per block {model.merge.schedule(model.depth)}, "
        f"tokens {counts[0]} -> {counts[-1]}\n{weights_note}"
    )
    wh = draw(big, panels, title, out)
    return {"size": wh, "labels": labels, "tokens": {layer: counts[layer + 1] for layer in layers}, "title": title}


RANDOM_NOTE = ("weights: RANDOM init (no --params); groups follow the input's keys through random layers, "
               "not a trained model")


def run(
    image: str = "china",
    model: str = "tiny",
    r: str = "16",
    layers: str | None = None,
    out: str = "merging.png",
    params: str | None = None,
    image_size: int = 224,
    norm: str = "inception",
    seed: int = 0,
) -> dict:
    """The command line as a function (flags as strings); raises UsageError on bad input."""
    merge_r = parse_r(r)
    raw = load_image(image)
    if params:
        variables, config = load_checkpoint(params)
        if config is not None:  # the checkpoint's own architecture and resolution
            size = config.get("image_size") or image_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if size[0] != size[1]:
                raise UsageError(f"the checkpoint {params!r} is for {size[0]}x{size[1]} images; this tool draws squares.")
            image_size, model = int(size[0]), os.path.basename(os.path.normpath(params))
        vit = build_model(model, merge_r, head_classes(variables), image_size, config)
        note = f"weights: {params}"
    else:
        vit = build_model(model, merge_r, 0, image_size)
        variables = random_params(vit, image_size, seed)
        note = RANDOM_NOTE
    pixels = resize_crop(raw, image_size)
    chosen = parse_layers(layers, vit.depth)
    try:
        info = visualize(pixels, vit, variables, chosen, out, norm=norm, weights_note=note, model_name=model)
    except (ValueError, TypeError, KeyError) as e:
        if not params:
            raise
        raise UsageError(f"the checkpoint {params!r} does not fit --model={model} at {image_size}px: "
                         f"{type(e).__name__}: {e}") from e
    print(f"wrote {out} ({info['size'][0]}x{info['size'][1]}); tokens after blocks {info['tokens']}")
    return info


def main(argv):
    from absl import flags

    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; pass everything as --flags.")
    f = flags.FLAGS
    try:
        run(f.image, f.model, f.r, f.layers, f.out, f.params, f.image_size, f.norm, f.seed)
    except UsageError as e:
        _fail(str(e))


def _fail(message: str) -> None:
    print(f"visualize_merging: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("image", "china", "china | flower (scikit-learn sample photos) | path to an image.")
    flags.DEFINE_string("model", "tiny", "tiny (width 96, 12 blocks, patch 16) or a ViT name such as B/16, S/16, L/16.")
    flags.DEFINE_string("r", "16", "Tokens merged per block: 16 | 16,-1 (decreasing) | 40,34,30,... (per block).")
    flags.DEFINE_string("layers", None, "Blocks to draw (0-based, e.g. 2,5,8,11); default four spread over the depth.")
    flags.DEFINE_string("out", "merging.png", "Output PNG path.")
    flags.DEFINE_string("params", None, "Converted checkpoint (via jdjax.nn.convert.load_params); default random init.")
    flags.DEFINE_integer("image_size", 224, "Resolution the image is resized and cropped to.")
    flags.DEFINE_string("norm", "inception", "Pixel normalisation: inception ([-1, 1]) or imagenet (mean/std).")
    flags.DEFINE_integer("seed", 0, "Seed of the random initialisation.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)

"""Command line of the checkpoint converters (`jdjax.nn.convert`, where the formats are described):
OpenAI CLIP (ViT and ResNet), open_clip, timm ViT, Google ViT npz, Hugging Face ViT / CLIP -> a jdjax
checkpoint directory (`params/` orbax, `batch_stats/` for ResNet CLIPs, + `model.json`). Errors exit
with status 2 and one message.

    python -m jdjax.tools.convert --format=google_vit_npz --src=imagenet21k_ViT-B_16.npz --dst=ckpt/vit_b16
    python -m jdjax.tools.convert --format=openai_clip --src=ViT-B-32.pt --dst=ckpt/clip_b32 [--model=ViT-B/32]
    python -m jdjax.tools.convert --format=open_clip --src=RN50-quickgelu.pt --dst=ckpt/clip_rn50 --model=RN50-quickgelu
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from jdjax.nn.convert import FORMATS, ConversionError, convert, save_converted
from jdjax.nn.convert.names import model_desc
from jdjax.nn.convert.readers import sample_keys

EXIT_USAGE = 2


def _define_flags(fv):
    """The converter's flags, on their own FlagValues (so `cli` can run inside another absl program)."""
    flags.DEFINE_enum("format", None, list(FORMATS), "Source checkpoint format.", flag_values=fv)
    flags.DEFINE_string("src", None, "Source checkpoint file (or a save_pretrained directory for hf_*).",
                        flag_values=fv)
    flags.DEFINE_string("dst", None, "Output directory (orbax params/ + model.json).", flag_values=fv)
    flags.DEFINE_string("model", None, "Model name where shapes cannot tell (heads): e.g. B/16, ViT-B/32, "
                        "vit_base_patch16_224, ViT-H-14, ViT-B-32-quickgelu, RN50, RN50-quickgelu.", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "Attention heads (ViT, or the CLIP image tower / ResNet attention pool).",
                         flag_values=fv)
    flags.DEFINE_integer("text_heads", None, "Attention heads of the CLIP text tower.", flag_values=fv)
    flags.DEFINE_enum("activation", None, ["gelu", "quick_gelu", "gelu_tanh", "relu"], "Force the MLP activation.",
                      flag_values=fv)
    flags.DEFINE_float("ln_eps", None, "Force the LayerNorm epsilon.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.", flag_values=fv)
    flags.DEFINE_bool("allow_pickle", False, "Let torch unpickle arbitrary objects (trusted files only).",
                      flag_values=fv)


def cli(argv: Sequence[str]) -> int:
    """Runs the converter command line; returns the exit status (2 on any usage or conversion error)."""
    fv = flags.FlagValues()
    _define_flags(fv)
    prog = "python -m jdjax.tools.convert"
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(f"usage: {prog} --format={{{'|'.join(FORMATS)}}} --src=... --dst=... [--model=...]\n")
        print(fv.get_help())
        return 0
    try:
        rest = fv(list(argv))
        if len(rest) > 1:
            raise flags.Error(f"unexpected positional arguments {rest[1:]}")
        for name in ("format", "src", "dst"):
            if fv[name].value is None:
                raise flags.Error(f"--{name} is required")
    except flags.Error as e:
        print(f"{prog}: error: {e}. Usage: {prog} --format={{{'|'.join(FORMATS)}}} --src=PATH --dst=DIR "
              "[--model=NAME] [--num_heads=H] (--help lists all flags).", file=sys.stderr)
        return EXIT_USAGE
    overrides = {}
    is_clip = fv["format"].value in ("openai_clip", "open_clip", "hf_clip")
    if fv["num_heads"].value is not None:
        overrides["vision_heads" if is_clip else "num_heads"] = fv["num_heads"].value
    if fv["text_heads"].value is not None:
        if not is_clip:
            print(f"{prog}: error: --text_heads applies to CLIP formats only.", file=sys.stderr)
            return EXIT_USAGE
        overrides["text_heads"] = fv["text_heads"].value
    if fv["activation"].value is not None:
        overrides["activation"] = fv["activation"].value
    if fv["ln_eps"].value is not None:
        overrides["ln_eps"] = fv["ln_eps"].value
    try:
        src = fv["src"].value
        converted = convert(src, fv["format"].value, fv["model"].value, allow_pickle=fv["allow_pickle"].value,
                            **overrides)
        dst = save_converted(converted, fv["dst"].value, overwrite=fv["overwrite"].value, source=os.path.abspath(src))
    except ConversionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # e.g. --dst under a file or a read-only directory
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USAGE
    from flax import traverse_util  # late: --help and usage errors need no jax

    n = sum(np.size(v) for v in traverse_util.flatten_dict(converted.params).values())
    stats = sum(np.size(v) for v in traverse_util.flatten_dict(converted.batch_stats).values())
    print(f"wrote {dst}: {model_desc(converted.model, converted.config)}, {n:,} parameters"
          + (f", {stats:,} BatchNorm statistics" if stats else ""))
    if converted.dropped:
        print(f"dropped source keys: {sample_keys(converted.dropped, 8)}")
    for note in converted.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv))

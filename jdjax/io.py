"""Workdir I/O through etils.epath, orbax's path library: a workdir is a local directory or a
gs://bucket/... URI (any path epath opens), given as a str, pathlib.Path or epath.Path.

Writes never leave half a file: a local file is written under a temporary name and renamed over
the target; an object in a bucket only replaces the old one when its upload completes.

JSON is strict (RFC 8259, what `jq`, browsers and other languages read): a float that is not
finite is written as the string "nan", "inf" or "-inf" (`str(x)`; `float("nan")` reads it back),
never as a bare NaN/Infinity token. `read_json` turns those three strings back into floats.
results.json, metrics.jsonl (`jdjax.train.logging`) and every other file written here follow it.
"""

from __future__ import annotations

import json
import math
import os
import uuid

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
    """True for a URI such as gs://bucket/run, False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
    """`path` as an epath.Path; a local one made absolute, as orbax requires."""
    path = epath.Path(path)
    return path if is_remote(path) else path.resolve()


def write_bytes(path: epath.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically: readers see the old file or the new one, never a part."""
    _write(as_path(path), data, "wb")


def write_text(path: epath.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (see `write_bytes`)."""
    _write(as_path(path), text, "w")


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # the strings non-finite floats become


def json_safe(obj):
    """`obj` with every non-finite float (NumPy float64 included) replaced by "nan", "inf" or "-inf",
    in dicts, lists and tuples at any depth; everything else as it is."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(float(obj))
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, indent: int | None = None) -> str:
    """Strict JSON text of `obj` (see the module docstring: non-finite floats as strings)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def loads(text: str):
    """Parses JSON written by `dumps`: the strings "nan", "inf" and "-inf" come back as floats."""

    def restore(value):
        if isinstance(value, str):
            return NON_FINITE.get(value, value)
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(json.loads(text))


def write_json(path: epath.PathLike, obj) -> None:
    """Writes `obj` as indented strict JSON to `path` atomically (see `write_bytes`, `dumps`)."""
    write_text(path, dumps(obj, indent=2) + "\n")


def read_json(path: epath.PathLike):
    """The JSON in `path`, non-finite floats restored (see `loads`)."""
    return loads(as_path(path).read_text())


def _write(path: epath.Path, data, mode: str) -> None:
    if is_remote(path):  # an object upload is atomic; a rename there would be a copy and a delete
        with path.open(mode) as f:
            f.write(data)
        return
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with tmp.open(mode) as f:
            f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig, path: epath.PathLike, dpi: int = 120) -> None:
    """Saves a matplotlib figure as PNG to `path` (local or remote) atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes(path, buf.getvalue())

"""Workdir I/O through etils.epath, orbax's path library: a workdir is a local directory or a
gs://bucket/... URI (any path epath opens), given as a str, pathlib.Path or epath.Path.

Writes never leave half a file: a local file is written under a temporary name and renamed over
the target; an object in a bucket only replaces the old one when its upload completes.
"""

from __future__ import annotations

import json
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


def write_json(path: epath.PathLike, obj) -> None:
    """Writes `obj` as indented JSON to `path` atomically (see `write_bytes`)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: epath.PathLike):
    return json.loads(as_path(path).read_text())


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

"""Video-text data for CLIP text-video retrieval (TempMe, spec `vision_token_merging.md` §2).

Three parts: an embedded generator whose captions depend on the order of events, frame
sampling and CLIP preprocessing of real videos (PyAV) or JPEG frame directories, and readers
for the public MSR-VTT, DiDeMo, ActivityNet Captions and LSMDC annotation layouts.

Embedded default: `moving_shapes_videos(split, num_videos)`
------------------------------------------------------------
Each video shows one object -- a shape in SHAPES (circle, square, triangle), a colour in
COLOURS (red, green, blue, yellow), small or large -- on a dark background with a per-video
tint (uniform 0-0.15 per channel) and per-pixel Gaussian noise (sigma 0.03, fresh every
frame); the object colour is the palette colour times a per-video gain (0.8-1.0) plus a
per-video offset (+-0.05 per channel). Frame t shows the story at time u = (t + 0.5) / T.

* Two events of different kinds in sequence: event 1 on the first half of the frames, event 2
  on the second half. Kinds: horizontal move ("moves left" / "moves right", the centre
  travels 0.44 of the side, linearly in u over its half), vertical move ("moves up" / "moves
  down"), colour ("turns <colour>", a step at the middle of its half) and size ("grows" =
  small -> large, "shrinks", a step at the middle of its half). Each of the 12 ordered pairs of
  distinct kinds is equally likely, so "moves left, then moves up" exists but "moves left,
  then moves right" does not.
* Caption: "a <size> <colour> <shape> <event 1>, then <event 2>", size and colour being those
  of the first frame, e.g. "a small red circle moves left, then turns blue".
* Time-reversed pairs: videos 2k and 2k+1 are twins, `video[2k+1] = video[2k][::-1]` exactly.
  The twin's caption tells the reversed story -- the inverse events in reverse order, starting
  from the final size and colour: the twin of "a small red circle moves left, then turns blue"
  is "a small blue circle turns red, then moves right". Both twins hold the same multiset of
  frames, so a mean of per-frame features cannot tell them apart; only temporal modelling can
  (a frame-bag model is at chance between twins). `pair[i]` is i's twin (i XOR 1).
* Frame captions: "a <size> <colour> <shape> at the <vertical> <horizontal>", the position
  words being the thirds of the image the object's centre lies in (top / middle / bottom,
  left / centre / right; the triangle's centre is its centroid). `frame_label` = colour index x
  3 + shape index (NUM_FRAME_CLASSES = 12 classes, size and position ignored).
* Deterministic: pair k of a split depends only on (seed, SPLIT_SEEDS[split], k), so a split of
  2n videos starts with the n pairs of any smaller split. Captions repeat (there are 1,104
  distinct video captions): a retrieval metric that scores only the diagonal counts a
  same-caption video ranked first as a miss.
* Videos are uint8 [V, T, S, S, 3] (like decoded frames); `clip_normalize` turns them into the
  model's float32 input, as `MovingShapesSource` does per batch.
Words used: `caption_vocabulary()`; `caption_words(text)` splits a caption into them (the
comma is its own word).

Frame sampling and preprocessing (spec §2.4)
--------------------------------------------
`sample_frame_indices`: the 1 fps positions (every round(native_fps / sample_fps)-th frame)
uniformly subsampled to T with `linspace(0, P - 1, T)` floored; a video with fewer than T
positions gets `linspace(0, num_available - 1, T)` floored, with duplicates, so the frame mask
is always all ones. `clip_preprocess`: resize the shorter side to S (bicubic, torchvision's
rounding), centre crop S x S, scale to [0, 1], normalise with CLIP's mean and std.
`read_video` decodes with PyAV (native fps = the stream's average rate); `read_frame_dir`
reads `<dir>/*.jpg` sorted by name (digit runs compared as numbers), assumed at 1 fps.

Annotation readers (from a local directory)
-------------------------------------------
`msrvtt`, `didemo`, `activitynet`, `lsmdc` (or `load_video_text(name, ...)`) return a
`VideoTextSplit`: `items` (VideoText(video_id, text)), `paths` (video id -> file or frame
directory under `video_dir`, default `<data_dir>/videos`) and the ids `skipped` for having no
file. A video `<id>` is looked for as `<id>.mp4`, `.avi`, `.mkv`, `.webm` (and the other
VIDEO_EXTENSIONS) and as a JPEG directory `<id>/`. The val split is carved from the train videos (a fixed random
`val_fraction` of the distinct train video ids for `seed`); test data never select anything.

* MSR-VTT (`MSRVTT_data.json`, `MSRVTT_train.9k.csv`, `MSRVTT_JSFUSION_test.csv`): train = every
  sentence of every train video (180k items for the 9k videos); val = the first sentence of each
  carved video; test = the 1,000 JSFUSION (video, sentence) pairs.
* DiDeMo (`train_data.json`, `test_data.json`; `val_data.json` with `official_val=True`): one
  item per video, the paragraph of its descriptions in file order joined by spaces (CLIP4Clip).
  The video id is the "video" name without its extension; the name as given is also tried.
* ActivityNet Captions (`train.json`, `val_1.json` = test): paragraph = the sentences joined by
  spaces. `v_<id>` videos are also looked for without the `v_`.
* LSMDC (`LSMDC16_annos_training.csv`, `LSMDC16_challenge_1000_publictect.csv` = test;
  `LSMDC16_annos_val.csv` with `official_val=True`): tab-separated clip_id, start, end, start,
  end, sentence; a clip `0001_American_Beauty_00.00.51.926-00.00.54.129` is looked for in
  `<video_dir>/0001_American_Beauty/` and then in `<video_dir>/`.

Malformed annotations raise ValueError naming `file:line` (or file and JSON key); a video with
no file raises FileNotFoundError naming it and the paths tried, unless `skip_missing=True`
drops such items (their ids are in `skipped`, and a warning gives the count); an unreadable
video raises ValueError naming the file when its batch is read. `VideoTextSource` decodes
lazily, per batch.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from jdjax.data.images import SPLIT_SEEDS

# ----------------------------------------------------------------------------- embedded videos

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
PALETTE = np.array(  # [4, 3] RGB in [0, 1], in COLOURS order
    [[0.90, 0.15, 0.15], [0.15, 0.80, 0.20], [0.20, 0.35, 0.95], [0.90, 0.85, 0.15]], np.float32
)
SIZES = ("small", "large")
RADIUS = (0.12, 0.20)  # object radius per size, fraction of the side
MARGIN = 0.22  # the object's centre stays this far (fraction of the side) from every edge
TRAVEL = 0.44  # a move shifts the centre by this fraction of the side
NOISE = 0.03
HORIZONTAL = ("left", "centre", "right")
VERTICAL = ("top", "middle", "bottom")
NUM_FRAME_CLASSES = len(COLOURS) * len(SHAPES)
# Event kinds; an event is (kind, arg): arg -1/+1 = left/right, up/down, shrinks/grows, or the
# target colour index for a colour change.
MOVE_X, MOVE_Y, COLOUR_CHANGE, SIZE_CHANGE = range(4)


def caption_vocabulary() -> list[str]:
    """Every word of the video and frame captions (sorted); `caption_words` splits a caption."""
    words = {"a", "at", "the", "then", ",", "moves", "turns", "grows", "shrinks", "left", "right", "up", "down"}
    words |= set(SHAPES) | set(COLOURS) | set(SIZES) | set(HORIZONTAL) | set(VERTICAL)
    return sorted(words)


def caption_words(text: str) -> list[str]:
    """A caption's words, the comma as a word of its own: 'a red circle grows, then ...' ->
    ['a', 'red', 'circle', 'grows', ',', 'then', ...]."""
    return text.replace(",", " , ").split()


@dataclass(frozen=True, eq=False)
class VideoSplit:
    """Generated videos of one split (see the module docstring).

    Attributes:
      video: uint8 [V, T, S, S, 3].
      caption: V video captions.
      frame_caption: [V][T] captions of the single frames.
      frame_label: int32 [V, T], colour * len(SHAPES) + shape of each frame's object.
      pair: int32 [V], the index of each video's time-reversed twin.
    """

    video: np.ndarray
    caption: list[str]
    frame_caption: list[list[str]]
    frame_label: np.ndarray
    pair: np.ndarray

    def __len__(self) -> int:
        return len(self.video)

    def distinct_captions(self) -> VideoSplit:
        """The split without the videos whose caption an earlier video already has (for retrieval
        evaluation, where the ground truth is one video per caption); twins stay twins where both
        are kept (`pair` is -1 for a video whose twin was dropped)."""
        keep = np.array(sorted({c: i for i, c in reversed(list(enumerate(self.caption)))}.values()), np.int64)
        position = np.full(len(self), -1, np.int64)
        position[keep] = np.arange(len(keep))
        return VideoSplit(self.video[keep], [self.caption[i] for i in keep],
                          [self.frame_caption[i] for i in keep], self.frame_label[keep],
                          position[self.pair[keep]].astype(np.int32))

    def frames(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The frames as single images: (uint8 [V*T, S, S, 3], V*T captions, int32 [V*T] labels)."""
        v, t = self.video.shape[:2]
        return (
            self.video.reshape(v * t, *self.video.shape[2:]),
            [c for row in self.frame_caption for c in row],
            self.frame_label.reshape(v * t),
        )


def _phrase(kind: int, arg: int) -> str:
    if kind == MOVE_X:
        return "moves right" if arg > 0 else "moves left"
    if kind == MOVE_Y:
        return "moves down" if arg > 0 else "moves up"
    if kind == COLOUR_CHANGE:
        return f"turns {COLOURS[arg]}"
    return "grows" if arg > 0 else "shrinks"


def _story(rng: np.random.Generator) -> dict:
    """The random parameters of one pair's forward video."""
    shape, colour0 = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
    kinds = [int(k) for k in rng.permutation(4)[:2]]  # ordered, distinct: each of the 12 pairs alike
    signs = rng.choice([-1, 1], size=2)
    colour_step = int(rng.integers(1, len(COLOURS)))
    args = [(colour0 + colour_step) % len(COLOURS) if k == COLOUR_CHANGE else int(s) for k, s in zip(kinds, signs)]
    size_draw = int(rng.integers(2))
    size0 = next(((0 if a > 0 else 1) for k, a in zip(kinds, args) if k == SIZE_CHANGE), size_draw)
    start = np.empty(2)
    free = rng.uniform(MARGIN, 1 - MARGIN, size=2)
    moving = rng.uniform(MARGIN, 1 - MARGIN - TRAVEL, size=2)  # start of an increasing move
    for axis in (MOVE_X, MOVE_Y):
        arg = next((a for k, a in zip(kinds, args) if k == axis), None)
        start[axis] = free[axis] if arg is None else (moving[axis] if arg > 0 else 1 - moving[axis])
    return {
        "shape": shape, "colour0": colour0, "size0": size0, "kinds": kinds, "args": args, "start": start,
        "tint": rng.uniform(0.0, 0.15, size=3), "gain": rng.uniform(0.8, 1.0),
        "offset": rng.uniform(-0.05, 0.05, size=3),
    }


def _caption(size: int, colour: int, shape: int, events: Sequence[tuple[int, int]]) -> str:
    first, second = (_phrase(k, a) for k, a in events)
    return f"a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]} {first}, then {second}"


def _frame_caption(size: int, colour: int, shape: int, x: float, y: float) -> str:
    h, v = HORIZONTAL[int(x > 1 / 3) + int(x > 2 / 3)], VERTICAL[int(y > 1 / 3) + int(y > 2 / 3)]
    return f"a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]} at the {v} {h}"


def _render(stories: list[dict], noise: np.ndarray, num_frames: int, image_size: int):
    """Forward videos of `stories`: (uint8 [P, T, S, S, 3], per-frame states [P, T])."""
    t, s = num_frames, image_size
    u = (np.arange(t) + 0.5) / t  # [T] story time of each frame
    progress = np.clip((u[None, :] - 0.5 * np.arange(2)[:, None]) / 0.5, 0, 1)  # [2, T] of events 1, 2
    stepped = progress >= 0.5  # [2, T] a step event has happened
    kinds = np.array([st["kinds"] for st in stories])  # [P, 2]
    args = np.array([st["args"] for st in stories])  # [P, 2]
    start = np.array([st["start"] for st in stories])  # [P, 2] (x, y)
    cx = start[:, :1] + ((kinds == MOVE_X) * args * TRAVEL) @ progress  # [P, T]
    cy = start[:, 1:] + ((kinds == MOVE_Y) * args * TRAVEL) @ progress
    colour0 = np.array([st["colour0"] for st in stories])
    recoloured = ((kinds == COLOUR_CHANGE)[:, :, None] & stepped[None]).any(1)  # [P, T]
    target = np.where(kinds == COLOUR_CHANGE, args, 0).max(1)  # [P]
    colour = np.where(recoloured, target[:, None], colour0[:, None])  # [P, T]
    resized = ((kinds == SIZE_CHANGE)[:, :, None] & stepped[None]).any(1)
    size = np.array([st["size0"] for st in stories])[:, None] ^ resized  # [P, T]
    shape = np.array([st["shape"] for st in stories])  # [P]

    radius = np.asarray(RADIUS, np.float32)[size][..., None, None]  # [P, T, 1, 1]
    grid = ((np.arange(s) + 0.5) / s).astype(np.float32)
    dx = grid[None, None, None, :] - cx[..., None, None].astype(np.float32)  # [P, T, 1, S]
    dy = grid[None, None, :, None] - cy[..., None, None].astype(np.float32)  # [P, T, S, 1]
    circle = dx**2 + dy**2 <= radius**2
    square = (np.abs(dx) <= 0.8 * radius) & (np.abs(dy) <= 0.8 * radius)
    # apex r above the centre, base r/2 below it, half-width r at the base: centroid at the centre
    triangle = (dy >= -radius) & (dy <= 0.5 * radius) & (np.abs(dx) <= (dy + radius) / 1.5)
    shp = shape[:, None, None, None]
    mask = np.where(shp == 0, circle, np.where(shp == 1, square, triangle))  # [P, T, S, S]

    gain = np.array([st["gain"] for st in stories], np.float32)[:, None, None]
    offset = np.array([st["offset"] for st in stories], np.float32)[:, None, :]
    rgb = np.clip(PALETTE[colour] * gain + offset, 0, 1) * 255  # [P, T, 3]
    tint = np.array([st["tint"] for st in stories], np.float32)[:, None, None, None, :] * 255  # [P, 1, 1, 1, 3]
    image = np.where(mask[..., None], rgb[:, :, None, None, :], tint)  # [P, T, S, S, 3]
    image += noise * 255 + 0.5
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8), {"cx": cx, "cy": cy, "colour": colour, "size": size}


def moving_shapes_videos(
    split: str, num_videos: int, num_frames: int = 8, image_size: int = 32, seed: int = 0
) -> VideoSplit:
    """`num_videos` generated captioned videos (num_videos / 2 time-reversed pairs) of one split.

    See the module docstring for the planted structure. Videos are uint8 [V, T, S, S, 3].
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"moving-shapes split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}.")
    if num_videos <= 0 or num_videos % 2:
        raise ValueError(
            f"num_videos={num_videos} must be a positive even number: the split is made of time-reversed pairs; "
            f"use {max(2, num_videos + num_videos % 2)}."
        )
    if num_frames < 4 or num_frames % 2:
        raise ValueError(f"num_frames={num_frames} must be even and at least 4 (two frames per event half).")
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw the shapes; use at least 16.")
    num_pairs, t, s = num_videos // 2, num_frames, image_size
    video = np.empty((num_videos, t, s, s, 3), np.uint8)
    frame_label = np.empty((num_videos, t), np.int32)
    captions, frame_captions = [None] * num_videos, [None] * num_videos
    chunk = max(1, 2**21 // (t * s * s))  # pairs rendered at once (bounded memory)
    for lo in range(0, num_pairs, chunk):
        ks = range(lo, min(lo + chunk, num_pairs))
        stories, noise = [], np.empty((len(ks), t, s, s, 3), np.float32)
        for j, k in enumerate(ks):
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split], k])
            stories.append(_story(rng))
            noise[j] = rng.standard_normal((t, s, s, 3), dtype=np.float32) * NOISE
        forward, state = _render(stories, noise, t, s)
        rows = 2 * np.arange(ks.start, ks.stop)
        video[rows] = forward
        video[rows + 1] = forward[:, ::-1]
        for j, (k, st) in enumerate(zip(ks, stories)):
            labels = state["colour"][j] * len(SHAPES) + st["shape"]
            frame_label[2 * k], frame_label[2 * k + 1] = labels, labels[::-1]
            per_frame = [
                _frame_caption(int(state["size"][j, i]), int(state["colour"][j, i]), st["shape"],
                               float(state["cx"][j, i]), float(state["cy"][j, i]))
                for i in range(t)
            ]
            frame_captions[2 * k], frame_captions[2 * k + 1] = per_frame, per_frame[::-1]
            events = list(zip(st["kinds"], st["args"]))
            inverse = [(kind, st["colour0"] if kind == COLOUR_CHANGE else -arg) for kind, arg in events[::-1]]
            captions[2 * k] = _caption(st["size0"], st["colour0"], st["shape"], events)
            end_size, end_colour = int(state["size"][j, -1]), int(state["colour"][j, -1])
            captions[2 * k + 1] = _caption(end_size, end_colour, st["shape"], inverse)
    pair = (np.arange(num_videos) ^ 1).astype(np.int32)
    return VideoSplit(video, captions, frame_captions, frame_label, pair)


# ----------------------------------------------------------------------------- frames

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 pixels [..., 3] -> float32 (x / 255 - CLIP mean) / CLIP std."""
    return ((np.asarray(frames, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def _resize_crop(image: Image.Image, size: int) -> np.ndarray:
    """torchvision Resize(size, bicubic) then CenterCrop(size): uint8 [size, size, 3]."""
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def clip_preprocess(frames: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, S, S, 3]: shorter side to S (bicubic), centre crop,
    CLIP mean/std normalisation."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"clip_preprocess expects uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}.")
    return clip_normalize(np.stack([_resize_crop(Image.fromarray(f), image_size) for f in frames]))


def sample_frame_indices(
    num_available: int, num_frames: int, native_fps: float | None = None, sample_fps: float = 1.0
) -> np.ndarray:
    """int64 [num_frames] frame indices (spec §2.4), ascending, possibly repeated.

    Positions are every round(native_fps / sample_fps)-th frame (every frame when native_fps is
    None); P >= num_frames positions are subsampled with linspace(0, P - 1, num_frames) floored,
    fewer give linspace(0, num_available - 1, num_frames) floored.
    """
    if num_available <= 0:
        raise ValueError(f"cannot sample {num_frames} frames from a video with {num_available} frames.")
    if num_frames <= 0 or sample_fps <= 0 or (native_fps is not None and native_fps <= 0):
        raise ValueError(
            f"num_frames={num_frames}, sample_fps={sample_fps} and native_fps={native_fps} must be positive."
        )
    step = 1 if native_fps is None else max(1, round(native_fps / sample_fps))
    positions = np.arange(0, num_available, step)
    if len(positions) >= num_frames:
        return positions[np.linspace(0, len(positions) - 1, num_frames).astype(np.int64)]
    return np.linspace(0, num_available - 1, num_frames).astype(np.int64)


def _decode_at(path: str, indices: np.ndarray) -> tuple[dict[int, Image.Image], int]:
    """The frames at `indices` (decode order) and the number of frames decoded."""
    import av

    wanted, last = {int(i) for i in indices}, int(max(indices))
    out, count = {}, 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), 1):
            if count - 1 in wanted:
                out[count - 1] = frame.to_image()
            if count - 1 >= last:
                break
    return out, count


def _video_frames(path: str, num_frames: int, sample_fps: float) -> list[Image.Image]:
    """The sampled frames of a video file, decoded with PyAV."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path} does not exist.")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream; is it an audio file?")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            count = stream.frames
            if count <= 0:  # no frame count in the container (mkv, webm): count the packets
                count = sum(1 for packet in container.demux(stream) if packet.size)
        native_fps = float(rate) if rate else None
        if count <= 0:
            raise ValueError(f"{path} has no video frames; re-download it or drop it from the annotations.")
        indices = sample_frame_indices(count, num_frames, native_fps, sample_fps)
        frames, decoded = _decode_at(path, indices)
        if len(frames) < len(set(indices.tolist())):  # the container over-counted its frames
            if decoded == 0:
                raise ValueError(f"{path}: no frame could be decoded; re-download it or drop it from the annotations.")
            indices = sample_frame_indices(decoded, num_frames, native_fps, sample_fps)
            frames, _ = _decode_at(path, indices)
    except av.FFmpegError as e:
        raise ValueError(
            f"{path} cannot be decoded ({type(e).__name__}: {e}); the file is corrupt or not a video: "
            "re-download it or drop it from the annotations."
        ) from e
    return [frames[int(i)] for i in indices]


def read_video(path: str, num_frames: int, image_size: int, sample_fps: float = 1.0) -> np.ndarray:
    """float32 [num_frames, S, S, 3]: a video file decoded with PyAV, sampled (spec §2.4) at the
    stream's average frame rate, CLIP-preprocessed."""
    return clip_normalize(np.stack([_resize_crop(im, image_size) for im in _video_frames(path, num_frames, sample_fps)]))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_frame_dir(path: str, num_frames: int, image_size: int, fps: float = 1.0) -> np.ndarray:
    """float32 [num_frames, S, S, 3] from a directory of JPEG frames taken at `fps` (sorted by name,
    digit runs compared as numbers), sampled at 1 fps (spec §2.4), CLIP-preprocessed."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"frame directory {path} does not exist.")
    names = sorted((n for n in os.listdir(path) if n.lower().endswith((".jpg", ".jpeg"))), key=_natural_key)
    if not names:
        raise ValueError(f"{path} holds no .jpg frames; extract the frames into it or point at the video file.")
    indices = sample_frame_indices(len(names), num_frames, native_fps=fps, sample_fps=1.0)
    crops = {}
    for i in sorted(set(indices.tolist())):
        file = os.path.join(path, names[i])
        try:
            with Image.open(file) as image:
                crops[i] = _resize_crop(image, image_size)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{file} is not a readable JPEG ({e}); re-extract the frames.") from e
    return clip_normalize(np.stack([crops[int(i)] for i in indices]))


# ----------------------------------------------------------------------------- annotations

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class VideoText:
    video_id: str
    text: str


@dataclass(frozen=True, eq=False)
class VideoTextSplit:
    """One split of a video-text data set.

    Attributes:
      items: the (video id, text) pairs, in annotation order.
      paths: video id -> its video file or JPEG frame directory.
      skipped: ids dropped for having no file (only with skip_missing=True).
    """

    items: list[VideoText]
    paths: dict[str, str]
    skipped: tuple[str, ...] = ()

    def locate(self, video_id: str) -> str:
        return self.paths[video_id]

    @property
    def video_ids(self) -> list[str]:
        """The distinct video ids in order of first appearance."""
        return list(dict.fromkeys(item.video_id for item in self.items))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")


def _annotation(data_dir: str, name: str, dataset: str) -> str:
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name} is not in {data_dir!r}; download the {dataset} annotations into that directory "
            "(see jdjax/data/video.py for the expected layout)."
        )
    return path


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); is the file truncated?") from e


def _require(ok: bool, message: str) -> None:
    """Malformed annotations are a ValueError (the task reports it as a UsageError)."""
    if not ok:
        raise ValueError(message)


def _text(value, where: str) -> str:
    _require(isinstance(value, str) and bool(value.strip()), f"{where} must be a non-empty string, got {value!r}.")
    return value.strip()


def _carve_val(video_ids: Sequence[str], val_fraction: float, seed: int, source: str) -> set[str]:
    """A fixed random `val_fraction` of the distinct ids (at least one when the fraction is > 0)."""
    ids = sorted(set(video_ids))
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    n_val = round(val_fraction * len(ids))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= len(ids):
        raise ValueError(
            f"val_fraction={val_fraction} of the {len(ids)} train videos in {source} leaves none to train on."
        )
    perm = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i] for i in perm[:n_val]}


def _select(train_items: list[VideoText], split: str, val_fraction: float, seed: int, source: str) -> list[VideoText]:
    val = _carve_val([it.video_id for it in train_items], val_fraction, seed, source)
    if split == "val" and not val:
        raise ValueError("split='val' with val_fraction=0 is empty; set a positive val_fraction.")
    return [it for it in train_items if (it.video_id in val) == (split == "val")]


class _Listing:
    """Cached directory listings: name -> is a directory."""

    def __init__(self):
        self._dirs: dict[str, dict[str, bool]] = {}

    def entries(self, directory: str) -> dict[str, bool]:
        if directory not in self._dirs:
            try:
                with os.scandir(directory) as it:
                    self._dirs[directory] = {e.name: e.is_dir() for e in it}
            except (FileNotFoundError, NotADirectoryError):
                self._dirs[directory] = {}
        return self._dirs[directory]


def _candidates(stem: str) -> list[tuple[str, bool]]:
    """(relative path, is a directory) looked for, in order, for one stem."""
    out = [(stem, False)] if stem.lower().endswith(VIDEO_EXTENSIONS) else []
    return out + [(stem + ext, False) for ext in VIDEO_EXTENSIONS] + [(stem, True)]


def _locate_all(
    items: list[VideoText],
    stems: Callable[[str], list[str]],
    video_dir: str,
    skip_missing: bool,
    source: str,
) -> VideoTextSplit:
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(
            f"video directory {video_dir!r} does not exist; put the videos (or JPEG frame directories) there "
            "or pass video_dir."
        )
    listing, paths, missing = _Listing(), {}, {}
    for video_id in dict.fromkeys(it.video_id for it in items):
        tried = []
        for stem in stems(video_id):
            for rel, is_dir in _candidates(stem):
                head, name = os.path.split(os.path.join(video_dir, rel))
                tried.append(os.path.join(head, name) + ("/" if is_dir else ""))
                if listing.entries(head).get(name) == is_dir:
                    paths[video_id] = os.path.join(head, name)
                    break
            if video_id in paths:
                break
        else:
            missing[video_id] = tried
    if missing and not skip_missing:
        first, tried = next(iter(missing.items()))
        raise FileNotFoundError(
            f"{len(missing)} video(s) listed in {source} have no file in {video_dir!r}, e.g. {first!r} "
            f"(looked for {', '.join(tried)}). Download them, fix video_dir, or pass skip_missing=True to drop "
            "their annotations."
        )
    if missing:
        logging.warning(
            "%s: skipped %d of %d videos with no file in %s.", source, len(missing), len(paths) + len(missing), video_dir
        )
        items = [it for it in items if it.video_id in paths]
    if not items:
        raise ValueError(f"{source} gives no (video, text) item for this split.")
    return VideoTextSplit(items, paths, tuple(missing))


def _csv_rows(path: str, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a comma-separated file whose header names at least `columns`."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        absent = [c for c in columns if c not in header]
        if absent:
            raise ValueError(f"{path}:1: the header {header} lacks the column(s) {absent}; expected {list(columns)}.")
        rows = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: the row has {len(fields)} field(s), the header {len(header)} "
                    f"({','.join(header)}); quote fields that hold commas."
                )
            row = dict(zip(header, fields))
            for c in columns:
                if not row[c].strip():
                    raise ValueError(f"{path}:{reader.line_num}: empty {c!r}.")
            rows.append((reader.line_num, row))
    return rows


def msrvtt(
    data_dir: str, split: str, video_dir: str | None = None, val_fraction: float = 0.05, seed: int = 0,
    skip_missing: bool = False,
) -> VideoTextSplit:
    """MSR-VTT 9k train / JSFUSION 1k-A test (see the module docstring)."""
    _check_split(split)
    video_dir = video_dir or os.path.join(data_dir, "videos")
    if split == "test":
        path = _annotation(data_dir, "MSRVTT_JSFUSION_test.csv", "MSR-VTT")
        rows = _csv_rows(path, ("video_id", "sentence"))
        items = [VideoText(row["video_id"].strip(), row["sentence"].strip()) for _, row in rows]
        return _locate_all(items, lambda v: [v], video_dir, skip_missing, path)
    data_path = _annotation(data_dir, "MSRVTT_data.json", "MSR-VTT")
    data = _load_json(data_path)
    _require(isinstance(data, dict) and isinstance(data.get("sentences"), list),
             f"{data_path}: expected an object with a 'sentences' list; is this MSRVTT_data.json?")
    sentences: dict[str, list[str]] = {}
    for i, s in enumerate(data["sentences"]):
        _require(isinstance(s, dict), f"{data_path}: sentences[{i}] must be an object, got {s!r}.")
        video_id = _text(s.get("video_id"), f"{data_path}: sentences[{i}]['video_id']")
        sentences.setdefault(video_id, []).append(_text(s.get("caption"), f"{data_path}: sentences[{i}]['caption']"))
    ids_path = _annotation(data_dir, "MSRVTT_train.9k.csv", "MSR-VTT")
    train_ids = list(dict.fromkeys(row["video_id"].strip() for _, row in _csv_rows(ids_path, ("video_id",))))
    unknown = [v for v in train_ids if v not in sentences]
    if unknown:
        raise ValueError(f"{ids_path} lists {len(unknown)} video(s) with no sentence in {data_path}, e.g. {unknown[0]!r}.")
    per_video = [VideoText(v, "") for v in train_ids]
    chosen = [it.video_id for it in _select(per_video, split, val_fraction, seed, ids_path)]
    if split == "train":
        items = [VideoText(v, c) for v in chosen for c in sentences[v]]
    else:
        items = [VideoText(v, sentences[v][0]) for v in chosen]
    return _locate_all(items, lambda v: [v], video_dir, skip_missing, ids_path)


def _strip_video_extension(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in VIDEO_EXTENSIONS else name


def didemo(
    data_dir: str, split: str, video_dir: str | None = None, val_fraction: float = 0.05, seed: int = 0,
    skip_missing: bool = False, official_val: bool = False,
) -> VideoTextSplit:
    """DiDeMo paragraph retrieval, CLIP4Clip convention (see the module docstring)."""
    _check_split(split)
    video_dir = video_dir or os.path.join(data_dir, "videos")
    official = split == "test" or (split == "val" and official_val)
    path = _annotation(data_dir, f"{split if official else 'train'}_data.json", "DiDeMo")
    data = _load_json(path)
    _require(isinstance(data, list),
             f"{path}: expected a list of {{'video', 'description', 'times'}} objects, got {type(data).__name__}.")
    paragraphs: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for i, entry in enumerate(data):
        _require(isinstance(entry, dict), f"{path}: [{i}] must be an object, got {entry!r}.")
        name = _text(entry.get("video"), f"{path}: [{i}]['video']")
        video_id = _strip_video_extension(name)
        names.setdefault(video_id, name)
        paragraphs.setdefault(video_id, []).append(_text(entry.get("description"), f"{path}: [{i}]['description']"))
    items = [VideoText(v, " ".join(d)) for v, d in paragraphs.items()]
    if not official:
        items = _select(items, split, val_fraction, seed, path)
    return _locate_all(items, lambda v: list(dict.fromkeys([v, names[v]])), video_dir, skip_missing, path)


def activitynet(
    data_dir: str, split: str, video_dir: str | None = None, val_fraction: float = 0.05, seed: int = 0,
    skip_missing: bool = False,
) -> VideoTextSplit:
    """ActivityNet Captions paragraph retrieval: train.json, val_1.json as test."""
    _check_split(split)
    video_dir = video_dir or os.path.join(data_dir, "videos")
    path = _annotation(data_dir, "val_1.json" if split == "test" else "train.json", "ActivityNet Captions")
    data = _load_json(path)
    _require(isinstance(data, dict), f"{path}: expected an object video_id -> {{'duration', 'timestamps', 'sentences'}}.")
    items = []
    for video_id, entry in data.items():
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{path}: [{video_id!r}]['sentences'] must be a non-empty list of strings.")
        text = " ".join(_text(s, f"{path}: [{video_id!r}]['sentences'][{j}]") for j, s in enumerate(sentences))
        items.append(VideoText(video_id, text))
    if split != "test":
        items = _select(items, split, val_fraction, seed, path)

    def stems(v: str) -> list[str]:
        return [v, v[2:]] if v.startswith("v_") and len(v) > 2 else [v]

    return _locate_all(items, stems, video_dir, skip_missing, path)


LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
_LSMDC_TIME = re.compile(r"^(.+)_\d{2}\.\d{2}\.\d{2}\.\d{3}-\d{2}\.\d{2}\.\d{2}\.\d{3}$")


def lsmdc_movie(clip_id: str) -> str | None:
    """The movie directory of a clip: '0001_American_Beauty_00.00.51.926-00.00.54.129' ->
    '0001_American_Beauty' (None when the id does not end in a time range)."""
    match = _LSMDC_TIME.match(clip_id)
    return match.group(1) if match else None


def lsmdc(
    data_dir: str, split: str, video_dir: str | None = None, val_fraction: float = 0.05, seed: int = 0,
    skip_missing: bool = False, official_val: bool = False,
) -> VideoTextSplit:
    """LSMDC 2016 (see the module docstring)."""
    _check_split(split)
    video_dir = video_dir or os.path.join(data_dir, "videos")
    official = split == "test" or (split == "val" and official_val)
    path = _annotation(data_dir, LSMDC_FILES[split if official else "train"], "LSMDC")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 6 or not fields[0].strip() or not fields[5].strip():
                raise ValueError(
                    f"{path}:{number}: expected 6 tab-separated fields (clip_id, start, end, start, end, sentence) "
                    f"with a clip id and a sentence, got {len(fields)} field(s)."
                )
            items.append(VideoText(fields[0].strip(), fields[5].strip()))
    if not official:
        items = _select(items, split, val_fraction, seed, path)

    def stems(clip_id: str) -> list[str]:
        movie = lsmdc_movie(clip_id)
        return [f"{movie}/{clip_id}", clip_id] if movie else [clip_id]

    return _locate_all(items, stems, video_dir, skip_missing, path)


READERS = {"msrvtt": msrvtt, "didemo": didemo, "activitynet": activitynet, "lsmdc": lsmdc}


def load_video_text(dataset: str, data_dir: str, split: str, **kwargs) -> VideoTextSplit:
    """One split of a public data set by name (READERS); kwargs go to the reader."""
    if dataset not in READERS:
        raise ValueError(f"unknown video-text data set {dataset!r}; choose one of {sorted(READERS)}.")
    return READERS[dataset](data_dir, split, **kwargs)


# ----------------------------------------------------------------------------- sources


class VideoTextSource:
    """Random-access (video, text) batches, decoding the videos of each batch when it is asked for.

    `get_batch(indices)` -> {'video': float32 [B, T, S, S, 3] (CLIP-normalised), 'video_mask':
    int32 [B, T] (all ones, spec §2.4), 'text': int32 [B, L] = tokenizer(texts, context_length),
    'video_index': int32 [B] (index of the item's video among the distinct videos, in order of
    first appearance, so that texts x videos similarity matrices can be built)}.

    `locate` maps a video id to its file or JPEG frame directory (a mapping or a function, e.g.
    `VideoTextSplit.locate`); frame directories are taken at `frame_dir_fps`. A video appearing
    several times in a batch is decoded once; `num_threads` > 1 decodes videos in parallel.
    """

    def __init__(
        self,
        items: Sequence[VideoText],
        locate: Mapping[str, str] | Callable[[str], str],
        tokenizer: Callable[[list[str], int], np.ndarray],
        context_length: int,
        num_frames: int,
        image_size: int,
        sample_fps: float = 1.0,
        frame_dir_fps: float = 1.0,
        num_threads: int = 1,
    ):
        if not items:
            raise ValueError("VideoTextSource needs at least one (video, text) item.")
        self.items = list(items)
        self.locate = locate.__getitem__ if isinstance(locate, Mapping) else locate
        self.tokenizer, self.context_length = tokenizer, context_length
        self.num_frames, self.image_size = num_frames, image_size
        self.sample_fps, self.frame_dir_fps, self.num_threads = sample_fps, frame_dir_fps, num_threads
        position = {}
        self.video_index = np.array(
            [position.setdefault(it.video_id, len(position)) for it in self.items], np.int32
        )  # [N]
        self.video_ids = list(position)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, video_id: str) -> np.ndarray:
        """float32 [T, S, S, 3] frames of one video."""
        path = self.locate(video_id)
        if os.path.isdir(path):
            return read_frame_dir(path, self.num_frames, self.image_size, fps=self.frame_dir_fps)
        return read_video(path, self.num_frames, self.image_size, sample_fps=self.sample_fps)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64).reshape(-1)
        video_index = self.video_index[indices]  # [B]
        distinct = list(dict.fromkeys(video_index.tolist()))
        ids = [self.video_ids[v] for v in distinct]
        if self.num_threads > 1 and len(ids) > 1:
            with ThreadPoolExecutor(min(self.num_threads, len(ids))) as pool:
                decoded = dict(zip(distinct, pool.map(self.read, ids)))
        else:
            decoded = {v: self.read(i) for v, i in zip(distinct, ids)}
        b = len(indices)
        video = np.stack([decoded[v] for v in video_index.tolist()]) if b else np.zeros(
            (0, self.num_frames, self.image_size, self.image_size, 3), np.float32
        )
        text = np.asarray(self.tokenizer([self.items[i].text for i in indices], self.context_length), np.int32)
        return {
            "video": video,  # [B, T, S, S, 3]
            "video_mask": np.ones((b, self.num_frames), np.int32),  # [B, T]
            "text": text.reshape(b, self.context_length),  # [B, L]
            "video_index": video_index,  # [B]
        }


class MovingShapesSource:
    """The generated videos as a source with VideoTextSource's keys: 'video' float32 [B, T, S, S, 3]
    (CLIP-normalised per batch), 'video_mask' int32 [B, T], 'text' int32 [B, L] (the captions,
    tokenised once), 'video_index' int32 [B] (= the rows' video indices: one caption per video),
    'twin_index' int32 [B] (the video index of each row's time-reversed twin, -1 if not in the split).

    With `twin_batches` (for training), a batch of B indices becomes the first B/2 videos and their
    time-reversed twins, interleaved: every batch then holds the order-only negatives that a
    contrastive loss needs to learn temporal order (randomly drawn batches almost never pair twins).
    Deterministic in the indices, so resumed runs see the same batches.
    """

    def __init__(self, split: VideoSplit, tokenizer: Callable[[list[str], int], np.ndarray], context_length: int,
                 twin_batches: bool = False):
        if twin_batches and (split.pair < 0).any():
            raise ValueError("twin_batches needs every video's twin in the split.")
        self.split, self.twin_batches = split, twin_batches
        self.text = np.asarray(tokenizer(list(split.caption), context_length), np.int32)  # [V, L]

    def __len__(self) -> int:
        return len(self.split)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if self.twin_batches:
            if len(indices) % 2:
                raise ValueError(f"twin batches need an even batch size, got {len(indices)}.")
            first = indices[: len(indices) // 2]
            indices = np.stack([first, self.split.pair[first]], axis=1).reshape(-1)  # [i0, twin(i0), i1, ...]
        video = self.split.video[indices]  # [B, T, S, S, 3] uint8
        return {
            "video": clip_normalize(video),
            "video_mask": np.ones(video.shape[:2], np.int32),
            "text": self.text[indices],
            "video_index": indices.astype(np.int32),
            "twin_index": self.split.pair[indices],
        }

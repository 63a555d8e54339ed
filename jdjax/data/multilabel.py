"""Multi-label image data for SCPNet (spec ctr_and_multilabel.md §4): an embedded generator with
planted label co-occurrence, the incomplete-label protocols, the label relation matrix, lazy
sources, SCPNet's three-view training augmentation, and readers for COCO 2014, VOC 2007/2012,
NUS-WIDE and the CUB-200-2011 attributes.

Embedded default: `shape_scenes(split, num_images)`, `shape_scene_data(sizes)`
-----------------------------------------------------------------------------
Each image shows a few small coloured shapes on a dark background. Class c (C = num_classes,
default 16, at most 32) is the object "<colour> <shape>" with colour COLOURS[c // 4] and shape
SHAPES[c % 4]: "red circle", "red square", "red triangle", "red cross", "green circle", ...
Classes form K = num_cliques cliques (default 4) of M = C / K members: class c belongs to clique
(c + c // K) % K, a Latin square, so for the defaults every clique holds each colour and each
shape once and co-occurrence cannot be read off the names or a single visual attribute:

    clique 0: red circle, green cross,    blue triangle, yellow square
    clique 1: red square, green circle,   blue cross,    yellow triangle
    clique 2: red triangle, green square, blue circle,   yellow cross
    clique 3: red cross,  green triangle, blue square,   yellow circle

Generative process of one image (image i of a split depends only on (seed, split, i)):
  1. a clique drawn uniformly; with probability P_SECOND_CLIQUE (0.25) a second, different one;
  2. each member of a drawn clique is present with probability P_MEMBER (0.7); a drawn clique
     with fewer than MIN_MEMBERS (2) present gets random further members up to 2;
  3. with probability P_DISTRACTOR (0.2) one more class from outside the drawn cliques;
  4. every present class is drawn once, in its own cell of a g x g grid (g = ceil(sqrt(2M + 1)),
     3 for the defaults): radius 0.30-0.42 of the cell, centre jittered within the cell, colour
     the palette colour x gain 0.8-1.0 + offset +-0.05 per channel; background tint 0-0.15 per
     channel, Gaussian pixel noise (sigma 0.03). Every image has at least 2 labels.
  5. (`faint` > 0) each object is faint with probability `faint`: its colour is background +
     contrast x (colour - background), contrast uniform in FAINT_CONTRAST (0.08-0.20). `salient`
     [N, C] marks the objects drawn at full contrast; the pretraining captions name only those.
Caption (for CLIP pre-training): the objects in reading order of their cells, "a photo of a red
circle, a green cross and a blue triangle." Splits 'pretrain' (fully labelled, captioned, for a
tiny CLIP on the same distribution), 'train', 'val' and 'test' use different seeds, so their
images are distinct. Images are uint8 [N, S, S, 3], labels uint8 [N, C].

Labels and annotations
----------------------
`labels` are the full 0/1 labels. `annotations` follow the figure's code: 1 known positive,
0 unknown, -1 known negative. `annotate(labels, protocol, rng)` is the one switch:
  'single_positive' (Cole et al. 2021, SCPNet's setting): one positive per image drawn once at
     random, everything else unknown; an image with no positive keeps an all-unknown row (no
     reader or generated split has one: they drop such images);
  'partial': each (image, class) entry kept, as +1 / -1, with probability `proportion`;
  'full': every entry known (2 * labels - 1). val/test annotations are always 'full'.

Relation matrix (spec §4.1): SCPNet reads R [C, C], cosine similarities of CLIP text
embeddings of the class names. The embedded data's stand-in for that world knowledge is
`cooccurrence_relation` of the 'pretrain' labels (cosine similarity of the label columns);
`load_relation` reads a shipped .npy (e.g. relation+coco.npy).

Sources and augmentation
------------------------
`multilabel_sources(data, image_size, protocol)` -> {'train', 'val', 'test'} `MultiLabelSource`s
with 'image', 'labels' float32 [C], 'annotations' float32 [C], 'index' int32 (the row, for a
per-image memory bank). Eval sources give 'image' float32 [S, S, 3]: shorter side to S
(bicubic), centre crop, CLIP mean/std (jdjax.data.video.clip_preprocess). The train source gives
uint8 [S', S', 3] (generated images as they are; a file stretched to S' = train_size, default S,
so that the random crops can reach every object) and `train_view_augment` turns a batch into
SCPNet's three views (spec §4.3): 'image' = weak view, 'image_w' = a second independent weak view,
'image_s' = strong view, all CLIP-normalised float32 [B, S, S, 3]. Weak = RandomHorizontalFlip +
RandomResizedCrop(S) (torchvision's: area `crop_scale`, aspect 3/4-4/3, bilinear); strong =
RandAugment(3, 5) of SCPNet's randaugment.py (TorchSSL's variant) applied to the image before the
weak transform: 3 ops drawn with replacement from RAND_AUGMENT_OPS, each with a magnitude drawn
uniformly over its range (that code ignores m = 5), then a Cutout square of side U(0, 0.5) x width
filled (125, 123, 114).

Readers (from a local directory; every one returns a `MultiLabelData` with 'train', 'val', 'test')
------------------------------------------------------------------------------------------------
The val split is a fixed random `val_fraction` of the training images (for `seed`); checkpoints
are never chosen on test. Images with no positive label are dropped from every split (COCO
images without annotations; the SPML protocol needs one positive). Image files are checked when
the data set is read: a missing one is a FileNotFoundError naming it, unless `skip_missing=True`
drops it (a warning gives the count).

* COCO 2014 (`coco2014`): <data_dir>/annotations/instances_{train,val}2014.json, images in
  <data_dir>/{train,val}2014/; val2014 is the test split. Classes = category names ordered by
  category id; every annotation (crowd ones too) makes its category positive.
* VOC (`voc`, year 2007 or 2012): <data_dir>/VOCdevkit/VOC<year>/ (or <data_dir>/VOC<year>/) with
  Annotations/<id>.xml, ImageSets/Main/<set>.txt and JPEGImages/<id>.jpg. 2007: trainval / test;
  2012: train / val as test (SCPNet's 5,717 / 5,823; VOC 2012 test labels are not public).
  Positives: every <object>'s <name>, 'difficult' objects included. Class names for prompts:
  VOC_CLASSES with 'diningtable', 'pottedplant', 'tvmonitor' written 'dining table', 'potted
  plant', 'tv monitor'.
* NUS-WIDE (`nuswide`, 81 concepts): <data_dir>/Concepts81.txt (one concept a line, the class
  order), <data_dir>/ImageList/{Train,Test}Imagelist.txt (one relative image path a line, '\\' read
  as '/'), <data_dir>/TrainTestLabels/Labels_<concept>_{Train,Test}.txt (one 0 or 1 a line,
  aligned with the image list), images in <data_dir>/Flickr/<relative path>.
* CUB-200-2011 attributes (`cub`, 312): <data_dir> = CUB_200_2011/ with images.txt, train_test_split.txt,
  attributes/image_attribute_labels.txt (image_id attribute_id is_present certainty_id time; 5 or
  6 fields, the official file has lines with an extra one; is_present is the label),
  attributes.txt (in <data_dir>, <data_dir>/attributes/ or the parent directory, where the
  official archive puts it) and images/. Class names: 'has_bill_shape::curved_(up_or_down)' ->
  'curved bill shape' (the value without parenthesised notes, then the group without 'has_',
  underscores as spaces).
Malformed annotations raise ValueError naming the file and the record (file:line, JSON index
and id, or the XML file); a missing annotation file raises FileNotFoundError naming the path and
the expected layout.
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from jdjax.data.images import SPLIT_SEEDS, _shape_mask
from jdjax.data.video import clip_normalize, clip_preprocess

# ----------------------------------------------------------------------------- embedded scenes

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
PALETTE = np.array(  # [8, 3] RGB in [0, 1], in COLOURS order
    [[0.90, 0.15, 0.15], [0.15, 0.80, 0.20], [0.20, 0.35, 0.95], [0.90, 0.85, 0.15],
     [0.60, 0.20, 0.80], [1.00, 0.55, 0.10], [0.95, 0.95, 0.95], [0.10, 0.85, 0.90]], np.float32
)
SHAPES = ("circle", "square", "triangle", "cross")
_MASKS = ("disk", "square", "triangle", "cross")  # jdjax.data.images shape names, in SHAPES order
MAX_CLASSES = len(COLOURS) * len(SHAPES)
P_SECOND_CLIQUE, P_MEMBER, MIN_MEMBERS, P_DISTRACTOR = 0.25, 0.7, 2, 0.2
RADIUS = (0.30, 0.42)  # object radius, fraction of the grid cell
FAINT_CONTRAST = (0.08, 0.20)  # a faint object's colour: background + contrast x (colour - background)
NOISE = 0.03
SCENE_SPLITS = {**SPLIT_SEEDS, "pretrain": 3}
DEFAULT_SCENE_SIZES = {"pretrain": 4000, "train": 2000, "val": 500, "test": 1000}


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """One split of a multi-label data set.

    Attributes:
      images: uint8 [N, S, S, 3] pixels (generated data) or N image file paths (read lazily).
      labels: uint8 [N, C] full labels, 0/1.
      captions: N captions (generated data) or None.
      salient: uint8 [N, C], generated data: the present objects drawn at full contrast (labels minus
        the faint ones), or None.
    """

    images: np.ndarray | tuple[str, ...]
    labels: np.ndarray
    captions: tuple[str, ...] | None = None
    salient: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class MultiLabelData:
    """A data set: split name -> LabelledImages, and the C class names (prompt words)."""

    splits: dict[str, LabelledImages]
    class_names: tuple[str, ...]


def scene_class_names(num_classes: int = 16) -> list[str]:
    """'red circle', 'red square', ...: class c is COLOURS[c // 4] SHAPES[c % 4]."""
    return [f"{COLOURS[c // len(SHAPES)]} {SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]


def scene_cliques(num_classes: int = 16, num_cliques: int = 4) -> np.ndarray:
    """int32 [C]: the clique of each class, (c + c // K) % K (a Latin square, see the module docstring)."""
    c = np.arange(num_classes)
    return ((c + c // num_cliques) % num_cliques).astype(np.int32)


def _check_scene_args(split: str, num_images: int, image_size: int, num_classes: int, num_cliques: int) -> None:
    if split not in SCENE_SPLITS:
        raise ValueError(f"shape-scene split must be one of {sorted(SCENE_SPLITS)}, got {split!r}.")
    if num_images <= 0:
        raise ValueError(f"num_images={num_images} must be positive.")
    if not 2 <= num_cliques or num_classes % num_cliques or num_classes // num_cliques < MIN_MEMBERS:
        raise ValueError(
            f"num_classes={num_classes} must split into num_cliques={num_cliques} >= 2 cliques of at least "
            f"{MIN_MEMBERS} classes each (num_classes a multiple of num_cliques), e.g. 16 and 4."
        )
    if num_classes > MAX_CLASSES:
        raise ValueError(f"num_classes={num_classes} exceeds the {MAX_CLASSES} colour-shape objects.")
    if image_size < 24:
        raise ValueError(f"image_size={image_size} is too small to draw several shapes; use at least 24.")


def _scene_classes(rng: np.random.Generator, clique: np.ndarray, num_cliques: int) -> list[int]:
    """The classes present in one image (steps 1-3 of the module docstring)."""
    chosen = [int(rng.integers(num_cliques))]
    if rng.random() < P_SECOND_CLIQUE:
        chosen.append(int((chosen[0] + 1 + rng.integers(num_cliques - 1)) % num_cliques))
    present = []
    for k in chosen:
        members = np.flatnonzero(clique == k)
        keep = rng.random(len(members)) < P_MEMBER
        if keep.sum() < MIN_MEMBERS:
            keep[rng.choice(np.flatnonzero(~keep), MIN_MEMBERS - int(keep.sum()), replace=False)] = True
        present += members[keep].tolist()
    outside = np.flatnonzero(~np.isin(clique, chosen))
    if outside.size and rng.random() < P_DISTRACTOR:
        present.append(int(rng.choice(outside)))
    return present


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def shape_scenes(
    split: str, num_images: int, image_size: int = 48, num_classes: int = 16, num_cliques: int = 4, seed: int = 0,
    faint: float = 0.0,
) -> LabelledImages:
    """`num_images` generated multi-label images of one split (see the module docstring); each object
    is drawn faint (contrast FAINT_CONTRAST against the background) with probability `faint`.

    Returns LabelledImages with images uint8 [N, S, S, 3], labels and salient uint8 [N, C] and captions.
    """
    _check_scene_args(split, num_images, image_size, num_classes, num_cliques)
    if not 0.0 <= faint < 1.0:
        raise ValueError(f"faint={faint} must be a probability in [0, 1).")
    clique = scene_cliques(num_classes, num_cliques)
    names = scene_class_names(num_classes)
    grid = math.ceil(math.sqrt(2 * (num_classes // num_cliques) + 1))
    s, cell = image_size, image_size / grid
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5  # [S, S] pixel centres
    images = np.empty((num_images, s, s, 3), np.uint8)
    labels = np.zeros((num_images, num_classes), np.uint8)
    salient = np.zeros((num_images, num_classes), np.uint8)
    captions = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, SCENE_SPLITS[split], i])
        present = _scene_classes(rng, clique, num_cliques)
        cells = rng.permutation(grid * grid)[: len(present)]
        background = rng.uniform(0.0, 0.15, 3).astype(np.float32)
        image = np.broadcast_to(background, (s, s, 3)).copy()  # [S, S, 3]
        # Drawn after the layout so that faint = 0 leaves every image as it was.
        faded = np.random.default_rng([seed, SCENE_SPLITS[split], i, 1]).random(len(present)) < faint
        for c, pos, fade in zip(present, cells, faded):
            radius = rng.uniform(*RADIUS) * cell
            cy, cx = (np.array(divmod(int(pos), grid)) + 0.5) * cell + rng.uniform(-1, 1, 2) * (cell / 2 - radius)
            colour = np.clip(PALETTE[c // len(SHAPES)] * rng.uniform(0.8, 1.0) + rng.uniform(-0.05, 0.05, 3), 0, 1)
            if fade:
                colour = background + rng.uniform(*FAINT_CONTRAST) * (colour - background)
            else:
                salient[i, c] = 1
            image[_shape_mask(_MASKS[c % len(SHAPES)], yy, xx, cy, cx, radius)] = colour
        image += rng.standard_normal((s, s, 3), dtype=np.float32) * NOISE
        images[i] = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
        labels[i, present] = 1
        in_order = [c for _, c in sorted(zip(cells.tolist(), present))]
        captions.append("a photo of " + _join([f"a {names[c]}" for c in in_order]) + ".")
    return LabelledImages(images, labels, tuple(captions), salient)


def subset_captions(labels, class_names, seed: int = 0) -> tuple[str, ...]:
    """One caption per image naming a random non-empty subset of its labels in random order, "a photo of
    a red circle and a blue cross." (k uniform in 1..n of the image's n labels; deterministic in seed).
    Web captions name some of what is in a picture, not all: trained on these, a CLIP also aligns
    single-object prompts, which full listings (always 2+ objects) leave out of distribution."""
    out = []
    for i, row in enumerate(_binary(labels, "labels")):
        rng = np.random.default_rng([seed, 29, i])
        present = np.flatnonzero(row)
        chosen = rng.permutation(present)[: rng.integers(1, len(present) + 1)] if len(present) else []
        out.append("a photo of " + _join([f"a {class_names[c]}" for c in chosen]) + "." if len(chosen) else "a photo.")
    return tuple(out)


def shape_scene_data(
    sizes: dict[str, int] | None = None, image_size: int = 48, num_classes: int = 16, num_cliques: int = 4,
    seed: int = 0, faint: float = 0.0,
) -> MultiLabelData:
    """The generated splits of `sizes` (default DEFAULT_SCENE_SIZES: pretrain, train, val, test)."""
    sizes = DEFAULT_SCENE_SIZES if sizes is None else sizes
    splits = {name: shape_scenes(name, n, image_size, num_classes, num_cliques, seed, faint)
              for name, n in sizes.items()}
    return MultiLabelData(splits, tuple(scene_class_names(num_classes)))


# ----------------------------------------------------------------------------- label protocols

LABEL_PROTOCOLS = ("full", "single_positive", "partial")


def _binary(labels, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 2 or (y.size and not np.isin(y, (0, 1)).all()):
        raise ValueError(f"{name}: labels must be a 0/1 array [N images, C classes], got {y.dtype} {y.shape}.")
    return y.astype(bool)


def full_annotations(labels) -> np.ndarray:
    """float32 [N, C] = 2 * labels - 1: every entry known."""
    return np.where(_binary(labels, "full_annotations"), 1.0, -1.0).astype(np.float32)


def single_positive(labels, rng: np.random.Generator) -> np.ndarray:
    """float32 [N, C]: one positive per image drawn uniformly (1), everything else unknown (0).

    An image with no positive keeps an all-unknown row.
    """
    y = _binary(labels, "single_positive")
    keys = np.where(y, rng.random(y.shape), -1.0)  # [N, C]; the largest key among the positives wins
    out = np.zeros(y.shape, np.float32)
    rows = np.flatnonzero(y.any(1))
    out[rows, keys[rows].argmax(1)] = 1.0
    return out


def partial_labels(labels, proportion: float, rng: np.random.Generator) -> np.ndarray:
    """float32 [N, C] in {1, 0, -1}: each entry kept (+1 positive, -1 negative) with probability
    `proportion` in (0, 1], otherwise unknown (0)."""
    y = _binary(labels, "partial_labels")
    if not 0 < proportion <= 1:
        raise ValueError(f"the proportion of known labels must be in (0, 1], got {proportion}.")
    keep = rng.random(y.shape) < proportion
    return np.where(keep, np.where(y, 1.0, -1.0), 0.0).astype(np.float32)


def annotate(labels, protocol: str, rng: np.random.Generator, proportion: float = 1.0) -> np.ndarray:
    """The training annotations [N, C] of one of LABEL_PROTOCOLS (`proportion`: 'partial' only)."""
    if protocol == "full":
        return full_annotations(labels)
    if protocol == "single_positive":
        return single_positive(labels, rng)
    if protocol == "partial":
        return partial_labels(labels, proportion, rng)
    raise ValueError(f"unknown label protocol {protocol!r}; choose one of {list(LABEL_PROTOCOLS)}.")


# ----------------------------------------------------------------------------- relation matrix


def cooccurrence_relation(labels) -> np.ndarray:
    """float32 [C, C]: cosine similarity of the label columns of a fully labelled set [N, C].

    Symmetric, diagonal 1, entries in [0, 1]; a class with no positive has the identity row and
    column.
    """
    y = _binary(labels, "cooccurrence_relation").astype(np.float64)
    norm = np.sqrt(y.sum(0))  # [C]; sum of squares of 0/1
    r = np.divide(y.T @ y, np.outer(norm, norm), out=np.zeros((y.shape[1],) * 2), where=np.outer(norm, norm) > 0)
    np.fill_diagonal(r, 1.0)
    return r.astype(np.float32)


def load_relation(path: str, num_classes: int | None = None) -> np.ndarray:
    """float32 [C, C] from a .npy file (SCPNet's relation+<dataset>.npy), rows and columns in the
    data set's class order (C = num_classes when given). It is not required to be symmetric (SCPNet
    builds G and S row by row)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"relation file {path!r} does not exist; give a .npy [C, C] class relation matrix such as SCPNet's "
            "relation+coco.npy (cosine similarities of CLIP text embeddings of the class names)."
        )
    try:
        r = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable .npy array ({e}).") from e
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"{path} holds an array of shape {r.shape}; a relation matrix is square, [C, C].")
    if num_classes is not None and r.shape != (num_classes, num_classes):
        raise ValueError(
            f"{path} holds an array of shape {r.shape}, but the data set has {num_classes} classes: the relation "
            f"matrix must be [{num_classes}, {num_classes}]. Is it the file of another data set?"
        )
    if not np.isfinite(r).all():
        raise ValueError(f"{path} holds {int((~np.isfinite(r)).sum())} NaN or infinite entries; regenerate it.")
    return r.astype(np.float32)


# ----------------------------------------------------------------------------- sources


class MultiLabelSource:
    """Random-access multi-label examples (a source of jdjax.data.pipeline), decoding files per batch.

    `get_batch(indices)` -> {'image': float32 [B, S, S, 3] CLIP-normalised (eval) or uint8
    [B, S', S', 3] (train=True, for `train_view_augment`), 'labels' float32 [B, C] (0/1),
    'annotations' float32 [B, C] (1 / 0 / -1), 'index' int32 [B] (the rows)}.

    Args:
      images: uint8 [N, H, W, 3] pixels or N image file paths.
      labels: [N, C] full 0/1 labels.
      annotations: [N, C] in {1, 0, -1}.
      image_size: S of the eval images (shorter side to S, centre crop).
      train: give raw uint8 pixels: arrays as they are, files stretched to train_size x train_size
        (default S; the whole image is kept so the random crops can reach every object).
      num_threads: files decoded in parallel per batch.
    """

    def __init__(self, images, labels, annotations, image_size: int, train: bool = False,
                 train_size: int | None = None, num_threads: int = 1):
        self.labels = np.asarray(labels, np.float32)
        self.annotations = np.asarray(annotations, np.float32)
        if self.labels.ndim != 2 or self.annotations.shape != self.labels.shape or len(images) != len(self.labels):
            raise ValueError(
                f"MultiLabelSource: {len(images)} images, labels {self.labels.shape} and annotations "
                f"{self.annotations.shape} must agree ([N], [N, C], [N, C])."
            )
        if isinstance(images, np.ndarray) and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
            raise ValueError(f"MultiLabelSource pixels must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")
        self.images = images if isinstance(images, np.ndarray) else list(images)
        self.image_size, self.train = image_size, train
        self.train_size, self.num_threads = train_size or image_size, num_threads

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image {path} does not exist (it was there when the data set was read).") from e
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path} is not a readable image ({e}); re-download it or drop it from the data.") from e
        if self.train:
            return np.asarray(image.resize((self.train_size,) * 2, Image.Resampling.BICUBIC), np.uint8)
        return clip_preprocess(np.asarray(image, np.uint8)[None], self.image_size)[0]

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if isinstance(self.images, np.ndarray):
            image = self.images[indices]  # [B, H, W, 3] uint8
            if not self.train:
                same = image.shape[1:3] == (self.image_size,) * 2
                image = clip_normalize(image) if same else clip_preprocess(image, self.image_size)
        else:
            paths = [self.images[i] for i in indices]
            if self.num_threads > 1:
                with ThreadPoolExecutor(self.num_threads) as pool:
                    image = np.stack(list(pool.map(self._decode, paths)))
            else:
                image = np.stack([self._decode(p) for p in paths])
        return {
            "image": image,
            "labels": self.labels[indices],  # [B, C]
            "annotations": self.annotations[indices],  # [B, C]
            "index": indices.astype(np.int32),  # [B]
        }


def multilabel_sources(
    data: MultiLabelData, image_size: int, protocol: str = "single_positive", proportion: float = 1.0,
    seed: int = 0, train_size: int | None = None, num_threads: int = 1,
) -> dict[str, MultiLabelSource]:
    """{'train' (raw uint8 images, `protocol` annotations drawn once for `seed`), 'val', 'test' (eval
    images, full annotations)} sources of `data`."""
    train = data.splits["train"]
    ann = annotate(train.labels, protocol, np.random.default_rng([seed, 17]), proportion)
    out = {"train": MultiLabelSource(train.images, train.labels, ann, image_size, True, train_size, num_threads)}
    for name in ("val", "test"):
        split = data.splits[name]
        out[name] = MultiLabelSource(split.images, split.labels, full_annotations(split.labels), image_size,
                                     num_threads=num_threads)
    return out


# ----------------------------------------------------------------------------- augmentation

RAND_AUGMENT_OPS = (  # (op, low, high) of SCPNet's randaugment.py; the magnitude is uniform in [low, high]
    ("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95), ("Contrast", 0.05, 0.95),
    ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8), ("Rotate", -30, 30), ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3), ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
_AFFINE = Image.Transform.AFFINE
_OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Identity": lambda im, v: im,
    "Posterize": lambda im, v: ImageOps.posterize(im, int(v)),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, _AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, _AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, _AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, _AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}
CUTOUT_FILL = (125, 123, 114)


def rand_augment(image: Image.Image, rng: np.random.Generator, num_ops: int = 3) -> Image.Image:
    """SCPNet's RandAugment(3, 5): `num_ops` ops drawn with replacement, uniform magnitudes, Cutout."""
    for k in rng.integers(len(RAND_AUGMENT_OPS), size=num_ops):
        name, low, high = RAND_AUGMENT_OPS[k]
        image = _OPS[name](image, low + (high - low) * rng.random())
    pixels = np.array(image)  # [H, W, 3] uint8
    h, w = pixels.shape[:2]
    side = rng.random() * 0.5 * w
    x0, y0 = (int(max(0.0, c - side / 2)) for c in rng.uniform(0, (w, h)))
    pixels[y0 : y0 + round(side), x0 : x0 + round(side)] = CUTOUT_FILL
    return Image.fromarray(pixels)


def _crop_box(height: int, width: int, scale: tuple[float, float], rng: np.random.Generator):
    """torchvision RandomResizedCrop.get_params: (top, left, h, w), aspect ratio 3/4 to 4/3."""
    area, log_ratio = height * width, (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height  # fallback: the largest centred crop whose aspect is within the range
    w, h = width, height
    if ratio < 3 / 4:
        h = round(width / (3 / 4))
    elif ratio > 4 / 3:
        w = round(height * 4 / 3)
    return (height - h) // 2, (width - w) // 2, h, w


def weak_view(image: Image.Image, size: int, rng: np.random.Generator, crop_scale=(0.08, 1.0)) -> np.ndarray:
    """RandomHorizontalFlip then RandomResizedCrop(size, crop_scale), bilinear: uint8 [size, size, 3]."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left, h, w = _crop_box(image.height, image.width, crop_scale, rng)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))


def train_view_augment(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0), pessl_views: bool = True):
    """SCPNet's training views (spec §4.3) as a pipeline `augment(batch, draws)` hook.

    The batch's 'image' must be raw uint8 [B, H, W, 3] (a train=True MultiLabelSource); the result
    has 'image' (weak) and, with `pessl_views`, 'image_w' (a second weak view) and 'image_s'
    (strong), each float32 [B, image_size, image_size, 3] CLIP-normalised, and the other keys
    unchanged. Without `pessl_views` (runs whose loss reads the weak view only) the weak views are
    the same as with them. Row b's views depend only on draws[b] (jdjax.data.pipeline: uniform
    numbers of (seed, step, global row)), which seed its own generator, so a batch is the same for
    any number of processes.
    """
    num_views = 3 if pessl_views else 1

    def augment(batch: dict, draws: np.ndarray) -> dict:
        images = batch["image"]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"train_view_augment needs raw uint8 images [B, H, W, 3], got {images.dtype} {images.shape}; build "
                "the training source with train=True (multilabel_sources does)."
            )
        views = np.empty((num_views, len(images), image_size, image_size, 3), np.uint8)  # [V, B, S, S, 3]
        for b, pixels in enumerate(images):
            rng = np.random.default_rng(np.floor(np.asarray(draws[b]) * 2.0**32).astype(np.uint64))
            image = Image.fromarray(pixels)
            views[0, b] = weak_view(image, image_size, rng, crop_scale)
            if pessl_views:
                views[1, b] = weak_view(image, image_size, rng, crop_scale)
                views[2, b] = weak_view(rand_augment(image, rng), image_size, rng, crop_scale)
        views = clip_normalize(views)
        if not pessl_views:
            return {**batch, "image": views[0]}
        return {**batch, "image": views[0], "image_w": views[1], "image_s": views[2]}

    return augment


# ----------------------------------------------------------------------------- readers

COCO_LAYOUT = "<data_dir>/annotations/instances_{train,val}2014.json and images in <data_dir>/{train,val}2014/"
VOC_LAYOUT = (
    "<data_dir>/VOCdevkit/VOC<year>/ (or <data_dir>/VOC<year>/) holding Annotations/<id>.xml, "
    "ImageSets/Main/<set>.txt and JPEGImages/<id>.jpg"
)
NUS_LAYOUT = (
    "<data_dir>/Concepts81.txt, <data_dir>/ImageList/{Train,Test}Imagelist.txt, "
    "<data_dir>/TrainTestLabels/Labels_<concept>_{Train,Test}.txt and images in <data_dir>/Flickr/"
)
CUB_LAYOUT = (
    "<data_dir> = CUB_200_2011/ holding images.txt, train_test_split.txt, attributes/image_attribute_labels.txt, "
    "images/ and attributes.txt (in <data_dir>, <data_dir>/attributes/ or its parent)"
)
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_VOC_WORDS = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
VOC_SETS = {2007: ("trainval", "test"), 2012: ("train", "val")}  # (train, test) image sets per year


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _need(path: str, dataset: str, layout: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; the {dataset} reader expects {layout}.")
    return path


def _lines(path: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines."""
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _present(paths: list[str], skip_missing: bool, source: str, layout: str) -> np.ndarray:
    """bool [N]: which image files exist (one directory listing per directory)."""
    listing: dict[str, set[str]] = {}
    ok = np.empty(len(paths), bool)
    for i, path in enumerate(paths):
        head, name = os.path.split(path)
        if head not in listing:
            listing[head] = set(os.listdir(head)) if os.path.isdir(head) else set()
        ok[i] = name in listing[head]
    missing = int((~ok).sum())
    if missing and not skip_missing:
        raise FileNotFoundError(
            f"{missing} of the {len(paths)} images listed in {source} are missing, e.g. {paths[int(np.argmin(ok))]} "
            f"(expected layout: {layout}); download them or pass skip_missing=True to drop them."
        )
    if missing:
        logging.warning("%s: skipped %d of %d images with no file.", source, missing, len(paths))
    return ok


def _kept(paths: list[str], labels: np.ndarray, skip_missing: bool, source: str, layout: str):
    """(paths, labels) without the images that have no positive label or (with skip_missing) no file."""
    labelled = labels.any(1)
    if not labelled.all():
        logging.info("%s: dropped %d of %d images with no positive label.", source, int((~labelled).sum()), len(paths))
    keep = np.flatnonzero(labelled)
    keep = keep[_present([paths[i] for i in keep], skip_missing, source, layout)]
    _require(keep.size > 0, f"{source} gives no labelled image.")
    return [paths[i] for i in keep], labels[keep]


def _finish(class_names, train, test, val_fraction: float, seed: int, skip_missing: bool, layout: str):
    """MultiLabelData from (paths, labels, source) of the train and test annotations; val carved from train."""
    (train_paths, train_labels), (test_paths, test_labels) = (
        _kept(p, y, skip_missing, src, layout) for p, y, src in (train, test)
    )
    n = len(train_paths)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(
            f"val_fraction={val_fraction} of the {n} training images of {train[2]} leaves none to train on."
        )
    perm = np.random.default_rng(seed).permutation(n)
    parts = {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}
    splits = {k: LabelledImages(tuple(train_paths[i] for i in idx), train_labels[idx]) for k, idx in parts.items()}
    splits["test"] = LabelledImages(tuple(test_paths), test_labels)
    return MultiLabelData(splits, tuple(class_names))


def _coco_annotation_error(path: str, i: int, ann, row: dict, column: dict) -> str:
    if not isinstance(ann, dict):
        return f"{path}: annotations[{i}] must be an object, got {ann!r}."
    image_id, cat = ann.get("image_id"), ann.get("category_id")
    where = f"{path}: annotations[{i}] (id {ann.get('id')!r})"
    if type(image_id) is not int or image_id not in row:
        return f"{where}: image_id {image_id!r} is not in 'images'."
    return f"{where}: category_id {cat!r} is not in 'categories'."


def _coco_annotations(data_dir: str, which: str) -> tuple[list[str], list[str], np.ndarray, str]:
    """(class names by category id, image paths, uint8 labels [N, C], annotation file) of train2014/val2014."""
    path = _need(os.path.join(data_dir, "annotations", f"instances_{which}.json"), "COCO 2014", COCO_LAYOUT)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); is it truncated?") from e
    keys = ("images", "annotations", "categories")
    _require(isinstance(data, dict) and all(isinstance(data.get(k), list) for k in keys),
             f"{path}: expected an object with {keys} lists; is it instances_{which}.json?")
    names: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        ok = isinstance(cat, dict) and type(cat.get("id")) is int and isinstance(cat.get("name"), str)
        _require(ok and cat["name"].strip(), f"{path}: categories[{i}] needs an integer 'id' and a name, got {cat!r}.")
        _require(cat["id"] not in names, f"{path}: categories[{i}] repeats category id {cat['id']}.")
        names[cat["id"]] = cat["name"].strip()
    column = {cid: k for k, cid in enumerate(sorted(names))}
    row, paths = {}, []
    for i, im in enumerate(data["images"]):
        ok = isinstance(im, dict) and type(im.get("id")) is int and isinstance(im.get("file_name"), str)
        _require(ok and im["file_name"], f"{path}: images[{i}] needs an integer 'id' and a 'file_name', got {im!r}.")
        _require(im["id"] not in row, f"{path}: images[{i}] repeats image id {im['id']}.")
        row[im["id"]] = len(paths)
        paths.append(os.path.join(data_dir, which, im["file_name"]))
    labels = np.zeros((len(paths), len(column)), np.uint8)
    for i, ann in enumerate(data["annotations"]):
        image_id, cat = (ann.get("image_id"), ann.get("category_id")) if isinstance(ann, dict) else (None, None)
        if type(image_id) is not int or image_id not in row or type(cat) is not int or cat not in column:
            raise ValueError(_coco_annotation_error(path, i, ann, row, column))
        labels[row[image_id], column[cat]] = 1
    return [names[c] for c in sorted(names)], paths, labels, path


def coco2014(data_dir: str, val_fraction: float = 0.1, seed: int = 0, skip_missing: bool = False) -> MultiLabelData:
    """COCO 2014, 80 classes: train2014 (val carved from it) and val2014 as test (module docstring)."""
    names, train_paths, train_labels, train_file = _coco_annotations(data_dir, "train2014")
    test_names, test_paths, test_labels, test_file = _coco_annotations(data_dir, "val2014")
    _require(names == test_names, f"{train_file} and {test_file} list different categories; use one COCO 2014 release.")
    return _finish(names, (train_paths, train_labels, train_file), (test_paths, test_labels, test_file),
                   val_fraction, seed, skip_missing, COCO_LAYOUT)


def _voc_set(root: str, image_set: str) -> tuple[list[str], np.ndarray, str]:
    """(image paths, uint8 labels [N, 20], image-set file) of ImageSets/Main/<image_set>.txt."""
    list_path = _need(os.path.join(root, "ImageSets", "Main", f"{image_set}.txt"), "VOC", VOC_LAYOUT)
    ids = []
    for number, line in _lines(list_path):
        _require(len(line.split()) == 1, f"{list_path}:{number}: expected one image id, got {line!r}.")
        ids.append(line)
    column = {c: k for k, c in enumerate(VOC_CLASSES)}
    labels = np.zeros((len(ids), len(VOC_CLASSES)), np.uint8)
    for i, image_id in enumerate(ids):
        xml = _need(os.path.join(root, "Annotations", f"{image_id}.xml"), "VOC", VOC_LAYOUT)
        try:
            tree = ET.parse(xml)
        except ET.ParseError as e:
            raise ValueError(f"{xml}:{e.position[0]}: not valid XML ({e}).") from e
        for j, obj in enumerate(tree.getroot().iter("object"), 1):
            name = (obj.findtext("name") or "").strip()
            _require(bool(name), f"{xml}: <object> {j} has no <name>.")
            _require(name in column, f"{xml}: <object> {j} is a {name!r}, not one of the 20 VOC classes {VOC_CLASSES}.")
            labels[i, column[name]] = 1
    return [os.path.join(root, "JPEGImages", f"{i}.jpg") for i in ids], labels, list_path


def voc(data_dir: str, year: int = 2012, val_fraction: float = 0.1, seed: int = 0,
        skip_missing: bool = False) -> MultiLabelData:
    """PASCAL VOC 2007 (trainval / test) or 2012 (train / val as test), 20 classes (module docstring)."""
    _require(year in VOC_SETS, f"VOC year must be one of {sorted(VOC_SETS)}, got {year!r}.")
    roots = [os.path.join(data_dir, "VOCdevkit", f"VOC{year}"), os.path.join(data_dir, f"VOC{year}")]
    root = next((r for r in roots if os.path.isdir(r)), None)
    if root is None:
        raise FileNotFoundError(f"neither {roots[0]} nor {roots[1]} exists; the VOC reader expects {VOC_LAYOUT}.")
    train, test = (_voc_set(root, s) for s in VOC_SETS[year])
    names = [_VOC_WORDS.get(c, c) for c in VOC_CLASSES]
    return _finish(names, train, test, val_fraction, seed, skip_missing, VOC_LAYOUT)


def _nus_part(data_dir: str, concepts: list[str], part: str) -> tuple[list[str], np.ndarray, str]:
    """(image paths, uint8 labels [N, 81], image list) of the 'Train' or 'Test' part."""
    list_path = _need(os.path.join(data_dir, "ImageList", f"{part}Imagelist.txt"), "NUS-WIDE", NUS_LAYOUT)
    with open(list_path, encoding="utf-8") as f:
        rels = f.read().rstrip().splitlines()
    blank = next((n for n, r in enumerate(rels, 1) if not r.strip()), None)
    _require(blank is None, f"{list_path}:{blank}: empty line; the list must hold one image path per line.")
    labels = np.zeros((len(rels), len(concepts)), np.uint8)
    for c, concept in enumerate(concepts):
        path = _need(os.path.join(data_dir, "TrainTestLabels", f"Labels_{concept}_{part}.txt"), "NUS-WIDE", NUS_LAYOUT)
        with open(path, encoding="utf-8") as f:
            values = [v.strip() for v in f.read().rstrip().splitlines()]
        bad = next((n for n, v in enumerate(values, 1) if v not in ("0", "1")), None)
        _require(bad is None, f"{path}:{bad}: expected 0 or 1, got {values[bad - 1] if bad else ''!r}.")
        _require(len(values) == len(rels),
                 f"{path} has {len(values)} lines but {list_path} lists {len(rels)} images; they must align "
                 "line by line.")
        labels[:, c] = np.asarray(values) == "1"
    paths = [os.path.join(data_dir, "Flickr", *r.strip().replace("\\", "/").split("/")) for r in rels]
    return paths, labels, list_path


def nuswide(data_dir: str, val_fraction: float = 0.1, seed: int = 0, skip_missing: bool = False) -> MultiLabelData:
    """NUS-WIDE, 81 concepts: the official train list (val carved from it) and test list (module docstring)."""
    concepts_path = _need(os.path.join(data_dir, "Concepts81.txt"), "NUS-WIDE", NUS_LAYOUT)
    concepts = [line for _, line in _lines(concepts_path)]
    _require(bool(concepts) and len(set(concepts)) == len(concepts),
             f"{concepts_path}: expected distinct concept names, one a line, got {len(concepts)} lines.")
    train, test = (_nus_part(data_dir, concepts, part) for part in ("Train", "Test"))
    return _finish([c.replace("_", " ") for c in concepts], train, test, val_fraction, seed, skip_missing, NUS_LAYOUT)


def _id_fields(path: str, counts: Sequence[int]) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of the non-blank lines of a whitespace-separated file whose lines have one of
    `counts` fields, the first an integer id."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if fields and (len(fields) not in counts or not fields[0].isdigit()):
                raise ValueError(f"{path}:{number}: expected {' or '.join(map(str, counts))} whitespace-separated "
                                 f"fields starting with an integer id, got {line.strip()!r}.")
            if fields:
                yield number, fields


def cub_class_name(attribute: str) -> str:
    """'has_bill_shape::curved_(up_or_down)' -> 'curved bill shape'; 'has_size::large_(16_-_32_in)' -> 'large size'."""
    group, value = attribute.split("::", 1)
    value = " ".join(re.sub(r"\(.*?\)", " ", value).replace("_", " ").split())
    return f"{value} {group.removeprefix('has_').replace('_', ' ')}"


def cub(data_dir: str, val_fraction: float = 0.1, seed: int = 0, skip_missing: bool = False) -> MultiLabelData:
    """CUB-200-2011, the 312 binary attributes as labels: official train / test split (module docstring)."""
    candidates = [os.path.join(data_dir, "attributes.txt"), os.path.join(data_dir, "attributes", "attributes.txt"),
                  os.path.join(os.path.dirname(os.path.abspath(data_dir)), "attributes.txt")]
    attributes_path = next((p for p in candidates if os.path.isfile(p)), None)
    if attributes_path is None:
        raise FileNotFoundError(f"attributes.txt is in none of {candidates}; the CUB reader expects {CUB_LAYOUT}.")
    attributes = {}
    for number, fields in _id_fields(attributes_path, (2,)):
        _require("::" in fields[1], f"{attributes_path}:{number}: expected '<id> has_<part>::<value>', got {fields!r}.")
        attributes[int(fields[0])] = cub_class_name(fields[1])
    column = {a: k for k, a in enumerate(sorted(attributes))}
    images_path = _need(os.path.join(data_dir, "images.txt"), "CUB", CUB_LAYOUT)
    image_rel = {int(f[0]): f[1] for _, f in _id_fields(images_path, (2,))}
    row = {image_id: r for r, image_id in enumerate(image_rel)}
    split_path = _need(os.path.join(data_dir, "train_test_split.txt"), "CUB", CUB_LAYOUT)
    is_train = {}
    for number, fields in _id_fields(split_path, (2,)):
        _require(fields[1] in ("0", "1"), f"{split_path}:{number}: is_training_image must be 0 or 1: {fields[1]!r}.")
        is_train[int(fields[0])] = fields[1] == "1"
    absent = [i for i in image_rel if i not in is_train]
    _require(not absent, f"{split_path} has no line for image id {absent[0] if absent else ''} of {images_path}.")
    labels_path = _need(os.path.join(data_dir, "attributes", "image_attribute_labels.txt"), "CUB", CUB_LAYOUT)
    labels = np.zeros((len(image_rel), len(column)), np.uint8)
    for number, (image_id, attribute, present, *_) in _id_fields(labels_path, (5, 6)):
        r, k = row.get(int(image_id)), column.get(int(attribute)) if attribute.isdigit() else None
        if r is None or k is None or present not in ("0", "1"):
            what = (f"image id {image_id} is not in {images_path}" if r is None else
                    f"attribute id {attribute!r} is not in {attributes_path}" if k is None else
                    f"is_present must be 0 or 1, got {present!r}")
            raise ValueError(f"{labels_path}:{number}: {what} (fields: image_id attribute_id is_present ...).")
        labels[r, k] = present == "1"
    paths = [os.path.join(data_dir, "images", *image_rel[i].split("/")) for i in image_rel]
    train = np.array([is_train[i] for i in image_rel])
    parts = [([paths[r] for r in np.flatnonzero(sel)], labels[sel], split_path) for sel in (train, ~train)]
    return _finish([attributes[a] for a in sorted(attributes)], *parts, val_fraction, seed, skip_missing, CUB_LAYOUT)


READERS = {"coco2014": coco2014, "voc": voc, "nuswide": nuswide, "cub": cub}


def load_multilabel(dataset: str, data_dir: str, **kwargs) -> MultiLabelData:
    """A public data set by name (READERS); kwargs go to the reader (val_fraction, seed, skip_missing, year)."""
    if dataset not in READERS:
        raise ValueError(f"unknown multi-label data set {dataset!r}; choose one of {sorted(READERS)}.")
    return READERS[dataset](data_dir, **kwargs)

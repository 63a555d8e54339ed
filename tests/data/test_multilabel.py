"""Multi-label data (jdjax/data/multilabel.py): the generated shape scenes and their planted cliques,
the label protocols, the relation matrix, the sources, SCPNet's three-view augmentation, and the
COCO 2014 / VOC / NUS-WIDE / CUB readers on tiny fake data sets in the public layouts."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jdjax.data import multilabel as M
from jdjax.data import pipeline
from jdjax.data.video import clip_normalize, clip_preprocess

# ----------------------------------------------------------------------------- generated scenes


@pytest.fixture(scope="module")
def scenes():
    return M.shape_scene_data({"pretrain": 400, "train": 64, "val": 16, "test": 16}, image_size=48, seed=0)


def test_scene_shapes_dtypes_and_labels(scenes):
    pre = scenes.splits["pretrain"]
    assert pre.images.shape == (400, 48, 48, 3) and pre.images.dtype == np.uint8
    assert pre.labels.shape == (400, 16) and pre.labels.dtype == np.uint8
    assert scenes.class_names[:5] == ("red circle", "red square", "red triangle", "red cross", "green circle")
    assert len(set(scenes.class_names)) == 16 and all(re.fullmatch(r"[a-z]+ [a-z]+", n) for n in scenes.class_names)
    per_image = pre.labels.sum(1)
    assert per_image.min() >= 2 and per_image.max() <= 9  # two cliques of 4 and a distractor at most
    assert pre.labels.sum(0).min() > 0  # every class occurs


def test_captions_name_exactly_the_labels(scenes):
    split = scenes.splits["pretrain"]
    for caption, row in zip(split.captions, split.labels):
        assert caption.startswith("a photo of a ") and caption.endswith(".")
        named = re.findall(r"a ([a-z]+ [a-z]+)", caption.removeprefix("a photo of "))
        assert sorted(named) == sorted(scenes.class_names[c] for c in np.flatnonzero(row))


def test_scenes_deterministic_prefix_stable_and_split_dependent():
    a = M.shape_scenes("train", 12, image_size=32, seed=3)
    b = M.shape_scenes("train", 12, image_size=32, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.captions == b.captions
    prefix = M.shape_scenes("train", 5, image_size=32, seed=3)
    np.testing.assert_array_equal(prefix.images, a.images[:5])
    for other in (M.shape_scenes("train", 12, image_size=32, seed=4), M.shape_scenes("pretrain", 12, 32, seed=3)):
        assert not np.array_equal(other.images, a.images)


def test_objects_are_drawn_in_their_colours(scenes):
    """Every labelled colour has bright pixels near its palette colour; unlabelled colours have none."""
    split = scenes.splits["train"]
    for image, row in zip(split.images, split.labels):
        pixels = image.reshape(-1, 3).astype(np.float32) / 255
        colours = {c // 4 for c in np.flatnonzero(row)}
        for k in range(4):
            near = (np.abs(pixels - M.PALETTE[k]).max(1) < 0.25).sum()
            assert (near >= 10) == (k in colours), (k, near, colours)


def test_cliques_latin_square_and_relation_block_structure(scenes):
    clique = M.scene_cliques(16, 4)
    names = np.array(scenes.class_names)
    assert sorted(names[clique == 0]) == ["blue triangle", "green cross", "red circle", "yellow square"]
    for k in range(4):  # each clique holds every colour and every shape once
        members = names[clique == k]
        assert len({n.split()[0] for n in members}) == 4 and len({n.split()[1] for n in members}) == 4
    r = M.cooccurrence_relation(scenes.splits["pretrain"].labels)
    same = clique[:, None] == clique[None, :]
    off_diagonal = ~np.eye(16, dtype=bool)
    assert r[same & off_diagonal].min() > 0.45 and r[~same].max() < 0.3


def test_faint_objects_keep_the_layout_lose_their_contrast_and_are_not_salient():
    plain = M.shape_scenes("train", 40, image_size=48, seed=1)
    faint = M.shape_scenes("train", 40, image_size=48, seed=1, faint=0.4)
    np.testing.assert_array_equal(plain.salient, plain.labels)  # faint = 0: every object salient
    np.testing.assert_array_equal(faint.labels, plain.labels)
    assert faint.captions == plain.captions
    hidden = (faint.labels == 1) & (faint.salient == 0)
    assert np.all(faint.salient <= faint.labels) and 0.25 < hidden.sum() / faint.labels.sum() < 0.55
    same = ~hidden.any(1)  # images without a faint object are drawn exactly as before
    np.testing.assert_array_equal(faint.images[same], plain.images[same])
    for image, row, salient in zip(faint.images, faint.labels, faint.salient):
        pixels = image.reshape(-1, 3).astype(np.float32) / 255
        for k in {c // 4 for c in np.flatnonzero(row)} - {c // 4 for c in np.flatnonzero(salient)}:
            assert (np.abs(pixels - M.PALETTE[k]).max(1) < 0.25).sum() < 10  # only faint objects of colour k
    with pytest.raises(ValueError, match="faint"):
        M.shape_scenes("train", 2, faint=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"split": "dev"}, "split"), ({"num_images": 0}, "positive"), ({"num_classes": 15}, "multiple"),
     ({"num_classes": 4, "num_cliques": 4}, "at least 2"), ({"num_classes": 40, "num_cliques": 4}, "exceeds"),
     ({"image_size": 16}, "too small")],
)
def test_scene_arguments_checked(kwargs, match):
    args = {"split": "train", "num_images": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        M.shape_scenes(**args)


# ----------------------------------------------------------------------------- label protocols


def _labels(n=300, c=12, seed=0):
    y = (np.random.default_rng(seed).random((n, c)) < 0.3).astype(np.uint8)
    y[:5] = 0  # a few images with no positive
    return y


def test_single_positive_one_true_positive_per_image():
    y = _labels()
    ann = M.single_positive(y, np.random.default_rng(1))
    assert ann.dtype == np.float32 and set(np.unique(ann)) <= {0.0, 1.0}
    has = y.any(1)
    np.testing.assert_array_equal(ann.sum(1), has.astype(np.float32))  # one known positive, none if no label
    assert (y[ann == 1] == 1).all()
    chosen = ann[has].argmax(1)
    assert len(np.unique(chosen)) > 6  # drawn among the positives, not always the first
    np.testing.assert_array_equal(ann, M.single_positive(y, np.random.default_rng(1)))


def test_partial_labels_keep_about_proportion_and_never_contradict():
    y = _labels(400, 16)
    for p in (0.1, 0.5, 0.9):
        ann = M.partial_labels(y, p, np.random.default_rng(2))
        assert set(np.unique(ann)) <= {-1.0, 0.0, 1.0}
        assert abs((ann != 0).mean() - p) < 0.03
        assert (y[ann == 1] == 1).all() and (y[ann == -1] == 0).all()
    np.testing.assert_array_equal(M.partial_labels(y, 1.0, np.random.default_rng(0)), 2.0 * y - 1)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="proportion"):
            M.partial_labels(y, bad, np.random.default_rng(0))


def test_annotate_switch():
    y = _labels(20, 4)

    def rng():
        return np.random.default_rng(5)

    np.testing.assert_array_equal(M.annotate(y, "full", rng()), 2.0 * y - 1)
    np.testing.assert_array_equal(M.annotate(y, "single_positive", rng()), M.single_positive(y, rng()))
    np.testing.assert_array_equal(M.annotate(y, "partial", rng(), 0.4), M.partial_labels(y, 0.4, rng()))
    with pytest.raises(ValueError, match="single_positive"):
        M.annotate(y, "spml", rng())
    with pytest.raises(ValueError, match="0/1"):
        M.annotate(y * 2, "full", rng())


# ----------------------------------------------------------------------------- relation


def test_cooccurrence_relation_by_hand():
    y = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]])
    r = M.cooccurrence_relation(y)
    assert r.dtype == np.float32
    np.testing.assert_allclose(r[0, 1], 2 / np.sqrt(3 * 2), rtol=1e-6)
    np.testing.assert_allclose(r[0, 3], 1 / np.sqrt(3), rtol=1e-6)
    assert r[1, 3] == 0
    np.testing.assert_array_equal(r[2], [0, 0, 1, 0])  # never seen: the identity row
    np.testing.assert_array_equal(r, r.T)
    np.testing.assert_array_equal(np.diag(r), 1)


def test_load_relation(tmp_path):
    r = np.random.default_rng(0).random((5, 5))  # not symmetric: accepted
    path = str(tmp_path / "relation.npy")
    np.save(path, r)
    out = M.load_relation(path, 5)
    assert out.dtype == np.float32 and out.shape == (5, 5)
    np.testing.assert_allclose(out, r, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(5, 5\).*6 classes.*\[6, 6\]"):
        M.load_relation(path, 6)
    with pytest.raises(FileNotFoundError, match="nothing.npy"):
        M.load_relation(str(tmp_path / "nothing.npy"), 5)
    r[1, 2] = np.nan
    np.save(path, r)
    with pytest.raises(ValueError, match="1 NaN"):
        M.load_relation(path, 5)
    (tmp_path / "junk.npy").write_text("not an array")
    with pytest.raises(ValueError, match="junk.npy"):
        M.load_relation(str(tmp_path / "junk.npy"), 5)


# ----------------------------------------------------------------------------- sources and augmentation


def test_scene_sources(scenes):
    src = M.multilabel_sources(scenes, 48, protocol="single_positive", seed=0)
    assert {k: len(v) for k, v in src.items()} == {"train": 64, "val": 16, "test": 16}
    idx = np.array([5, 0, 5])
    train = src["train"].get_batch(idx)
    assert train["image"].dtype == np.uint8 and train["image"].shape == (3, 48, 48, 3)
    np.testing.assert_array_equal(train["image"], scenes.splits["train"].images[idx])
    np.testing.assert_array_equal(train["index"], idx)
    assert train["index"].dtype == np.int32 and train["labels"].dtype == np.float32
    ann = src["train"].annotations
    np.testing.assert_array_equal(ann.sum(1), 1)
    assert (scenes.splits["train"].labels[ann == 1] == 1).all()
    val = src["val"].get_batch(np.array([1, 2]))
    assert val["image"].dtype == np.float32 and val["image"].shape == (2, 48, 48, 3)
    np.testing.assert_allclose(val["image"], clip_normalize(scenes.splits["val"].images[[1, 2]]), rtol=1e-6)
    np.testing.assert_array_equal(val["annotations"], 2 * val["labels"] - 1)
    smaller = M.multilabel_sources(scenes, 32)["test"].get_batch(np.array([0]))  # resized + centre-cropped
    np.testing.assert_allclose(smaller["image"], clip_preprocess(scenes.splits["test"].images[:1], 32), rtol=1e-6)


@pytest.fixture(scope="module")
def raw_batch(scenes):
    return M.multilabel_sources(scenes, 48)["train"].get_batch(np.arange(16))


def test_three_views_shapes_dtypes_and_differences(raw_batch):
    augment = M.train_view_augment(32)
    draws = np.random.default_rng(0).random((16, pipeline.AUGMENT_DRAWS))
    out = augment(raw_batch, draws)
    for key in ("image", "image_w", "image_s"):
        assert out[key].dtype == np.float32 and out[key].shape == (16, 32, 32, 3), key
        assert np.isfinite(out[key]).all()
    np.testing.assert_array_equal(out["labels"], raw_batch["labels"])
    np.testing.assert_array_equal(out["index"], raw_batch["index"])
    for a, b in (("image", "image_w"), ("image", "image_s"), ("image_w", "image_s")):
        differ = np.abs(out[a] - out[b]).reshape(16, -1).max(1) > 0.1
        assert differ.mean() > 0.8, (a, b)
    again = augment(raw_batch, draws)
    for key in ("image", "image_w", "image_s"):
        np.testing.assert_array_equal(again[key], out[key])
    # row b depends only on draws[b]: a process that holds rows 4..7 gets the same views
    part = augment({k: v[4:8] for k, v in raw_batch.items()}, draws[4:8])
    np.testing.assert_array_equal(part["image_s"], out["image_s"][4:8])
    # without PESSL's views: the same weak view, nothing else
    weak = M.train_view_augment(32, pessl_views=False)(raw_batch, draws)
    assert "image_w" not in weak and "image_s" not in weak
    np.testing.assert_array_equal(weak["image"], out["image"])


def test_three_views_reject_normalised_images(raw_batch):
    batch = {**raw_batch, "image": clip_normalize(raw_batch["image"])}
    with pytest.raises(ValueError, match="train=True"):
        M.train_view_augment(32)(batch, np.zeros((16, 8)))


def test_augmented_training_batches_from_the_pipeline(scenes):
    src = M.multilabel_sources(scenes, 48)["train"]
    ds = pipeline.train_dataset(src, 8, seed=0, augment=M.train_view_augment(48))
    batch = ds[3]
    assert batch["image_s"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(ds[3]["image_w"], batch["image_w"])


def test_crop_box_like_torchvision():
    rng = np.random.default_rng(0)
    for h, w in ((48, 48), (30, 50), (50, 20)):
        for _ in range(100):
            top, left, ch, cw = M._crop_box(h, w, (0.08, 1.0), rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    assert M._crop_box(10, 100, (0.99, 1.0), rng) == (0, 43, 10, 13)  # fallback: centred, aspect 4/3


def test_every_rand_augment_op_keeps_the_size(raw_batch):
    image = Image.fromarray(raw_batch["image"][0])
    for name, low, high in M.RAND_AUGMENT_OPS:
        out = M._OPS[name](image, (low + high) / 2)
        assert out.size == image.size and out.mode == "RGB", name
    rng = np.random.default_rng(0)
    assert M.rand_augment(image, rng).size == image.size


# ----------------------------------------------------------------------------- readers: fake data sets


def _jpeg(path, size=(10, 8), colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


COCO_CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]


def _coco(root, train_anns=None):
    """train2014: images 1-6 (6 has no annotation); val2014: images 7-9."""
    for which, ids, anns in (
        ("train2014", range(1, 7), train_anns or [(1, 1), (1, 3), (2, 2), (3, 3), (4, 1), (5, 2), (5, 2)]),
        ("val2014", range(7, 10), [(7, 1), (8, 2), (9, 3), (9, 1)]),
    ):
        images = [{"id": i, "file_name": f"COCO_{which}_{i:012d}.jpg"} for i in ids]
        for im in images:
            _jpeg(os.path.join(root, which, im["file_name"]))
        data = {"images": images, "categories": COCO_CATEGORIES,
                "annotations": [{"id": 100 + k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(anns)]}
        _write(os.path.join(root, "annotations", f"instances_{which}.json"), json.dumps(data))


def test_coco_reader(tmp_path):
    root = str(tmp_path)
    _coco(root)
    data = M.load_multilabel("coco2014", root, val_fraction=0.25, seed=0)
    assert data.class_names == ("person", "bicycle", "cat")  # by category id
    train, val, test = (data.splits[k] for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 1, 3)  # image 6 (no annotation) dropped
    by_file = {p: y.tolist() for s in (train, val) for p, y in zip(s.images, s.labels)}
    assert sorted(os.path.basename(p) for p in by_file) == [f"COCO_train2014_{i:012d}.jpg" for i in range(1, 6)]
    assert by_file[os.path.join(root, "train2014", "COCO_train2014_000000000001.jpg")] == [1, 0, 1]
    assert by_file[os.path.join(root, "train2014", "COCO_train2014_000000000005.jpg")] == [0, 1, 0]
    assert test.labels.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    again = M.coco2014(root, val_fraction=0.25, seed=0)
    assert again.splits["val"].images == val.images
    other = [M.coco2014(root, val_fraction=0.25, seed=s).splits["val"].images for s in range(6)]
    assert len(set(other)) > 1
    src = M.multilabel_sources(data, 16)
    batch = src["test"].get_batch(np.array([0, 2]))
    assert batch["image"].shape == (2, 16, 16, 3) and batch["image"].dtype == np.float32
    assert src["train"].get_batch(np.array([0]))["image"].shape == (1, 16, 16, 3)
    assert M.multilabel_sources(data, 16, train_size=24, num_threads=2)["train"].get_batch(
        np.array([0, 1]))["image"].shape == (2, 24, 24, 3)


def test_coco_reader_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"instances_train2014.json does not exist.*annotations/instances"):
        M.coco2014(root)
    _coco(root, train_anns=[(1, 1), (2, 7)])
    with pytest.raises(ValueError, match=r"instances_train2014.json: annotations\[1\] \(id 101\): category_id 7"):
        M.coco2014(root)
    _coco(root, train_anns=[(1, 1), (42, 1)])
    with pytest.raises(ValueError, match=r"annotations\[1\] \(id 101\): image_id 42 is not in 'images'"):
        M.coco2014(root)
    _coco(root)
    os.remove(os.path.join(root, "train2014", "COCO_train2014_000000000002.jpg"))
    with pytest.raises(FileNotFoundError, match=r"1 of the 5 images .*COCO_train2014_000000000002.jpg.*skip_missing"):
        M.coco2014(root, val_fraction=0.25)
    data = M.coco2014(root, val_fraction=0.25, skip_missing=True)
    assert len(data.splits["train"]) + len(data.splits["val"]) == 4
    _write(os.path.join(root, "annotations", "instances_val2014.json"), '{"images": [\n')
    with pytest.raises(ValueError, match=r"instances_val2014.json:2: not valid JSON"):
        M.coco2014(root)


VOC_XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
VOC_OBJECT = "<object><name>{name}</name><difficult>{difficult}</difficult></object>"


def _voc(root, year, sets, objects):
    base = os.path.join(root, "VOCdevkit", f"VOC{year}")
    for name, ids in sets.items():
        _write(os.path.join(base, "ImageSets", "Main", f"{name}.txt"), "".join(f"{i}\n" for i in ids))
    for image_id, objs in objects.items():
        xml = VOC_XML.format(id=image_id, objects="".join(VOC_OBJECT.format(name=n, difficult=d) for n, d in objs))
        _write(os.path.join(base, "Annotations", f"{image_id}.xml"), xml)
        _jpeg(os.path.join(base, "JPEGImages", f"{image_id}.jpg"))
    return base


def test_voc_reader(tmp_path):
    root = str(tmp_path)
    objects = {"a1": [("dog", 0), ("person", 0)], "a2": [("tvmonitor", 1)], "a3": [("dog", 0), ("dog", 0)],
               "a4": [("aeroplane", 0)], "b1": [("cat", 0)], "b2": [("pottedplant", 0), ("sofa", 1)]}
    _voc(root, 2012, {"train": ["a1", "a2", "a3", "a4"], "val": ["b1", "b2"]}, objects)
    data = M.voc(root, year=2012, val_fraction=0.25)
    assert len(data.class_names) == 20 and data.class_names[10] == "dining table"
    assert data.class_names[:3] == ("aeroplane", "bicycle", "bird") and data.class_names[19] == "tv monitor"
    assert (len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"])) == (3, 1, 2)
    rows = {os.path.basename(p): y for s in data.splits.values() for p, y in zip(s.images, s.labels)}
    names = np.array(M.VOC_CLASSES)
    assert list(names[rows["a1.jpg"] == 1]) == ["dog", "person"]
    assert list(names[rows["a2.jpg"] == 1]) == ["tvmonitor"]  # difficult objects count
    assert list(names[rows["b2.jpg"] == 1]) == ["pottedplant", "sofa"]
    # VOC 2007 layout directly under data_dir (no VOCdevkit/): trainval / test
    base07 = os.path.join(root, "v07", "VOC2007")
    os.makedirs(base07)
    os.rename(_voc(root, 2007, {"trainval": ["a1", "a2", "a3"], "test": ["b1"]}, objects), base07)
    data07 = M.voc(os.path.join(root, "v07"), year=2007, val_fraction=0.3)
    assert (len(data07.splits["train"]), len(data07.splits["val"]), len(data07.splits["test"])) == (2, 1, 1)


def test_voc_reader_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="VOC2012.*VOCdevkit/VOC<year>"):
        M.voc(root)
    with pytest.raises(ValueError, match="year"):
        M.voc(root, year=2010)
    base = _voc(root, 2012, {"train": ["a1", "a2"], "val": ["b1"]},
                {"a1": [("dog", 0)], "a2": [("doggo", 0)], "b1": [("cat", 0)]})
    with pytest.raises(ValueError, match=r"a2.xml: <object> 1 is a 'doggo', not one of the 20 VOC classes"):
        M.voc(root)
    _write(os.path.join(base, "Annotations", "a2.xml"), "<annotation>\n<object><name>dog</name>\n</annotation>")
    with pytest.raises(ValueError, match=r"a2.xml:3: not valid XML"):
        M.voc(root)
    _write(os.path.join(base, "Annotations", "a2.xml"), "<annotation><object><pose>Left</pose></object></annotation>")
    with pytest.raises(ValueError, match=r"a2.xml: <object> 1 has no <name>"):
        M.voc(root)
    os.remove(os.path.join(base, "Annotations", "a2.xml"))
    with pytest.raises(FileNotFoundError, match=r"Annotations/a2.xml does not exist"):
        M.voc(root)
    _write(os.path.join(base, "ImageSets", "Main", "train.txt"), "a1\na2 1\n")
    with pytest.raises(ValueError, match=r"train.txt:2: expected one image id"):
        M.voc(root)


NUS_CONCEPTS = ["animal", "beach", "sky"]


def _nus(root, train_labels, test_labels):
    _write(os.path.join(root, "Concepts81.txt"), "".join(f"{c}\n" for c in NUS_CONCEPTS))
    for part, labels in (("Train", train_labels), ("Test", test_labels)):
        rels = [f"{NUS_CONCEPTS[i % 3]}\\{part}_{i:04d}.jpg" for i in range(len(labels))]
        _write(os.path.join(root, "ImageList", f"{part}Imagelist.txt"), "\r\n".join(rels) + "\r\n")
        for c, concept in enumerate(NUS_CONCEPTS):
            _write(os.path.join(root, "TrainTestLabels", f"Labels_{concept}_{part}.txt"),
                   "".join(f"{row[c]}\n" for row in labels))
        for rel in rels:
            _jpeg(os.path.join(root, "Flickr", *rel.split("\\")))


def test_nuswide_reader(tmp_path):
    root = str(tmp_path)
    train = [[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1]]
    _nus(root, train, [[0, 0, 1], [1, 0, 0]])
    data = M.nuswide(root, val_fraction=0.25)
    assert data.class_names == tuple(NUS_CONCEPTS)
    assert (len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"])) == (3, 1, 2)
    rows = {p: y.tolist() for s in data.splits.values() for p, y in zip(s.images, s.labels)}
    assert rows[os.path.join(root, "Flickr", "beach", "Train_0001.jpg")] == [0, 1, 1]
    assert os.path.join(root, "Flickr", "sky", "Train_0002.jpg") not in rows  # no positive: dropped
    assert rows[os.path.join(root, "Flickr", "animal", "Test_0000.jpg")] == [0, 0, 1]
    assert M.multilabel_sources(data, 8)["val"].get_batch(np.array([0]))["image"].shape == (1, 8, 8, 3)


def test_nuswide_reader_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Concepts81.txt does not exist.*TrainTestLabels"):
        M.nuswide(root)
    _nus(root, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0]])
    _write(os.path.join(root, "TrainTestLabels", "Labels_beach_Train.txt"), "0\n1\nyes\n")
    with pytest.raises(ValueError, match=r"Labels_beach_Train.txt:3: expected 0 or 1, got 'yes'"):
        M.nuswide(root)
    _write(os.path.join(root, "TrainTestLabels", "Labels_beach_Train.txt"), "0\n1\n")
    with pytest.raises(ValueError, match=r"Labels_beach_Train.txt has 2 lines but .*TrainImagelist.txt lists 3"):
        M.nuswide(root)
    os.remove(os.path.join(root, "TrainTestLabels", "Labels_beach_Train.txt"))
    with pytest.raises(FileNotFoundError, match="Labels_beach_Train.txt does not exist"):
        M.nuswide(root)


CUB_ATTRIBUTES = ["has_bill_shape::curved_(up_or_down)", "has_wing_color::blue", "has_size::large_(16_-_32_in)",
                  "has_shape::duck-like"]


def _cub(parent, label_lines=None):
    root = os.path.join(parent, "CUB_200_2011")
    rels = [f"00{1 + i % 2}.Bird/Bird_{i}.jpg" for i in range(5)]
    _write(os.path.join(root, "images.txt"), "".join(f"{i + 1} {r}\n" for i, r in enumerate(rels)))
    _write(os.path.join(root, "train_test_split.txt"), "1 1\n2 1\n3 0\n4 1\n5 1\n")
    _write(os.path.join(parent, "attributes.txt"), "".join(f"{i + 1} {a}\n" for i, a in enumerate(CUB_ATTRIBUTES)))
    present = {(1, 1), (1, 4), (2, 2), (3, 3), (4, 2), (4, 3), (5, 1)}
    lines = label_lines or [f"{i} {a} {int((i, a) in present)} 3 {2.5 * a:.3f}" + (" 0" if i == 2 else "")
                            for i in range(1, 6) for a in range(1, 5)]
    _write(os.path.join(root, "attributes", "image_attribute_labels.txt"), "\n".join(lines) + "\n")
    for r in rels:
        _jpeg(os.path.join(root, "images", *r.split("/")), size=(12, 9))
    return root


def test_cub_reader(tmp_path):
    root = _cub(str(tmp_path))
    data = M.cub(root, val_fraction=0.25)
    assert data.class_names == ("curved bill shape", "blue wing color", "large size", "duck-like shape")
    assert M.cub_class_name("has_upper_tail_color::iridescent") == "iridescent upper tail color"
    assert (len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"])) == (3, 1, 1)
    rows = {os.path.basename(p): y.tolist() for s in data.splits.values() for p, y in zip(s.images, s.labels)}
    assert rows["Bird_0.jpg"] == [1, 0, 0, 1] and rows["Bird_1.jpg"] == [0, 1, 0, 0]  # 6-field lines read alike
    assert data.splits["test"].labels.tolist() == [[0, 0, 1, 0]]
    assert data.splits["test"].images == (os.path.join(root, "images", "001.Bird", "Bird_2.jpg"),)


@pytest.mark.parametrize(
    "line, match",
    [("2 1 2 3 1.0", r"image_attribute_labels.txt:2: is_present must be 0 or 1, got '2'"),
     ("2 9 1 3 1.0", r"image_attribute_labels.txt:2: attribute id '9' is not in .*attributes.txt"),
     ("7 1 1 3 1.0", r"image_attribute_labels.txt:2: image id 7 is not in .*images.txt"),
     ("2 1 1 3", r"image_attribute_labels.txt:2: expected 5 or 6 whitespace-separated fields")],
)
def test_cub_reader_errors(tmp_path, line, match):
    root = _cub(str(tmp_path), label_lines=["1 1 1 3 1.0", line])
    with pytest.raises(ValueError, match=match):
        M.cub(root)


def test_cub_reader_missing_files(tmp_path):
    root = _cub(str(tmp_path))
    os.remove(os.path.join(str(tmp_path), "attributes.txt"))
    with pytest.raises(FileNotFoundError, match=r"attributes.txt is in none of"):
        M.cub(root)
    listing = "".join(f"{i + 1} {a}\n" for i, a in enumerate(CUB_ATTRIBUTES))
    _write(os.path.join(root, "attributes", "attributes.txt"), listing)
    assert len(M.cub(root, val_fraction=0.25).class_names) == 4
    _write(os.path.join(root, "train_test_split.txt"), "1 1\n2 1\n3 0\n4 1\n")
    with pytest.raises(ValueError, match=r"train_test_split.txt has no line for image id 5"):
        M.cub(root)
    os.remove(os.path.join(root, "images.txt"))
    with pytest.raises(FileNotFoundError, match=r"images.txt does not exist; the CUB reader expects"):
        M.cub(root)


def test_unknown_reader_and_unreadable_image(tmp_path):
    with pytest.raises(ValueError, match="coco2014"):
        M.load_multilabel("openimages", str(tmp_path))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    src = M.MultiLabelSource([str(bad)], np.ones((1, 2)), np.ones((1, 2)), 8)
    with pytest.raises(ValueError, match="bad.jpg is not a readable image"):
        src.get_batch(np.array([0]))
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="bad.jpg does not exist"):
        src.get_batch(np.array([0]))

"""Video-text data (jdjax/data/video.py): the generated time-reversed captioned videos, frame
sampling and CLIP preprocessing, PyAV / JPEG-directory decoding, the MSR-VTT, DiDeMo,
ActivityNet Captions and LSMDC annotation readers, and the lazy batch source."""

import json
import os
import re
import shutil

import av
import numpy as np
import pytest
from PIL import Image

from jdjax.data import video as V
from jdjax.data.clip_tokenizer import CLIPTokenizer

# ----------------------------------------------------------------------------- generated videos


@pytest.fixture(scope="module")
def shapes():
    return V.moving_shapes_videos("train", 200, num_frames=8, image_size=32, seed=0)


CAPTION = re.compile(r"^a (small|large) (\w+) (circle|square|triangle) (.+), then (.+)$")
FRAME_CAPTION = re.compile(
    r"^a (small|large) (\w+) (circle|square|triangle) at the (top|middle|bottom) (left|centre|right)$"
)
INVERSE = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
           "moves down": "moves up", "grows": "shrinks", "shrinks": "grows"}


def _kind(event: str) -> str:
    return {"moves left": "x", "moves right": "x", "moves up": "y", "moves down": "y", "grows": "size",
            "shrinks": "size"}.get(event, "colour" if event.startswith("turns ") else "?")


def test_shapes_and_dtypes(shapes):
    assert shapes.video.shape == (200, 8, 32, 32, 3) and shapes.video.dtype == np.uint8
    assert shapes.frame_label.shape == (200, 8) and shapes.frame_label.dtype == np.int32
    assert shapes.pair.dtype == np.int32
    np.testing.assert_array_equal(shapes.pair, np.arange(200) ^ 1)
    assert len(shapes.caption) == 200 and all(len(fc) == 8 for fc in shapes.frame_caption)
    assert 0 <= shapes.frame_label.min() and shapes.frame_label.max() < V.NUM_FRAME_CLASSES
    images, captions, labels = shapes.frames()
    assert images.shape == (1600, 32, 32, 3) and len(captions) == 1600 and labels.shape == (1600,)
    assert captions[9] == shapes.frame_caption[1][1] and labels[9] == shapes.frame_label[1, 1]


def test_twins_are_exact_time_reversals(shapes):
    p = shapes.pair
    np.testing.assert_array_equal(shapes.video[p], shapes.video[:, ::-1])
    np.testing.assert_array_equal(shapes.frame_label[p], shapes.frame_label[:, ::-1])
    assert all(shapes.frame_caption[p[i]] == shapes.frame_caption[i][::-1] for i in range(200))
    # Same multiset of frames, different captions: only the order tells the twins apart.
    assert all(shapes.caption[i] != shapes.caption[p[i]] for i in range(200))


def test_twin_caption_tells_the_reversed_story(shapes):
    for i in range(200):
        size, colour, shape, first, second = CAPTION.match(shapes.caption[i]).groups()
        assert _kind(first) != _kind(second) and "?" not in (_kind(first), _kind(second))
        # the caption starts from the first frame's size and colour
        f0 = FRAME_CAPTION.match(shapes.frame_caption[i][0]).groups()
        f_end = FRAME_CAPTION.match(shapes.frame_caption[i][-1]).groups()
        assert (size, colour, shape) == f0[:3]
        inverse = {e: INVERSE.get(e, f"turns {colour}") for e in (first, second)}
        expected = f"a {f_end[0]} {f_end[1]} {shape} {inverse[second]}, then {inverse[first]}"
        assert shapes.caption[shapes.pair[i]] == expected
        # the events happen: a colour change ends in the named colour, a move crosses thirds
        for event in (first, second):
            if event.startswith("turns "):
                assert f_end[1] == event.split()[1] != colour
            if event in ("grows", "shrinks"):
                assert (f0[0], f_end[0]) == (("small", "large") if event == "grows" else ("large", "small"))
            if event in ("moves left", "moves right"):
                order = ("left", "centre", "right")
                step = order.index(f_end[4]) - order.index(f0[4])
                assert step >= 1 if event == "moves right" else step <= -1
            if event in ("moves up", "moves down"):
                order = ("top", "middle", "bottom")
                step = order.index(f_end[3]) - order.index(f0[3])
                assert step >= 1 if event == "moves down" else step <= -1


def test_deterministic_prefix_stable_and_split_dependent(shapes):
    again = V.moving_shapes_videos("train", 200)
    np.testing.assert_array_equal(again.video, shapes.video)
    assert again.caption == shapes.caption
    small = V.moving_shapes_videos("train", 10)
    np.testing.assert_array_equal(small.video, shapes.video[:10])
    assert small.caption == shapes.caption[:10]
    val, other_seed = V.moving_shapes_videos("val", 10), V.moving_shapes_videos("train", 10, seed=1)
    for other in (val, other_seed):
        assert not np.array_equal(other.video, small.video) and other.caption != small.caption


def test_frame_captions_describe_the_drawn_object(shapes):
    """Object pixels (bright on the dark background): colour channel dominance, the thirds of the
    centroid, the area per size and the fill of the bounding box per shape."""
    areas = {}
    for i in range(0, 200, 2):
        for t in range(8):
            size, colour, shape, vert, horiz = FRAME_CAPTION.match(shapes.frame_caption[i][t]).groups()
            assert shapes.frame_label[i, t] == V.COLOURS.index(colour) * len(V.SHAPES) + V.SHAPES.index(shape)
            frame = shapes.video[i, t].astype(np.float32) / 255
            mask = frame.max(-1) > 0.45
            ys, xs = np.nonzero(mask)
            mean = frame[mask].mean(0)
            r, g, b = mean
            dominant = {"red": r > 2 * max(g, b), "green": g > 2 * max(r, b), "blue": b > 2 * max(r, g),
                        "yellow": min(r, g) > 2 * b}
            assert dominant[colour], (i, t, colour, mean)
            for centre, word, words in ((xs.mean() + 0.5, horiz, V.HORIZONTAL), (ys.mean() + 0.5, vert, V.VERTICAL)):
                third = centre / 32 * 3
                if abs(third - round(third)) * 32 / 3 > 0.7:  # not within 0.7 px of a border
                    assert words[min(int(third), 2)] == word, (i, t, centre)
            fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            assert {"square": fill > 0.97, "circle": 0.69 < fill < 0.95, "triangle": fill < 0.685}[shape], (shape, fill)
            areas.setdefault((shape, size), []).append(mask.sum())
    for shape in V.SHAPES:
        assert max(areas[shape, "small"]) * 1.8 < min(areas[shape, "large"])


def test_vocabulary_covers_every_caption(shapes):
    vocab = set(V.caption_vocabulary())
    words = {w for c in shapes.caption for w in V.caption_words(c)}
    words |= {w for fc in shapes.frame_caption for c in fc for w in V.caption_words(c)}
    assert words <= vocab
    assert V.caption_words("a red circle grows, then shrinks")[4] == ","


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_videos": 7}, "even"), ({"num_videos": 0}, "even"), ({"split": "dev"}, "split"),
     ({"num_frames": 5}, "num_frames"), ({"image_size": 8}, "image_size")],
)
def test_generator_rejects_bad_arguments(kwargs, match):
    args = {"split": "train", "num_videos": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        V.moving_shapes_videos(**args)


def test_moving_shapes_source(shapes):
    src = V.MovingShapesSource(shapes, CLIPTokenizer([]), 16)
    assert len(src) == 200
    batch = src.get_batch(np.array([3, 0, 3]))
    assert batch["video"].shape == (3, 8, 32, 32, 3) and batch["video"].dtype == np.float32
    np.testing.assert_allclose(batch["video"][1], V.clip_normalize(shapes.video[0]), rtol=1e-6)
    assert batch["video_mask"].shape == (3, 8) and batch["video_mask"].all()
    assert batch["text"].shape == (3, 16) and batch["text"].dtype == np.int32
    np.testing.assert_array_equal(batch["video_index"], [3, 0, 3])


# ----------------------------------------------------------------------------- sampling and preprocessing


@pytest.mark.parametrize(
    "args, expected",
    [
        ((30, 12), [0, 2, 5, 7, 10, 13, 15, 18, 21, 23, 26, 29]),  # every frame a position
        ((95, 4, 10.0), [0, 30, 60, 90]),  # positions 0, 10, ..., 90 -> linspace(0, 9, 4)
        ((300, 3, 29.97), [0, 120, 270]),  # every 30th frame: 10 positions -> 0, 4, 9
        ((100, 4, 10.0, 2.0), [0, 30, 60, 95]),  # 2 fps: every 5th frame, 20 positions -> 0, 6, 12, 19
        ((25, 4, 10.0), [0, 8, 16, 24]),  # 3 positions < 4: linspace over the frames
        ((3, 8), [0, 0, 0, 0, 1, 1, 1, 2]),  # short video: duplicates
        ((1, 3), [0, 0, 0]),
    ],
)
def test_sample_frame_indices(args, expected):
    got = V.sample_frame_indices(*args)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_sample_frame_indices_rejects_empty_videos():
    with pytest.raises(ValueError, match="0 frames"):
        V.sample_frame_indices(0, 12)
    with pytest.raises(ValueError, match="positive"):
        V.sample_frame_indices(10, 0)


def test_clip_preprocess_normalises_and_centre_crops():
    frames = np.zeros((2, 20, 40, 3), np.uint8)
    frames[0] = 200
    frames[1, :, 20:] = 255  # right half white
    out = V.clip_preprocess(frames, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.broadcast_to((200 / 255 - V.CLIP_MEAN) / V.CLIP_STD, (16, 16, 3)), atol=1e-5)
    # 20x40 -> 16x32, crop columns 8..23: the left 8 columns dark, the right 8 bright (edge ringing aside)
    pixels = out[1] * V.CLIP_STD + V.CLIP_MEAN
    assert pixels[:, :6].max() < 0.05 and pixels[:, 10:].min() > 0.95
    with pytest.raises(ValueError, match="uint8"):
        V.clip_preprocess(frames.astype(np.float32), 16)


def _brightness(frames: np.ndarray) -> np.ndarray:
    """Mean 0-255 brightness of each preprocessed frame."""
    return ((frames * V.CLIP_STD + V.CLIP_MEAN) * 255).mean((1, 2, 3))


def write_video(path, num_frames: int, fps: int = 10, size: int = 32, codec: str = "libx264", options=None,
                step: int = 8) -> None:
    """A grey video whose frame i has brightness 10 + step * i."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 10 + step * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_frame_dir(path, num_frames: int, size: int = 24) -> None:
    os.makedirs(path)
    for i in range(num_frames):  # names 1.jpg ... not zero-padded: sorted as numbers
        image = Image.fromarray(np.full((size, size + 8, 3), 10 + 8 * i, np.uint8))
        image.save(os.path.join(path, f"{i + 1}.jpg"), quality=95)


@pytest.mark.parametrize("name, codec", [("a.mp4", "libx264"), ("a.mkv", "libx264"), ("a.avi", "mpeg4")])
def test_read_video_returns_sampled_frames_in_order(tmp_path, name, codec):
    path = tmp_path / name
    write_video(path, 30, fps=10, codec=codec)
    # 10 fps: positions 0, 10, 20 -> T=3 takes them; T=8 > 3 positions -> linspace(0, 29, 8)
    for t, expected in ((3, [0, 10, 20]), (8, [0, 4, 8, 12, 16, 20, 24, 29])):
        frames = V.read_video(str(path), t, 16)
        assert frames.shape == (t, 16, 16, 3) and frames.dtype == np.float32
        np.testing.assert_allclose(_brightness(frames), 10 + 8 * np.array(expected), atol=4)


def test_read_video_container_over_counting_its_frames(tmp_path):
    """A truncated fast-start mp4 still announces its 40 frames; sampling falls back to the frames
    that decode."""
    path = tmp_path / "full.mp4"
    write_video(path, 40, fps=1, options={"movflags": "faststart"}, step=6)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with av.open(str(cut)) as c:
        announced = c.streams.video[0].frames
    frames = V.read_video(str(cut), 4, 16)
    b = _brightness(frames)
    assert announced == 40 and np.all(np.diff(b) > 0) and b[-1] < 10 + 6 * 39 - 20


def test_read_frame_dir(tmp_path):
    write_frame_dir(tmp_path / "v", 12)
    frames = V.read_frame_dir(str(tmp_path / "v"), 4, 16)  # linspace(0, 11, 4) -> 0, 3, 7, 11
    assert frames.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(_brightness(frames), 10 + 8 * np.array([0, 3, 7, 11]), atol=3)
    frames = V.read_frame_dir(str(tmp_path / "v"), 4, 16, fps=4.0)  # positions 0, 4, 8 -> linspace(0, 11, 4)
    np.testing.assert_allclose(_brightness(frames), 10 + 8 * np.array([0, 3, 7, 11]), atol=3)
    frames = V.read_frame_dir(str(tmp_path / "v"), 2, 16, fps=4.0)  # positions 0, 4, 8 -> 0, 8
    np.testing.assert_allclose(_brightness(frames), 10 + 8 * np.array([0, 8]), atol=3)


def test_unreadable_videos_raise_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    write_video(tmp_path / "ok.mp4", 10)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((tmp_path / "ok.mp4").read_bytes()[:200])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*corrupt"):
            V.read_video(str(path), 4, 16)
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        V.read_video(str(tmp_path / "nothere.mp4"), 4, 16)
    write_frame_dir(tmp_path / "frames", 3)
    (tmp_path / "frames" / "2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "frames" / "2.jpg"))):
        V.read_frame_dir(str(tmp_path / "frames"), 3, 16)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no .jpg frames"):
        V.read_frame_dir(str(tmp_path / "empty"), 3, 16)


# ----------------------------------------------------------------------------- annotation readers


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """One small mp4 (20 frames at 10 fps), copied under every name the readers need."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, 20, fps=10)
    return path


def _place(video_dir, names, clip_file):
    for name in names:
        target = os.path.join(video_dir, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(clip_file, target)


MSRVTT_SENTENCES = {f"video{i}": [f"caption {j} of video {i}" for j in range(i % 3 + 1)] for i in range(8)}


@pytest.fixture
def msrvtt_dir(tmp_path, clip_file):
    sentences = [{"video_id": v, "caption": c, "sen_id": k} for k, (v, c) in enumerate(
        (v, c) for v, cs in MSRVTT_SENTENCES.items() for c in cs)]
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}, indent=1))
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"video{i}\n" for i in range(6)))
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr7,video7,\"a man, talking\"\nret1,msr6,video6,a dog runs\n"
    )
    _place(tmp_path / "videos", ["video0.mp4", "video1.mp4", "video2.avi", "video4.webm", "video5.mkv",
                                 "video6.mp4", "video7.mp4"], clip_file)
    write_frame_dir(tmp_path / "videos" / "video3", 5)
    return tmp_path


def test_msrvtt_splits(msrvtt_dir):
    d = str(msrvtt_dir)
    train, val, test = (V.msrvtt(d, s, val_fraction=0.34) for s in ("train", "val", "test"))
    train_ids, val_ids = set(train.video_ids), set(val.video_ids)
    assert len(val_ids) == 2 and not train_ids & val_ids and train_ids | val_ids == {f"video{i}" for i in range(6)}
    # train: every sentence of each train video; val: the first sentence of each carved video
    assert [(it.video_id, it.text) for it in train.items] == [
        (v, c) for v in sorted(train_ids, key=lambda v: int(v[5:])) for c in MSRVTT_SENTENCES[v]]
    assert all(it.text == MSRVTT_SENTENCES[it.video_id][0] for it in val.items) and len(val.items) == 2
    assert [(it.video_id, it.text) for it in test.items] == [("video7", "a man, talking"), ("video6", "a dog runs")]
    # carving is deterministic, depends on the seed, and test is never carved
    assert V.msrvtt(d, "val", val_fraction=0.34).video_ids == val.video_ids
    assert {tuple(V.msrvtt(d, "val", val_fraction=0.34, seed=s).video_ids) for s in range(6)} != {tuple(val.video_ids)}
    # located files and frame directories
    paths = {**train.paths, **val.paths}
    assert paths["video2"].endswith("video2.avi") and paths["video4"].endswith("video4.webm")
    assert os.path.isdir(paths["video3"])
    assert V.load_video_text("msrvtt", d, "test").video_ids == ["video7", "video6"]


def test_missing_video_is_an_error_or_a_counted_skip(msrvtt_dir):
    os.remove(msrvtt_dir / "videos" / "video6.mp4")
    with pytest.raises(FileNotFoundError, match=r"1 video\(s\).*'video6'.*video6\.mp4.*skip_missing"):
        V.msrvtt(str(msrvtt_dir), "test")
    split = V.msrvtt(str(msrvtt_dir), "test", skip_missing=True)
    assert split.skipped == ("video6",) and split.video_ids == ["video7"]
    with pytest.raises(FileNotFoundError, match="video directory"):
        V.msrvtt(str(msrvtt_dir), "test", video_dir=str(msrvtt_dir / "nope"))


def test_msrvtt_malformed_annotations(msrvtt_dir):
    d = str(msrvtt_dir)
    data = msrvtt_dir / "MSRVTT_data.json"
    good = data.read_text()
    data.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"MSRVTT_data\.json:\d+: not valid JSON"):
        V.msrvtt(d, "train")
    broken = json.loads(good)
    del broken["sentences"][3]["caption"]
    data.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=re.escape("MSRVTT_data.json: sentences[3]['caption']")):
        V.msrvtt(d, "train")
    test_csv = msrvtt_dir / "MSRVTT_JSFUSION_test.csv"
    test_csv.write_text("key,vid_key,video_id,sentence\nret0,msr7,video7,fine\nret1,msr6,video6\n")
    with pytest.raises(ValueError, match=r"MSRVTT_JSFUSION_test\.csv:3: the row has 3 field"):
        V.msrvtt(d, "test")
    test_csv.write_text("key,vid_key,sentence\nret0,msr7,fine\n")
    with pytest.raises(ValueError, match=r"MSRVTT_JSFUSION_test\.csv:1: .*video_id"):
        V.msrvtt(d, "test")
    (msrvtt_dir / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo99\n")
    data.write_text(good)
    with pytest.raises(ValueError, match="video99"):
        V.msrvtt(d, "train")
    os.remove(test_csv)
    with pytest.raises(FileNotFoundError, match="MSRVTT_JSFUSION_test.csv"):
        V.msrvtt(d, "test")


def test_didemo_paragraphs(tmp_path, clip_file):
    def entries(videos):
        return [{"video": name, "description": desc, "times": [[0, 0]]} for name, desc in videos]

    train = entries([("a.mp4", "the man walks."), ("b.mov", "a dog barks"), ("a.mp4", " then he sits "),
                     ("c.m4v", "x")] + [(f"t{i}.mp4", f"d{i}") for i in range(6)])
    (tmp_path / "train_data.json").write_text(json.dumps(train))
    (tmp_path / "val_data.json").write_text(json.dumps(entries([("v.mp4", "official val")])))
    (tmp_path / "test_data.json").write_text(json.dumps(entries([("z.mp4", "first."), ("z.mp4", "second.")])))
    _place(tmp_path / "videos", ["a.mp4", "b.mp4", "c.m4v", "v.mp4", "z.mp4"] + [f"t{i}.mp4" for i in range(6)], clip_file)
    d = str(tmp_path)
    tr, va = V.didemo(d, "train", val_fraction=0.2), V.didemo(d, "val", val_fraction=0.2)
    texts = {it.video_id: it.text for it in tr.items + va.items}
    assert texts["a"] == "the man walks. then he sits" and texts["b"] == "a dog barks"
    assert len(va.items) == 2 and not set(tr.video_ids) & set(va.video_ids) and len(texts) == 9
    assert tr.paths.get("b", va.paths.get("b", "")).endswith("b.mp4")  # "b.mov" in the annotations
    assert [(it.video_id, it.text) for it in V.didemo(d, "test").items] == [("z", "first. second.")]
    assert V.didemo(d, "val", official_val=True).video_ids == ["v"]
    train[2] = {"video": "a.mp4", "times": []}
    (tmp_path / "train_data.json").write_text(json.dumps(train))
    with pytest.raises(ValueError, match=re.escape("train_data.json: [2]['description']")):
        V.didemo(d, "train")


def test_activitynet_paragraphs(tmp_path, clip_file):
    def ann(ids):
        return {v: {"duration": 10.0, "timestamps": [[0, 5], [5, 10]], "sentences": [f" {v} one.", f"{v} two. "]}
                for v in ids}

    (tmp_path / "train.json").write_text(json.dumps(ann([f"v_tr{i}" for i in range(10)])))
    (tmp_path / "val_1.json").write_text(json.dumps(ann(["v_te0", "v_te1"])))
    _place(tmp_path / "videos", [f"v_tr{i}.mp4" for i in range(9)] + ["tr9.mkv", "v_te0.mp4", "te1.mp4"], clip_file)
    d = str(tmp_path)
    tr, va, te = (V.activitynet(d, s, val_fraction=0.1) for s in ("train", "val", "test"))
    assert len(tr.items) == 9 and len(va.items) == 1 and not set(tr.video_ids) & set(va.video_ids)
    assert te.video_ids == ["v_te0", "v_te1"] and te.items[0].text == "v_te0 one. v_te0 two."
    assert te.paths["v_te1"].endswith("te1.mp4")  # found without the v_ prefix
    bad = ann(["v_tr0"])
    bad["v_tr0"]["sentences"] = "not a list"
    (tmp_path / "val_1.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=re.escape("val_1.json: ['v_tr0']['sentences']")):
        V.activitynet(d, "test")


def test_lsmdc(tmp_path, clip_file):
    clips = [f"0001_American_Beauty_00.00.{s:02d}.926-00.00.{s + 2:02d}.129" for s in range(10, 20)]
    lines = "".join(f"{c}\t00.00.10.926\t00.00.12.129\t00.00.10.926\t00.00.12.129\tSOMEONE does thing {i}.\n"
                    for i, c in enumerate(clips[:8]))
    (tmp_path / "LSMDC16_annos_training.csv").write_text(lines)
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text(
        "".join(f"{c}\ta\tb\tc\td\ttest sentence {i}\n" for i, c in enumerate(clips[8:])))
    _place(tmp_path / "videos", [f"0001_American_Beauty/{c}.avi" for c in clips[:9]] + [f"{clips[9]}.avi"], clip_file)
    assert V.lsmdc_movie(clips[0]) == "0001_American_Beauty" and V.lsmdc_movie("no_time") is None
    d = str(tmp_path)
    tr, va, te = (V.lsmdc(d, s, val_fraction=0.25) for s in ("train", "val", "test"))
    assert len(tr.items) == 6 and len(va.items) == 2 and not set(tr.video_ids) & set(va.video_ids)
    assert tr.items[0].text.startswith("SOMEONE does thing")
    assert te.paths[clips[8]] == os.path.join(d, "videos", "0001_American_Beauty", clips[8] + ".avi")
    assert te.paths[clips[9]] == os.path.join(d, "videos", clips[9] + ".avi")  # flat layout also found
    (tmp_path / "LSMDC16_annos_training.csv").write_text(lines + f"{clips[0]}\t1\t2\t3\tsentence without a field\n")
    with pytest.raises(ValueError, match=r"LSMDC16_annos_training\.csv:9: expected 6 tab-separated fields"):
        V.lsmdc(d, "train")
    with pytest.raises(ValueError, match="unknown video-text data set"):
        V.load_video_text("webvid", d, "train")
    with pytest.raises(ValueError, match="split must be"):
        V.lsmdc(d, "dev")


# ----------------------------------------------------------------------------- lazy source


def test_video_text_source_batches(msrvtt_dir, monkeypatch):
    split = V.msrvtt(str(msrvtt_dir), "train", val_fraction=0.0)
    tok = CLIPTokenizer([])
    src = V.VideoTextSource(split.items, split.locate, tok, 12, num_frames=4, image_size=16)
    assert len(src) == len(split.items) == sum(len(MSRVTT_SENTENCES[f"video{i}"]) for i in range(6))
    calls = []
    real_read_video = V.read_video
    monkeypatch.setattr(V, "read_video", lambda *a, **k: calls.append(a[0]) or real_read_video(*a, **k))
    two_of_video2 = [i for i, it in enumerate(split.items) if it.video_id == "video2"]
    frames_item = next(i for i, it in enumerate(split.items) if it.video_id == "video3")
    idx = np.array([two_of_video2[0], frames_item, two_of_video2[1], 0])
    batch = src.get_batch(idx)
    assert batch["video"].shape == (4, 4, 16, 16, 3) and batch["video"].dtype == np.float32
    assert batch["video_mask"].shape == (4, 4) and batch["video_mask"].dtype == np.int32 and batch["video_mask"].all()
    np.testing.assert_array_equal(batch["text"], tok([split.items[i].text for i in idx], 12))
    vi = batch["video_index"]
    assert vi.dtype == np.int32 and [src.video_ids[v] for v in vi] == ["video2", "video3", "video2", "video0"]
    np.testing.assert_array_equal(batch["video"][0], batch["video"][2])
    assert len(calls) == 2  # video2 decoded once; video3 is a frame directory
    # the clip is 20 frames at 10 fps: positions 0, 10 < 4 -> linspace(0, 19, 4) = 0, 6, 12, 19
    np.testing.assert_allclose(_brightness(batch["video"][0]), 10 + 8 * np.array([0, 6, 12, 19]), atol=4)
    # the frame directory holds 5 frames at 1 fps -> linspace(0, 4, 4) = 0, 1, 2, 4
    np.testing.assert_allclose(_brightness(batch["video"][1]), 10 + 8 * np.array([0, 1, 2, 4]), atol=3)
    threaded = V.VideoTextSource(split.items, split.paths, tok, 12, 4, 16, num_threads=2).get_batch(idx)
    np.testing.assert_array_equal(threaded["video"], batch["video"])


def test_video_text_source_reports_corrupt_videos(msrvtt_dir):
    split = V.msrvtt(str(msrvtt_dir), "test")
    (msrvtt_dir / "videos" / "video7.mp4").write_bytes(b"\x00" * 500)
    src = V.VideoTextSource(split.items, split.locate, CLIPTokenizer([]), 8, 4, 16)
    src.get_batch(np.array([1]))  # video6 is fine
    with pytest.raises(ValueError, match=r"video7\.mp4 cannot be decoded"):
        src.get_batch(np.array([0, 1]))


def test_distinct_captions_keeps_the_first_video_of_each_caption():
    split = V.moving_shapes_videos("val", 400)
    kept = split.distinct_captions()
    assert len(set(kept.caption)) == len(kept) < len(split)
    first = {}
    for i, c in enumerate(split.caption):
        first.setdefault(c, i)
    assert [split.caption.index(c) for c in kept.caption] == sorted(first.values())
    for i in range(len(kept)):  # a duplicated caption's twin repeats too, so pairs survive together
        j = kept.pair[i]
        assert j >= 0 and np.array_equal(kept.video[j], kept.video[i][::-1])


def test_twin_batches_pair_each_video_with_its_reversal():
    split = V.moving_shapes_videos("train", 20, image_size=16, num_frames=4)
    tokenize = lambda texts, n: np.zeros((len(texts), n), np.int32)  # noqa: E731
    source = V.MovingShapesSource(split, tokenize, 8, twin_batches=True)
    batch = source.get_batch(np.array([7, 2, 13, 5]))
    np.testing.assert_array_equal(batch["video_index"], [7, 6, 2, 3])
    np.testing.assert_allclose(batch["video"][1], batch["video"][0][::-1])
    with pytest.raises(ValueError, match="even"):
        source.get_batch(np.array([1, 2, 3]))

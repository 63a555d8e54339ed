"""TempMe task: the paper configs' counts, the global-batch loss on 1 vs 8 devices, metrics of a split,
validation, and the whole recipe (smoke) through the command line."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import tempme as tempme_config
from jdjax import tasks as jtasks
from jdjax import testing
from jdjax.merging import tempme
from jdjax.tasks import contrastive
from jdjax.tasks import tempme as task
from jdjax.train import optim

# Compile speed only (these programs are tiny): backend optimization level 0 (~2x faster) and XLA's
# elemental fusion emitter instead of the MLIR one (~1.5x faster again on 2 cores).
FAST = testing.FAST_COMPILE
compiled = testing.compiled


def config(arg="smoke", **overrides):
    cfg = tempme_config.get_config(arg)
    cfg.checkpoint.async_save = False
    cfg.update_from_flattened_dict(overrides)
    return cfg


def trainable_count(cfg, method) -> int:
    model = task.build_model(cfg, method, 49408)
    t, s = cfg.data.num_frames, cfg.data.image_size
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, t, s, s, 3)),
                                                             jnp.zeros((1, 32), jnp.int32))["params"]))
    pattern = task.PEFT_TRAINABLE if cfg.mode == "peft" else task.FULL_TRAINABLE
    return optim.count_params(params, optim.trainable_mask(params, pattern))


def test_b32_config_is_the_released_one(tmp_path):
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"")
    cfg = config("b32", init_from=str(weights))
    model = task.build_model(cfg, "tempme", 49408)
    assert tempme.output_shape(model.plan()) == (1, 97)
    assert round(task.video_macs(model, 224).gmacs, 2) == 34.70
    assert round(task.video_macs(task.build_model(cfg, "dense", 49408), 224).gmacs, 2) == 52.90
    assert trainable_count(cfg, "tempme") == 507_648
    assert trainable_count(cfg, "dense") == 507_648 - 16_128  # no clip position embeddings
    assert jtasks.validate(cfg.copy_and_resolve_references()) == [
        "data.name='msrvtt' reads a local copy: set --config.data.data_dir.",
        "real captions need CLIP's BPE vocabulary: set --config.data.bpe_path=bpe_simple_vocab_16e6.txt.gz.",
    ]


def test_b16_config_reconstruction():
    cfg = config("b16", init_from="ViT-B-16.pt")
    model = task.build_model(cfg, "tempme", 49408)
    assert tempme.output_shape(model.plan()) == (1, 127)
    assert round(task.video_macs(model, 224).gmacs, 1) == 121.1


def test_full_mode_trains_everything_but_the_temperature():
    cfg = config("smoke,full")
    model = task.build_model(cfg, "tempme", 100)
    t, s = cfg.data.num_frames, cfg.data.image_size
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, t, s, s, 3)),
                                                             jnp.zeros((1, 16), jnp.int32))["params"]))
    mask = optim.trainable_mask(params, task.FULL_TRAINABLE)
    assert not mask["logit_scale"]
    assert optim.count_params(params, mask) == optim.count_params(params) - 1
    assert not any("_lora" in k for k in params["visual"]["block0"]["attn"])


def _tiny_task():
    cfg = config()
    model = task.build_model(cfg, "tempme", 100)
    return cfg, model, task.retrieval_task(model, {"train": None}, cfg.data.image_size)


def test_loss_over_the_global_batch_is_the_same_on_one_and_eight_devices():
    """The [B, B] similarity covers the whole global batch: 8 data shards see the negatives of 1 device."""
    assert jax.device_count() == 8
    cfg, model, t = _tiny_task()
    # init and noise in one program (op by op, the noise compiled a sampler per parameter shape: ~25 s)
    params = compiled(lambda key: jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                                               t.init(key)), jax.random.key(0))
    rng = np.random.default_rng(0)
    b, f, s = 16, cfg.data.num_frames, cfg.data.image_size
    batch = {"video": rng.normal(size=(b, f, s, s, 3)).astype(np.float32), "video_mask": np.ones((b, f), np.int32),
             "text": rng.integers(1, 90, size=(b, 16)).astype(np.int32), "video_index": np.arange(b, dtype=np.int32)}
    batch["text"][:, -1] = 99
    jitted = jax.jit(lambda p, x: t.loss(p, x, jax.random.key(2))[0])

    def loss(p, x):  # a FAST program per input layout (1 device, 8 shards, 2 examples)
        return jitted.lower(p, x).compile(FAST)

    one_device = jax.device_put(batch, jax.devices()[0])
    one = float(loss(params, one_device)(params, one_device))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    assert len(sharded["video"].sharding.device_set) == 8
    eight = float(loss(params, sharded)(params, sharded))
    assert eight == pytest.approx(one, rel=1e-5, abs=1e-6)
    # a per-device loss (2 examples each, 2 negatives) is a different number: the test can fail
    pieces = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, b, 2)]
    two = loss(params, pieces[0])
    local = np.mean([float(two(params, x)) for x in pieces])
    assert abs(local - one) > 1e-2


def test_summarize_builds_the_text_video_matrix():
    e = np.eye(3)
    out = {"text_embeds": e[[2, 0, 1]], "video_embeds": e[[2, 0, 1]], "video_index": np.array([2, 0, 1])}
    m = task.summarize(out)
    assert m["t2v_R1"] == m["v2t_R1"] == 100.0 and m["rsum"] == 600.0 and m["count"] == 3
    swapped = {**out, "video_embeds": e[[0, 2, 1]]}  # texts of videos 2 and 0 now find each other's video
    assert task.summarize(swapped)["t2v_R1"] == pytest.approx(100 / 3)
    twins = {**out, "twin_index": np.array([1, -1, 2])}  # videos 1 and 2 are twins; video 0's was dropped
    assert task.summarize(twins)["order_accuracy"] == 100.0
    blind = {**twins, "video_embeds": e[[1, 0, 1]]}  # videos 1 and 2 look alike (order-blind)
    assert task.summarize(blind)["order_accuracy"] == 50.0
    with pytest.raises(ValueError, match="one text per video"):
        task.summarize({**out, "video_index": np.array([0, 0, 1])})


@pytest.mark.parametrize("overrides, message", [
    ({"method": "dense,clipme"}, "method="),
    ({"mode": "lora"}, "mode="),
    ({"data.name": "msrvtt"}, "data_dir"),
    ({"data.name": "msrvtt", "data.data_dir": "/x"}, "init_from"),
    ({"temporal.group_factors": (3, 2)}, "does not divide"),
    ({"temporal.clip_layers": (1, 5)}, "beyond"),
    ({"data.num_train": 63}, "even"),
    ({"data.text_length": 99}, "text_length"),
    ({"batch_size": 7, "mesh.data": 1}, "must be even"),
    ({"checkpoint.best_metric": "val/accuracy"}, "best_metric"),
])
def test_validation_names_the_problem(overrides, message):
    errors = jtasks.validate(config(**overrides))
    assert any(message in e for e in errors), errors


def test_generated_data_and_word_tokens():
    cfg = config()
    tok = task.make_tokenizer(cfg.data)
    assert isinstance(tok, contrastive.WordTokenizer)
    sources = task.video_sources(cfg.data, tok, 16)
    batch = sources["val"].get_batch(np.arange(4))
    assert batch["video"].shape == (4, cfg.data.num_frames, cfg.data.image_size, cfg.data.image_size, 3)
    assert not (batch["text"] == tok.encoder[tok.UNK]).any()  # every caption word is in the vocabulary
    assert tok.decode(batch["text"][0]) == " ".join(tok.words(sources["val"].split.caption[0]))
    frames, prompts = task.frame_splits(cfg.data, tok, 16)
    assert len(frames["train"]) == cfg.data.num_train * cfg.data.num_frames and prompts.shape == (12, 16)


@pytest.mark.slow  # about 75 s: the embedded recipe's three stages at smoke size
def test_recipe_end_to_end(tmp_path):
    """The smoke recipe through the command line: pretraining, two methods, the comparison table."""
    workdir = str(tmp_path / "run")
    proc = testing.run_main("configs/tempme.py:smoke", workdir, "--config.method=dense,tempme")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(os.path.join(workdir, "comparison.json")))
    assert [r["run"] for r in rows] == ["dense", "tempme"]
    for r in rows:
        assert 0 <= r["test/t2v_R1"] <= 100 and r["ms_per_video"] > 0
    assert rows[0]["tokens_out"] == "4x5" and rows[1]["tokens_out"] == "1x9"
    assert rows[1]["gmacs"] < rows[0]["gmacs"]
    assert rows[1]["trainable_params"] > rows[0]["trainable_params"]
    assert "| tempme |" in open(os.path.join(workdir, "comparison.md")).read()


def test_init_from_a_converted_checkpoint_gives_transformers_clip_mean_pooling(tmp_path):
    """init_from + init_format through the converters: the dense method at init equals Hugging Face's
    CLIP image features of each frame, normalised, averaged and normalised (and its text features)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jdjax.testing import randomize_torch, torch_nchw, torch_numpy

    tower = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu")
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, eos_token_id=2, bos_token_id=98, pad_token_id=0,
                         **tower),
        vision_config=dict(image_size=16, patch_size=8, **tower), projection_dim=32)
    torch.manual_seed(0)
    hf = randomize_torch(transformers.CLIPModel(hf_config))
    hf.save_pretrained(tmp_path / "hf")
    cfg = config(init_from=str(tmp_path / "hf"), init_format="hf_clip", **{
        "model.vision_layers": 2, "model.text_layers": 2, "model.text_heads": 2, "model.vision_heads": 2,
        "model.vocab_size": 100, "temporal.clip_layers": (1,), "temporal.group_factors": (2,)})
    t = task.transfer_task(cfg, "dense", cfg.init_from)
    params = t.load_pretrained({"params": jax.tree.map(np.asarray, compiled(t.init, jax.random.key(0)))})["params"]
    model = task.build_model(cfg, "dense", 100)
    videos = np.random.default_rng(0).uniform(-1, 1, (2, 4, 16, 16, 3)).astype(np.float32)
    ids = np.array([[98, 5, 7, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]] * 2, np.int32)
    ids[1, 2] = 11

    def encode(p, v, i):  # both towers in one compiled program (op by op took ~15 s under load)
        return (model.apply({"params": p}, v, method=model.encode_video),
                model.apply({"params": p}, i, task.text_mask(i), method=model.encode_text))

    video, text = compiled(encode, params, jnp.asarray(videos), jnp.asarray(ids))
    with torch.no_grad():  # image_embeds / text_embeds: the projected features, L2-normalised
        ref = hf(pixel_values=torch_nchw(videos.reshape(8, 16, 16, 3)), input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy((ids > 0).astype(np.int64)))
    norm = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    frames = torch_numpy(ref.image_embeds).reshape(2, 4, -1)
    np.testing.assert_allclose(np.asarray(video), norm(frames.mean(1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norm(np.asarray(text)), torch_numpy(ref.text_embeds), rtol=1e-4, atol=1e-4)


def test_msrvtt_layout_feeds_the_task(tmp_path):
    """The task reads MSR-VTT's public layout (frames pre-extracted as JPEG directories here)."""
    from PIL import Image

    sentences = [{"video_id": f"video{i}", "caption": f"clip number {i} caption {j}", "sen_id": 2 * i + j}
                 for i in range(6) for j in range(2)]
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"video{i}\n" for i in range(4)))
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr4,video4,a cat\nret1,msr5,video5,a dog\n")
    for i in range(6):
        frames = tmp_path / "videos" / f"video{i}"
        frames.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((20, 24, 3), 40 * k + i, np.uint8)).save(frames / f"{k}.jpg")
    cfg = config(**{"data.name": "msrvtt", "data.data_dir": str(tmp_path), "data.val_fraction": 0.25})
    tok = contrastive.WordTokenizer(["clip number caption a cat dog"] + [str(i) for i in range(6)])
    sources = task.video_sources(cfg.data, tok, 8)
    assert (len(sources["train"]), len(sources["val"]), len(sources["test"])) == (6, 1, 2)
    batch = sources["test"].get_batch(np.array([1, 0]))
    assert batch["video"].shape == (2, cfg.data.num_frames, 16, 16, 3) and batch["video_mask"].all()
    assert tok.decode(batch["text"][0]) == "a dog" and list(batch["video_index"]) == [1, 0]

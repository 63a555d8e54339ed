"""TempMe throughput: CLIP ViT-B/32 video tower (12 frames, 224 px), dense vs ImgMe vs TempMe, against
the PyTorch (Hugging Face) tower in the same run, plus the training step and its memory (spec
`vision_token_merging.md` §2).

    python -m benchmarks.tempme                         # 4 and 1 videos, training at 4 videos; records to benchmarks/RESULTS.md
    python -m benchmarks.tempme --repeats=5 --notrain   # inference only
    python -m benchmarks.tempme --notorch               # without the PyTorch reference
    python -m benchmarks.tempme --norecord --repeats=3  # print the rows, write nothing
    python -m benchmarks.tempme --smoke                 # tiny CLIP, seconds, records nothing

Models (`jdjax.models.tempme.TempMeCLIP` with `clip_config('ViT-B/32')`, float32, LoRA rank 8 on qkv in
both towers, no scaling: TempMe's PEFT mode), three `TemporalConfig`s of 12 frames:

- dense:  TemporalConfig(12), CLIP4Clip mean pooling of per-frame CLIP features;
- imgme:  TemporalConfig(12, imgme_r=2), ToMe r=2 within every frame in every layer ("ImgMe only");
- tempme: TemporalConfig(12, 2, (8, 9, 10), (2, 2, 3), 0.30, 0.10), the released B/32 setting.

Weights are random N(0, 0.02^2) (LayerNorm scales 1 + noise), a function of the parameter path only, so
every model holds the same values at the same path; nothing is zero (LoRA B and the clip position
embeddings too). Parameters are arguments of the jitted functions, never constants.

Inference (`encode_video` under jit, videos [B, 12, 224, 224, 3]) at every --videos batch; the PyTorch
reference is `transformers.CLIPVisionModel` (ViT-B/32 CLIPVisionConfig: hidden 768, 12 layers, 12 heads,
intermediate 3072, patch 32, 224 px, quick_gelu; its default attention implementation, reported in the
notes), random weights, fp32, `torch.inference_mode()`, `torch.set_num_threads(os.cpu_count())`, on the
B x 12 frames, followed by the same per-frame projection (768 -> 512, no bias), L2 normalisation, mean
over frames and normalisation as jdjax's tower (so both compute the same function). Every jdjax function
is compiled ahead of time (compile_s), every function runs once as warm-up, then all are timed in
--repeats interleaved rounds (`harness.interleaved`: one call each per round, rotated order); medians.

Training (--train): one jitted step at --train_videos videos and as many captions of 32 tokens
(random ids, EOT at a random position in the second half, padding masked): forward of the video and
text towers, symmetric InfoNCE over the B x B logits
(`tasks.contrastive.contrastive_loss`), `value_and_grad` w.r.t. the trainable parameters only (the rest
is a separate argument without gradient), `optax.adamw` (lr 1e-4, weight decay 0.2 on matrices) update,
trainable state donated and fed back into the next call. Two regimes, dense vs TempMe each:
'peft' = the LoRA models with LoRA + clip_pos_embedding trainable
(`lora_trainable_pattern(('clip_pos_embedding',))`); 'full' = the same towers without LoRA, everything
trainable. Timed in their own --train_repeats interleaved rounds. Memory from the compiled executable's
`memory_analysis()`: mem_temp_mb = temporaries (activations kept for the backward pass and workspace),
mem_peak_mb = argument + output + temp - alias bytes (parameters, optimizer state, batch, donated
buffers counted once).

Columns: ms_per_video = median / B; speedup = jdjax dense / case at the same B (same rounds);
vs_torch = PyTorch tower / case at the same B. gmacs = analytic MACs per video of the visual tower
(`jdjax.merging.flops.video_macs`: patch embedding + blocks, no projection, no matching; 52.90 dense,
34.70 TempMe, checked); xla_gflop = XLA cost_analysis FLOPs of the compiled forward per video (2 per
multiply-add plus element-wise work), xla_per_2macs = xla_gflop / (2 gmacs). warmup_s / train_warmup_s =
the first execution, not in the medians (after the compile; PyTorch's first call). tokens: per layer,
sequences per video x tokens entering attention > tokens leaving the block ([...]*n = n equal layers).
load1 = 1-minute load average when the row was written (2 shared cores).

Targets (printed, never asserted): TempMe >= 1.48x jdjax dense at 4 videos; TempMe >= 1.7x the PyTorch
dense tower (ms/video). The paper's training figures (full fine-tuning, GPU, batch 128): 1.57x faster,
75 % of the memory.
"""

from __future__ import annotations

import os
import time
import zlib

BENCHMARK = "tempme"
METHODS = ("dense", "imgme", "tempme")
TRAIN_CASES = (("peft", "dense"), ("peft", "tempme"), ("full", "dense"), ("full", "tempme"))
DENSE_TARGET = 1.48  # TempMe / jdjax dense at 4 videos
TORCH_TARGET = 1.7  # TempMe / PyTorch dense tower
PAPER_TRAIN = {"speedup": 1.57, "memory": 0.75}
EXPECTED_GMACS = {"dense": 52.90, "tempme": 34.70}  # ViT-B/32, 12 frames, 224 px (spec §2.2)
LORA_RANK = 8
# --smoke compiles ~2.5x faster with XLA's backend optimisation off; its timings mean nothing anyway.
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
NOTES = (
    "CLIP ViT-B/32 video tower, 12 frames at 224 px, float32, random shared weights (nothing zero), LoRA rank 8 "
    "on qkv: dense (CLIP4Clip mean pooling), imgme (ToMe r=2 per frame in every layer), tempme (released: "
    "ClipMe at layers 8, 9, 10 with factors 2, 2, 3, rho_c 0.30, rho_i 0.10, ImgMe r=2 before). torch-dense: "
    "transformers.CLIPVisionModel (ViT-B/32 config, quick_gelu, {attn} attention, inference_mode, "
    "{threads} threads) on B x 12 frames + the same projection and mean pooling. jdjax functions compiled "
    "ahead of time (compile_s), one warm-up call each, then interleaved rounds (every function once per round, "
    "rotated order); medians. ms_per_video = median / B; speedup = jdjax dense / case at the same B; vs_torch "
    "= PyTorch / case at the same B (targets at 4 videos: tempme >= 1.48x dense, >= 1.7x torch). gmacs = "
    "analytic MACs per video (visual tower; dense 52.90, tempme 34.70); xla_gflop = XLA cost_analysis FLOPs "
    "per video of the compiled forward (xla_per_2macs = xla_gflop / 2 gmacs). tokens: per layer, sequences x "
    "tokens entering attention > leaving ([..]*n = n equal layers). train-*: one jitted step (video + text "
    "towers, {caption_len}-token captions, symmetric InfoNCE, grads, AdamW, trainable state donated) at "
    "train_videos; peft = LoRA + clip_pos_embedding trainable, full = no LoRA, all trainable; train_speedup "
    "= dense / case; mem_temp_mb = XLA temporaries, mem_peak_mb = argument + output + temp - alias of the "
    "compiled step; mem_*_ratio = case / dense (paper, full FT on GPU at batch 128: 1.57x, 75 % memory). "
    "load1 = 1-minute load average (2 shared cores)."
)


# ----------------------------------------------------------------------------- models and parameters


def paper_dims() -> dict:
    """CLIP ViT-B/32 (jdjax.nn.clip.clip_config), 12 frames, 32-token captions."""
    from jdjax.nn.clip import clip_config

    return {"clip": clip_config("ViT-B/32"), "num_frames": 12, "caption_len": 32}


def smoke_dims() -> dict:
    """A tiny CLIP (32 px frames of 8 px patches: 17 tokens, 4 layers), 4 frames, 8-token captions."""
    clip = {"embed_dim": 24, "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 4,
            "vision_heads": 2, "context_length": 8, "vocab_size": 50, "text_width": 32, "text_layers": 2,
            "text_heads": 2}
    return {"clip": clip, "num_frames": 4, "caption_len": 8}


def temporal_configs(dims: dict) -> dict:
    """{method: TemporalConfig}: the released B/32 settings at 12 frames, a scaled-down set otherwise."""
    from jdjax.merging.tempme import TemporalConfig

    t = dims["num_frames"]
    if t == 12 and dims["clip"]["vision_layers"] == 12:
        return {"dense": TemporalConfig(12), "imgme": TemporalConfig(12, imgme_r=2),
                "tempme": TemporalConfig(12, 2, (8, 9, 10), (2, 2, 3), 0.30, 0.10)}
    depth = dims["clip"]["vision_layers"]
    return {"dense": TemporalConfig(t), "imgme": TemporalConfig(t, imgme_r=1),
            "tempme": TemporalConfig(t, 1, (depth - 2, depth - 1), (2, 2), 0.30, 0.10)}


def build_model(dims: dict, temporal, lora_rank: int = LORA_RANK):
    """TempMeCLIP of `dims` with `temporal` merging and LoRA of `lora_rank` on qkv (0 = none)."""
    from jdjax.models.tempme import TempMeCLIP
    from jdjax.nn.lora import LoRAConfig

    return TempMeCLIP(**dims["clip"], temporal=temporal, lora=LoRAConfig(rank=lora_rank))


def random_params(model, dims: dict, seed: int = 0, scale: float = 0.02, cache: dict | None = None) -> dict:
    """Unboxed parameters of `model` from NumPy noise (no `init` compile): N(0, scale^2), LayerNorm scales
    1 + noise. The noise depends only on (seed, parameter path), so models share their common weights;
    `cache` ({path: array}) makes them share the arrays too (no second copy in memory)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdjax.train.optim import path_names

    clip, t = dims["clip"], dims["num_frames"]
    s = clip["image_size"]
    videos = jax.ShapeDtypeStruct((1, t, s, s, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, dims["caption_len"]), jnp.int32)
    shapes = jax.eval_shape(lambda v, i: nn.meta.unbox(model.init(jax.random.key(0), v, i)["params"]), videos, ids)
    cache = {} if cache is None else cache

    def fill(name, sd):
        if name not in cache:
            v = scale * np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(sd.shape, np.float32)
            if name.endswith("scale") and "/ln" in "/" + name:  # LayerNorm scales (not logit_scale)
                v = 1.0 + v
            cache[name] = jnp.asarray(v, sd.dtype)
        return cache[name]

    return jax.tree.map(fill, path_names(shapes), shapes)


def static_info(model, dims: dict) -> dict:
    """Plan, analytic MACs per video and the tokens string of a model (nothing compiled)."""
    from jdjax.merging import flops

    clip = dims["clip"]
    plan = model.plan()
    macs = flops.video_macs(plan, image_size=clip["image_size"], patch_size=clip["patch_size"],
                            width=clip["vision_width"], num_heads=clip["vision_heads"],
                            mlp_dim=clip.get("vision_mlp_dim") or 4 * clip["vision_width"],
                            num_frames=dims["num_frames"])
    return {"plan": plan, "macs": macs, "gmacs": macs.gmacs, "tokens": tokens_string(plan)}


def tokens_string(plan) -> str:
    """'12x50>48 12x48>46 ... 1x107>97': per layer, sequences x tokens in attention > tokens out;
    runs of equal layers are written once as [..]*n."""
    items = [f"{p.clips}x{p.tokens_attn}>{p.tokens_out}" for p in plan]
    out, i = [], 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[i]:
            j += 1
        out.append(items[i] if j == i else f"[{items[i]}]*{j - i + 1}")
        i = j + 1
    return " ".join(out)


def check_expectations(infos: dict, dims: dict) -> None:
    """Raises if the analytic GMACs of the B/32 models differ from the spec's (§2.2)."""
    if dims["num_frames"] != 12 or dims["clip"] != paper_dims()["clip"]:
        return
    for method, want in EXPECTED_GMACS.items():
        got = infos[method]["gmacs"]
        if round(got, 2) != want:
            raise RuntimeError(f"CLIP B/32 {method}: analytic MACs {got:.4f} G per video, the spec says {want} G "
                               "(§2.2); check jdjax.merging.tempme.plan_layers and jdjax.merging.flops.video_macs.")


# ----------------------------------------------------------------------------- compiled functions


def _compile(fn, *args, donate_argnums=(), compiler_options: dict | None = None):
    """(compiled, seconds to lower + compile). compiler_options: XLA options (tests only, never for timing)."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile(compiler_options)
    return compiled, time.perf_counter() - t0


def inference_fn(model, params, videos, compiler_options: dict | None = None):
    """(fn() -> blocks on the [B, E] video features, compile seconds, XLA GFLOP per video) of
    jit(encode_video)."""
    import jax

    from benchmarks import harness
    from jdjax.models.tempme import TempMeCLIP

    def forward(p, v):
        return model.apply({"params": p}, v, method=TempMeCLIP.encode_video)

    compiled, compile_s = _compile(forward, params, videos, compiler_options=compiler_options)
    gflop = harness.xla_flops(compiled) / videos.shape[0] / 1e9
    return (lambda: jax.block_until_ready(compiled(params, videos))), compile_s, gflop


def torch_tower(dims: dict):
    """(fn(frames NCHW tensor, videos) -> [B, E] unit-norm features, attention implementation name):
    Hugging Face CLIPVisionModel of `dims` + a bias-free projection, random weights, eval mode."""
    import torch
    import transformers

    clip = dims["clip"]
    cfg = transformers.CLIPVisionConfig(
        hidden_size=clip["vision_width"], intermediate_size=clip.get("vision_mlp_dim") or 4 * clip["vision_width"],
        num_hidden_layers=clip["vision_layers"], num_attention_heads=clip["vision_heads"],
        image_size=clip["image_size"], patch_size=clip["patch_size"], hidden_act="quick_gelu",
        projection_dim=clip["embed_dim"], layer_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    vision = transformers.CLIPVisionModel(cfg).eval().float()
    proj = torch.nn.Linear(clip["vision_width"], clip["embed_dim"], bias=False).eval().float()

    def forward(frames, b):
        with torch.inference_mode():
            pooled = vision(pixel_values=frames).pooler_output  # [B T, C], post_layernorm(CLS)
            e = torch.nn.functional.normalize(proj(pooled), dim=-1)  # [B T, E]
            v = e.reshape(b, -1, e.shape[-1]).mean(dim=1)  # [B, E]
            return torch.nn.functional.normalize(v, dim=-1)

    return forward, getattr(vision.config, "_attn_implementation", "default")


def split_trainable(params, pattern: str):
    """(trainable, frozen): flat {'a/b/c': array} dicts, split by `optim.trainable_mask(params, pattern)`."""
    from flax import traverse_util

    from jdjax.train import optim

    flat = traverse_util.flatten_dict(params, sep="/")
    mask = traverse_util.flatten_dict(optim.trainable_mask(params, pattern), sep="/")
    return {k: v for k, v in flat.items() if mask[k]}, {k: v for k, v in flat.items() if not mask[k]}


def text_batch(dims: dict, batch: int, seed: int = 0):
    """(ids [B, L] int32, mask [B, L]): random tokens, the EOT (largest id) at a random position >= L/2,
    padding 0 after it (pooling by argmax(ids), OpenAI's convention)."""
    import jax.numpy as jnp
    import numpy as np

    vocab, length = dims["clip"]["vocab_size"], dims["caption_len"]
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab - 1, (batch, length))
    eot = rng.integers(length // 2, length, batch)
    pos = np.arange(length)[None]
    ids = np.where(pos < eot[:, None], ids, 0)
    ids[np.arange(batch), eot] = vocab - 1
    return jnp.asarray(ids, jnp.int32), jnp.asarray(pos <= eot[:, None], jnp.int32)


def train_step_fn(model, params, videos, ids, mask, pattern: str, compiler_options: dict | None = None):
    """(fn() -> blocks on one training step, compile seconds, XLA GFLOP per video, trainable count,
    memory {'temp', 'argument', 'output', 'alias', 'peak'} in bytes).

    loss = symmetric InfoNCE of the model's logits_per_text; value_and_grad w.r.t. the parameters matching
    `pattern` ('' = all); AdamW update of those. The trainable parameters and optimizer state are donated
    and the new ones feed the next call (a private copy, so `params` stays intact).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import traverse_util

    from benchmarks import harness
    from jdjax.tasks.contrastive import contrastive_loss
    from jdjax.train import optim

    trainable, frozen = split_trainable(params, pattern)
    trainable = jax.tree.map(jnp.copy, trainable)  # donated below
    tx = optax.adamw(1e-4, weight_decay=0.2, mask=optim.decay_mask)
    opt_state = tx.init(trainable)

    def loss_fn(trainable, frozen, videos, ids, mask):
        p = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
        out = model.apply({"params": p}, videos, ids, text_mask=mask, train=True)
        return contrastive_loss(out["logits_per_text"])

    def step(trainable, opt_state, frozen, videos, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, videos, ids, mask)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    compiled, compile_s = _compile(step, trainable, opt_state, frozen, videos, ids, mask, donate_argnums=(0, 1),
                                   compiler_options=compiler_options)
    gflop = harness.xla_flops(compiled) / videos.shape[0] / 1e9
    memory = memory_bytes(compiled)
    count = sum(int(v.size) for v in trainable.values())
    state = [trainable, opt_state]

    def run():
        new_trainable, new_opt_state, loss = compiled(state[0], state[1], frozen, videos, ids, mask)
        jax.block_until_ready((new_trainable, new_opt_state, loss))
        state[:] = [new_trainable, new_opt_state]

    return run, compile_s, gflop, count, memory


def memory_bytes(compiled) -> dict:
    """{'temp', 'argument', 'output', 'alias', 'peak'} bytes of a compiled executable (nan if unknown);
    peak = argument + output + temp - alias."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        m = None
    if m is None:
        return dict.fromkeys(("temp", "argument", "output", "alias", "peak"), float("nan"))
    out = {k: float(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


# ----------------------------------------------------------------------------- measurement


def warm_up(fns: dict) -> dict[str, float]:
    """Runs every function once (its first execution, after any compile); {name: seconds}."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t0
    return out


def measure(dims: dict, videos: tuple[int, ...] = (4, 1), train_videos: int = 4, repeats: int = 10,
            train_repeats: int = 3, train: bool = True, torch: bool = True, compiler_options: dict | None = None,
            log=print) -> tuple[dict[str, dict], dict]:
    """Builds, compiles and times every case; returns ({case: row}, run info) (no recording).

    Cases: '{method} b{B}' for every method and B in `videos`, 'torch-dense b{B}' (with torch), and
    'train-{peft|full} {dense|tempme} b{train_videos}' (with train). For the B/32 dims the analytic MACs
    are checked against the spec first.
    """
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import harness

    temporal = temporal_configs(dims)
    models = {m: build_model(dims, temporal[m]) for m in METHODS}
    infos = {m: static_info(models[m], dims) for m in METHODS}
    check_expectations(infos, dims)
    t, s = dims["num_frames"], dims["clip"]["image_size"]
    rng = np.random.default_rng(0)
    clips = {b: rng.uniform(-1, 1, (b, t, s, s, 3)).astype(np.float32) for b in sorted(set(videos) | {train_videos})}
    run = {"torch_threads": None, "torch_attn": None}

    cache: dict = {}
    params = {m: random_params(models[m], dims, cache=cache) for m in METHODS}
    fns, compiled = {}, {}
    for m in METHODS:
        for b in videos:
            case = f"{m} b{b}"
            fns[case], compile_s, xla = inference_fn(models[m], params[m], jnp.asarray(clips[b]), compiler_options)
            compiled[case] = {"compile_s": compile_s, "xla_gflop": xla}
            log(f"  {case}: compiled in {compile_s:.1f} s", flush=True)
    if torch:
        import torch as th

        th.set_num_threads(os.cpu_count() or 1)
        forward, attn = torch_tower(dims)
        run.update(torch_threads=th.get_num_threads(), torch_attn=attn)
        for b in videos:
            frames = th.from_numpy(np.ascontiguousarray(clips[b].reshape(b * t, s, s, 3).transpose(0, 3, 1, 2)))
            fns[f"torch-dense b{b}"] = lambda frames=frames, b=b: forward(frames, b)
        log(f"  torch: {run['torch_threads']} threads, {attn} attention", flush=True)
    warmup = warm_up(fns)
    log(f"  inference: {repeats} interleaved rounds of {len(fns)} functions", flush=True)
    timing = harness.interleaved(fns, repeats)

    def med(case):
        return timing[case]["median_s"]

    rows = {}
    for case, tm in timing.items():
        method, b = case.rsplit(" b", 1)
        b = int(b)
        info = infos["dense" if method == "torch-dense" else method]
        row = {
            "method": method,
            "videos": b,
            "ms_per_video": 1e3 * med(case) / b,
            "p10_p90_ms_per_video": f"{1e3 * tm['p10_s'] / b:.4g}-{1e3 * tm['p90_s'] / b:.4g}",
            "speedup": med(f"dense b{b}") / med(case),
            "vs_torch": med(f"torch-dense b{b}") / med(case) if torch else None,
            "gmacs": info["gmacs"],
            "gmacs_speedup": infos["dense"]["gmacs"] / info["gmacs"],
            "warmup_s": warmup[case],
        }
        if case in compiled:
            xla = compiled[case]["xla_gflop"]
            row.update(xla_gflop=xla, xla_per_2macs=xla / (2 * info["gmacs"]), compile_s=compiled[case]["compile_s"])
        last = info["plan"][-1]
        row.update(tokens=info["tokens"], out_tokens=f"{last.clips}x{last.tokens_out}")
        rows[case] = row
    if train:
        rows.update(measure_train(dims, temporal, clips[train_videos], train_repeats, cache, infos,
                                  compiler_options, log))
    return rows, run


def measure_train(dims, temporal, clips, repeats, cache, infos, compiler_options, log) -> dict[str, dict]:
    """The training-step rows (see the module docstring)."""
    import jax.numpy as jnp

    from benchmarks import harness
    from jdjax.nn.lora import lora_trainable_pattern

    b = clips.shape[0]
    videos = jnp.asarray(clips)
    ids, mask = text_batch(dims, b)
    fns, meta = {}, {}
    for regime, method in TRAIN_CASES:
        model = build_model(dims, temporal[method], LORA_RANK if regime == "peft" else 0)
        params = random_params(model, dims, cache=cache)
        pattern = lora_trainable_pattern(("clip_pos_embedding",)) if regime == "peft" else ""
        case = f"train-{regime} {method} b{b}"
        fns[case], compile_s, xla, count, memory = train_step_fn(model, params, videos, ids, mask, pattern,
                                                                 compiler_options)
        meta[case] = {"regime": regime, "method": method, "compile_s": compile_s, "xla": xla, "count": count,
                      "memory": memory}
        log(f"  {case}: compiled in {compile_s:.1f} s, {count} trainable, peak {memory['peak'] / 2**20:.0f} MiB",
            flush=True)
    warmup = warm_up(fns)
    log(f"  training: {repeats} interleaved rounds of {len(fns)} steps", flush=True)
    timing = harness.interleaved(fns, repeats)
    rows = {}
    for case, m in meta.items():
        dense = f"train-{m['regime']} dense b{b}"
        mem, dmem = m["memory"], meta[dense]["memory"]
        tm = timing[case]
        rows[case] = {
            "method": f"train-{m['regime']} {m['method']}",
            "videos": b,
            "train_ms": 1e3 * tm["median_s"],
            "train_p10_p90_ms": f"{1e3 * tm['p10_s']:.4g}-{1e3 * tm['p90_s']:.4g}",
            "train_ms_per_video": 1e3 * tm["median_s"] / b,
            "train_speedup": timing[dense]["median_s"] / tm["median_s"],
            "mem_temp_mb": mem["temp"] / 2**20,
            "mem_peak_mb": mem["peak"] / 2**20,
            "mem_temp_ratio": mem["temp"] / dmem["temp"],
            "mem_peak_ratio": mem["peak"] / dmem["peak"],
            "mem_argument_mb": mem["argument"] / 2**20,
            "mem_output_mb": mem["output"] / 2**20,
            "mem_alias_mb": mem["alias"] / 2**20,
            "trainable_params": m["count"],
            "caption_len": dims["caption_len"],
            "gmacs": infos[m["method"]]["gmacs"],
            "xla_train_gflop": m["xla"],
            "train_compile_s": m["compile_s"],
            "train_warmup_s": warmup[case],
        }
    return rows


def targets(rows: dict[str, dict], videos: int = 4) -> list[str]:
    """The target lines: met / not met (nothing asserted)."""
    lines = []
    case = f"tempme b{videos}"
    if case not in rows:
        return [f"targets: no {videos}-video rows (--videos must include {videos})"]
    r = rows[case]
    verdict = "met" if r["speedup"] >= DENSE_TARGET else "NOT MET"
    lines.append(f"target TempMe >= {DENSE_TARGET}x jdjax dense at {videos} videos: {r['speedup']:.2f}x {verdict}")
    if r.get("vs_torch") is not None:
        verdict = "met" if r["vs_torch"] >= TORCH_TARGET else "NOT MET"
        lines.append(f"target TempMe >= {TORCH_TARGET}x PyTorch dense tower at {videos} videos: "
                     f"{r['vs_torch']:.2f}x {verdict}")
    else:
        lines.append(f"target TempMe >= {TORCH_TARGET}x PyTorch dense tower: not measured (--notorch)")
    return lines


def summary(rows: dict[str, dict], with_targets: bool = True) -> str:
    """A short text table of the rows, the targets met or not (B/32 only), the tokens per layer."""
    lines = [f"{'case':<22} {'ms/video':>9} {'x dense':>8} {'x torch':>8} {'GMACs':>7} {'XLA GF':>8} {'compile s':>9}"]
    for case, r in rows.items():
        if "ms_per_video" not in r:
            continue
        vs_torch = f"{r['vs_torch']:>7.2f}x" if r.get("vs_torch") is not None else f"{'-':>8}"
        xla = f"{r['xla_gflop']:>8.2f}" if "xla_gflop" in r else f"{'-':>8}"
        comp = f"{r['compile_s']:>9.1f}" if "compile_s" in r else f"{'-':>9}"
        lines.append(f"{case:<22} {r['ms_per_video']:>9.1f} {r['speedup']:>7.2f}x {vs_torch} {r['gmacs']:>7.2f} "
                     f"{xla} {comp}")
    train = [c for c, r in rows.items() if "train_ms" in r]
    if train:
        lines.append(f"{'case':<28} {'step ms':>9} {'x dense':>8} {'temp MiB':>9} {'x':>6} {'peak MiB':>9} {'x':>6} "
                     f"{'trainable':>10}")
        for case in train:
            r = rows[case]
            lines.append(f"{case:<28} {r['train_ms']:>9.0f} {r['train_speedup']:>7.2f}x {r['mem_temp_mb']:>9.0f} "
                         f"{r['mem_temp_ratio']:>6.2f} {r['mem_peak_mb']:>9.0f} {r['mem_peak_ratio']:>6.2f} "
                         f"{r['trainable_params']:>10}")
        lines.append(f"paper (full fine-tuning, GPU, batch 128): {PAPER_TRAIN['speedup']}x faster training, "
                     f"{PAPER_TRAIN['memory']:.0%} of the memory")
    if with_targets:
        lines += targets(rows)
    seen = set()
    for case, r in rows.items():
        if "ms_per_video" in r and r["method"] in METHODS and r["method"] not in seen:
            seen.add(r["method"])
            lines.append(f"tokens {r['method']}: {r['tokens']}")
    return "\n".join(lines)


def record_rows(rows: dict[str, dict], name: str, run: dict | None = None, write: bool = True) -> list[dict]:
    """One harness.record line per case (None values dropped), printed as JSON; with write=False nothing
    goes to benchmarks/results.jsonl or RESULTS.md."""
    from benchmarks import harness

    run = run or {}
    notes = NOTES.format(attn=run.get("torch_attn") or "(not run)", threads=run.get("torch_threads") or "-",
                         caption_len=next((r["caption_len"] for r in rows.values() if "caption_len" in r), "-"))
    out = []
    for case, row in rows.items():
        metrics = {k: v for k, v in row.items() if v is not None}
        metrics.update(load1=os.getloadavg()[0], notes=notes)
        out.append(harness.record(BENCHMARK, f"{name} {case}", metrics, smoke=not write))
    return out


# ----------------------------------------------------------------------------- entry point


def _define_flags():
    """Flags are defined only when run as a script, so importing this module (tests) defines none."""
    from absl import flags

    flags.DEFINE_list("videos", ["4", "1"], "Inference batches (videos of 12 frames).")
    flags.DEFINE_integer("train_videos", 4, "Training-step batch (videos and as many captions).")
    flags.DEFINE_integer("repeats", 10, "Interleaved inference rounds (one call per function each; medians).")
    flags.DEFINE_integer("train_repeats", 5, "Interleaved training rounds (one step per case each; medians).")
    flags.DEFINE_bool("train", True, "Also time the training steps (--notrain: inference only).")
    flags.DEFINE_bool("torch", True, "Also time the PyTorch (transformers) dense tower in the same rounds.")
    flags.DEFINE_bool("record", True, "Append to benchmarks/results.jsonl and regenerate RESULTS.md.")
    flags.DEFINE_bool("smoke", False, "Tiny CLIP (4 frames of 32 px, 4 layers), batches 2 and 1, two rounds, "
                      "XLA backend optimisation off; records nothing.")


def run(smoke: bool = False, videos=(4, 1), train_videos: int = 4, repeats: int = 10, train_repeats: int = 5,
        train: bool = True, torch: bool = True, record: bool = True, compiler_options: dict | None = None,
        log=print) -> dict[str, dict]:
    """The body of main: measure, record (never for smoke), print the summary; returns the rows."""
    if smoke:
        dims, videos, train_videos, repeats, train_repeats = smoke_dims(), (2, 1), 2, 2, 2
        compiler_options = SMOKE_COMPILER_OPTIONS if compiler_options is None else compiler_options
        name = "smoke CLIP"
    else:
        dims = paper_dims()
        name = f"CLIP-B/32 {dims['num_frames']}f LoRA r{LORA_RANK}"
    log(f"{name}: videos {list(videos)}, train videos {train_videos if train else '-'}, {repeats} / {train_repeats} "
        f"rounds; load {os.getloadavg()[0]:.2f}", flush=True)
    rows, info = measure(dims, tuple(videos), train_videos, repeats, train_repeats, train=train, torch=torch,
                         compiler_options=compiler_options, log=log)
    record_rows(rows, name, info, write=record and not smoke)
    log(summary(rows, with_targets=not smoke), flush=True)
    return rows


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        videos = tuple(int(v) for v in f.videos)
    except ValueError:
        raise app.UsageError(f"--videos={','.join(f.videos)}: give batch sizes, e.g. --videos=4,1") from None
    run(smoke=f.smoke, videos=videos, train_videos=f.train_videos, repeats=f.repeats, train_repeats=f.train_repeats,
        train=f.train, torch=f.torch, record=f.record)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)

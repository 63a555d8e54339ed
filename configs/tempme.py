"""TempMe (ICLR 2025): temporal token merging for CLIP text-video retrieval.

    python -m jdjax.main --config=configs/tempme.py             # embedded recipe (below): dense vs ImgMe vs TempMe
    python -m jdjax.main --config=configs/tempme.py:smoke       # seconds, for CI
    python -m jdjax.main --config=configs/tempme.py --config.method=tempme --config.mode=full
    # the paper's setting: MSR-VTT 9k / 1k-A with OpenAI's ViT-B/32, LoRA rank 8 (PEFT)
    python -m jdjax.main --config=configs/tempme.py:b32 --config.init_from=ViT-B-32.pt --config.init_format=openai_clip \
        --config.data.data_dir=/data/msrvtt --config.data.bpe_path=bpe_simple_vocab_16e6.txt.gz

`method` is 'dense' (LoRA, CLIP4Clip mean pooling of per-frame features), 'imgme' (ToMe within
each frame in every layer), 'tempme' (ImgMe, then ClipMe layers with progressive clip
grouping), or a comma list; each trains in its own sub-directory of the workdir (a finished one
is skipped on rerun, an interrupted one resumes). `mode` is 'peft' (LoRA on the visual and
text qkv plus the clip position embeddings, 507,648 parameters for B/32) or 'full'. The end
table gives t2v / v2t R@1/5/10 and R-Sum (checkpoint chosen on val, then test), ms/video,
visual GMACs per video, tokens out and trainable parameters.

Embedded recipe (no download, 2 CPU cores): generated 8-frame videos of one moving, changing
shape, captioned by the ORDER of two events ("a red circle moves left, then turns blue"); every
video's time reversal is in the same split with the reversed story, so the two have the same
frames and mean pooling cannot tell them apart (jdjax/data/video.py). A small CLIP is first
trained on captioned frames ("a small red circle on the left"; workdir/pretrain), then frozen
and adapted with LoRA dense / ImgMe / TempMe. Data sets: `data.name` 'msrvtt', 'didemo',
'activitynet' or 'lsmdc' read their public layouts from `data.data_dir` (jdjax/data/video.py).
"""

import ml_collections

from configs import common

# Released MSR-VTT recipe (spec §2.4): 4 GPUs x 32 = 128 per step, 5 epochs of 180k captions.
PAPER_STEPS = 5 * 1406


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, b32=False, b16=False, full=False)
    c = common.base_config()
    c.task = "tempme"
    c.method = "dense,imgme,tempme"
    c.mode = "peft"  # 'peft' (LoRA + clip position embeddings) or 'full' (every parameter but logit_scale)
    c.init_format = ""  # init_from's format: '' (a jdjax.tools.convert directory), 'openai_clip' (.pt), 'open_clip'

    c.data = ml_collections.ConfigDict(
        dict(
            name="moving_shapes",  # or msrvtt, didemo, activitynet, lsmdc (data_dir)
            data_dir="",
            num_frames=8,
            image_size=32,
            num_train=2400,  # generated videos (time-reversed pairs)
            num_eval=400,
            seed=0,
            twin_batches=True,  # generated data: each training batch = B/2 videos + their time-reversed twins
            val_fraction=0.05,  # real data: share of the train videos held out for validation
            skip_missing=False,  # real data: skip annotated videos without a file (counted) instead of failing
            bpe_path="",  # CLIP's bpe_simple_vocab_16e6.txt.gz; '' = a word vocabulary of the generated captions
            text_length=0,  # tokens per caption (SOT + words + EOT, padded); 0 = the text tower's context length
            prefetch=4,
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            name="",  # a published CLIP ('ViT-B/32'): its shapes replace the numbers below
            embed_dim=64, patch_size=8, vision_width=64, vision_layers=6, vision_heads=4,
            context_length=16, vocab_size=0, text_width=64, text_layers=2, text_heads=4,
            lora_rank=8, lora_dropout=0.0, remat=False, dtype="float32",
            remat_policy="nothing_saveable",  # what remat keeps: a jax.checkpoint_policies name, e.g. dots_saveable
        )
    )
    # TempMe's merging (num_frames comes from data). Embedded: 17 tokens per frame, ImgMe r=1 in
    # layers 0-2, ClipMe at 3, 4, 5 grouping 8 frames -> 4 -> 2 -> 1 clip: 8 x 17 -> 1 x 31 tokens.
    c.temporal = ml_collections.ConfigDict(
        dict(imgme_r=1, clip_layers=(3, 4, 5), group_factors=(2, 2, 2), cross_ratio=0.3, intra_ratio=0.1)
    )
    c.batch_size = 32
    c.eval_batch_size = 80
    c.num_train_steps = 900
    c.eval_every_steps = 150
    c.optimizer.update(learning_rate=3e-3, weight_decay=0.2, warmup_steps=90, eps=1e-6)
    c.checkpoint.update(best_metric="val/rsum", best_mode="max", every_steps=300)

    # The embedded backbone: a small CLIP fully trained on the captioned frames of the train videos.
    c.pretrain = ml_collections.ConfigDict(
        dict(num_train_steps=1000, batch_size=64, learning_rate=3e-3, weight_decay=0.1, eval_every_steps=250)
    )

    if args.b32 or args.b16:
        c.data.update(name="msrvtt", num_frames=12, image_size=224)
        c.data.text_length = 32  # SOT + <= 30 BPE tokens + EOT (spec §2.4)
        c.model.update(name="ViT-B/32" if args.b32 else "ViT-B/16", lora_rank=8)
        if args.b32:  # released (spec §2.1, §2.2)
            c.temporal.update(imgme_r=2, clip_layers=(8, 9, 10), group_factors=(2, 2, 3), cross_ratio=0.3,
                              intra_ratio=0.1)
        else:  # [R] reconstructed: reproduces the paper's 1 x 127 tokens and 121 GFLOPs (spec §2.2)
            c.temporal.update(imgme_r=10, clip_layers=(8, 9, 10), group_factors=(2, 2, 3), cross_ratio=0.4,
                              intra_ratio=0.2)
        c.method = "tempme"
        c.batch_size = 128
        c.eval_batch_size = 80
        c.num_train_steps = PAPER_STEPS
        c.eval_every_steps = 150
        c.optimizer.update(learning_rate=6e-4, weight_decay=0.2, warmup_steps=PAPER_STEPS // 10, eps=1e-6,
                           grad_clip_norm=1.0)
        c.checkpoint.every_steps = 150
        c.model.remat = True
    if args.full:
        c.mode = "full"
    if args.smoke:
        common.shrink_for_smoke(c, steps=12)
        c.data.update(num_frames=4, image_size=16, num_train=64, num_eval=32)
        c.model.update(embed_dim=32, patch_size=8, vision_width=32, vision_layers=3, vision_heads=2, text_width=32,
                       text_layers=1, text_heads=2, lora_rank=2)
        c.temporal.update(imgme_r=1, clip_layers=(1, 2), group_factors=(2, 2))
        c.batch_size = 8
        c.eval_batch_size = 32
        c.pretrain.update(num_train_steps=12, batch_size=16, eval_every_steps=6)
    return c

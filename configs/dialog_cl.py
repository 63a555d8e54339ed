"""Group-wise contrastive learning for dialogue generation (Cai et al., Findings of EMNLP 2020).

    python -m jdjax.main --config=configs/dialog_cl.py             # embedded: chatterbot English, about 10 min
    python -m jdjax.main --config=configs/dialog_cl.py:smoke       # seconds, for CI
    python -m jdjax.main --config=configs/dialog_cl.py:transformer # the Transformer generator
    # the paper's setting (spec P4, run.sh defaults) on the authors' PersonaChat release:
    python -m jdjax.main --config=configs/dialog_cl.py:paper --config.data.name=dir \
        --config.data.data_dir=/data/PersonaChatExtend --config.data.format=fbdialog

Three runs (jdjax/tasks/dialog_cl.py): the MLE reference, the response matcher, the contrastive
model (`cl.pretrain_steps` of MLE, then the group-wise loss), and a table of MLE vs CL on test.
Embedded default: the English conversations shipped by the chatterbot-corpus package (2,306
examples), split by conversation; a small LSTM seq2seq, and the CL ramp w(n) sped up
(`cl.speed`) so that it reaches 1 within the run (the paper's 3500 / 1000 constants assume
thousands of CL steps).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, transformer=False, paper=False)
    c = common.base_config()
    c.task = "dialog_cl"
    c.data = ml_collections.ConfigDict(
        dict(
            name="chatterbot",  # or 'dir': train.txt / valid.txt / test.txt in data_dir
            data_dir="",
            format="fbdialog",  # 'dir' layout: 'fbdialog' (the authors' releases), 'parlai' or 'tsv'
            seed=0,
            vocab="word",  # or 'sentencepiece'
            vocab_size=40000,  # the word vocabulary's maximum size (specials included) / SentencePiece's size
            min_count=2,  # words seen once are __unk__, so the model learns to predict it (20 % of chatterbot's
            # val response tokens are unseen in train; with min_count 1, train has no __unk__ and val perplexity explodes)
            chinese="",  # word vocabulary: '' (whitespace + punctuation), 'words' (jieba) or 'chars'
            max_context=32,  # tokens, the latest kept (spec: 120; chatterbot: 90 % have <= 19)
            max_response=24,  # tokens with the end token (spec: 40)
            k_top=10,  # BM25: most similar contexts (the example itself dropped on train) ...
            k_bottom=10,  # ... and least similar ones
            prefetch=2,
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            name="lstm",  # or 'transformer'
            embed_dim=128, hidden=128, num_layers=2, dropout=0.2,  # LSTM (spec: 300, 256, 2, 0.2)
            width=128, num_heads=4, mlp_dim=512, max_positions=128,  # Transformer (spec: 512, 8, 2048, 128)
            attention_dropout=0.1, relu_dropout=0.1,
            dtype="float32",
        )
    )
    c.matcher = ml_collections.ConfigDict(
        dict(embed_dim=128, hidden=128, batch_size=64, num_train_steps=400, eval_every_steps=100, learning_rate=1e-3)
    )
    c.cl = ml_collections.ConfigDict(
        dict(
            # The model starts from the reference's weights [R] (the paper: from scratch, then pretrain_steps
            # = 5000 MLE updates); the contrastive updates follow num_cl_steps.
            init_from_reference=True,
            pretrain_steps=0,  # MLE updates before the contrastive loss
            num_cl_steps=200,
            batch_size=16,  # the contrastive run's batch (each example adds sample_k pairs and the reference's passes)
            eval_every_steps=50,
            sample_k=6,
            speed=50.0,  # w(n) = (tanh((n speed - 3500) / 1000) + 1) / 2: 0.5 at n = 70, 0.98 at 110 (spec: 1.0)
            normalization="soft", threshold=0.5, pos_threshold=0.5, neg_threshold=0.5,
            val_nll_weight=0.5,  # validation selects on CL loss + 0.5 NLL
        )
    )
    c.decode = ml_collections.ConfigDict(dict(beam_size=1, length_penalty=0.0, block_ngram=0))
    c.num_samples = 5  # test responses printed under the table
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_train_steps = 600  # the reference's MLE updates
    c.eval_every_steps = 50
    c.optimizer.update(name="adamw", schedule="constant", learning_rate=1e-3, warmup_steps=0, weight_decay=0.0,
                       grad_clip_norm=1.0)
    c.checkpoint.update(best_metric="val/ppl", best_mode="min")

    if args.transformer:
        c.model.name = "transformer"
        c.optimizer.update(b2=0.98, learning_rate=5e-4, warmup_steps=200)
    if args.paper:  # spec P4: run.sh defaults
        c.data.update(max_context=120, max_response=40)
        c.model.update(embed_dim=300, hidden=256, width=512, num_heads=8, mlp_dim=2048)
        c.matcher.update(embed_dim=300, hidden=300, batch_size=128, num_train_steps=20000, eval_every_steps=2000)
        c.cl.update(init_from_reference=False, pretrain_steps=5000, num_cl_steps=15000, eval_every_steps=2000,
                    batch_size=128,
                    speed=1.0)
        c.batch_size = 128
        c.num_train_steps = 20000
        c.eval_every_steps = 2000
        if args.transformer:
            c.model.num_layers = 6
            c.optimizer.update(learning_rate=1e-3, warmup_steps=8000)
    if args.smoke:
        c.data.update(max_context=16, max_response=8, k_top=4, k_bottom=3)
        c.model.update(embed_dim=16, hidden=16, width=16, num_heads=2, mlp_dim=32, num_layers=1)
        c.matcher.update(embed_dim=16, hidden=16, batch_size=16, num_train_steps=6, eval_every_steps=3)
        c.cl.update(num_cl_steps=4, eval_every_steps=2, speed=1000.0, batch_size=16)
        c.num_samples = 2
        c.batch_size = 16
        c.eval_batch_size = 64
        common.shrink_for_smoke(c, steps=10)
    return c

"""Product description generation with review posterior distillation and copying (spec P3, [R]).

    python -m jdjax.main --config=configs/prodgen.py            # embedded generated products, 4 methods
    python -m jdjax.main --config=configs/prodgen.py:smoke      # seconds, for CI
    # real data: one product per line {"title", "attributes", "reviews", "description"}
    python -m jdjax.main --config=configs/prodgen.py:paper --config.data.name=dir --config.data.data_dir=/data/jd \
        --config.data.chinese=chars

`method` is 'transformer', 'transformer_copy', 'reviews_prior', 'full' or a comma list
(jdjax/tasks/prodgen.py says what each is); each trains in its own sub-directory of the workdir.
Embedded default: generated products of 7 types (jdjax/data/products.py documents the planted
structure): titles with a one-off model token that only copying can produce, attributes, a long
tail of reviews that praise the product's user-cared aspects, and descriptions that mention them.
Two [R] choices of the recipe differ from the model's spec defaults, both measured (README, product
descriptions): the decoder reads every review's tokens (`review_memory='all'`, not one selected
review's worth), and the adaptive gate starts open (`gate_bias_init=3`; from 0 it closed before the
review path was learned).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, paper=False)
    c = common.base_config()
    c.task = "prodgen"
    c.method = "transformer,transformer_copy,reviews_prior,full"
    c.data = ml_collections.ConfigDict(
        dict(
            name="generated",  # or 'dir': train.jsonl / valid.jsonl / test.jsonl in data_dir
            data_dir="",
            seed=0,
            num_train=4000,
            num_eval=300,  # val and test each
            vocab="word",  # or 'sentencepiece'
            vocab_size=20000,
            min_count=2,  # counted once per product: one-off model tokens stay __unk__ (copy only)
            chinese="",  # word vocabulary: '' , 'words' (jieba) or 'chars'
            max_title=16, max_attr=24,  # source tokens: title, then attributes as key : value segments
            max_reviews=4, max_review_len=24,  # M reviews of Lrev tokens (spec: <= 10 x 50)
            max_target=48,  # description tokens with the end token (spec: <= 100)
            prefetch=2,
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            num_layers=2, width=128, num_heads=4, mlp_dim=256, max_positions=64, dropout=0.1,  # spec [R]: 4-6, 512, 8
            share_encoder=True, review_select="soft", review_memory="all", gate_bias_init=3.0,
            gumbel_temperature=1.0,  # [R] choices (jdjax/models/prodgen.py)
            dtype="float32",
        )
    )
    c.loss = ml_collections.ConfigDict(dict(kl_weight=1.0, kl_anneal_steps=500, bow_weight=1.0))  # beta, gamma [R]
    c.decode = ml_collections.ConfigDict(dict(beam_size=4, length_penalty=1.0, block_ngram=3))
    c.long_tail_reviews = 1  # the table's long tail: test products with at most this many reviews
    c.batch_size = 32
    c.eval_batch_size = 200
    c.num_train_steps = 800
    c.eval_every_steps = 200
    c.optimizer.update(name="adamw", schedule="cosine", learning_rate=1e-3, warmup_steps=100, weight_decay=0.01,
                       b2=0.98, grad_clip_norm=1.0)
    c.checkpoint.update(best_metric="val/bleu_4", best_mode="max")

    if args.paper:  # the spec's [R] sizes
        c.data.update(max_title=30, max_attr=60, max_reviews=10, max_review_len=50, max_target=100)
        c.model.update(num_layers=6, width=512, num_heads=8, mlp_dim=2048, max_positions=128)
        c.batch_size = 64
        c.num_train_steps = 50000
        c.eval_every_steps = 2000
        c.optimizer.update(learning_rate=5e-4, warmup_steps=4000)
        c.decode.beam_size = 5
    if args.smoke:
        c.data.update(num_train=64, num_eval=16, max_title=12, max_attr=16, max_reviews=3, max_review_len=12,
                      max_target=24)
        c.model.update(num_layers=1, width=16, num_heads=2, mlp_dim=32, max_positions=32)
        c.method = "transformer,full"
        c.batch_size = 16
        c.eval_batch_size = 16
        c.decode.beam_size = 2
        common.shrink_for_smoke(c, steps=6)
    return c

"""CSCNN: category-specific CNN for CTR with ad images (JD.com, KDD 2020), and its baselines.

    python -m jdjax.main --config=configs/cscnn.py                      # CSCNN, embedded ad-image log
    python -m jdjax.main --config=configs/cscnn.py:smoke                # seconds, for CI
    python -m jdjax.main --config=configs/cscnn.py:model=cbam           # attention without category priors
    python -m jdjax.tools.ctr_compare --config=configs/cscnn.py --workdir=runs/cscnn-compare   # model set x 3 seeds

Models (`model=`, jdjax/models/cscnn.py): no_image, cnn (plain CNN tower), cbam (channel and
spatial attention on every conv layer) and cscnn (the same with per-layer category priors).
Data: the embedded ad-image click log (jdjax/data/clicklog.py generate_ads: a category-dependent
visual cue, val/test ads unseen in training). The paper's backbone, C', r and image size were
not available (spec §2): a 3-layer CNN on 16x16 images, C' = 8, r = 4 are our choices.
`model.max_unique_images` > 0 runs the tower once per distinct ad of a batch (when there are at
most that many), the system trick of spec §2.2.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, model="cscnn", size="small")
    c = common.base_config()
    c.task = "ctr"
    c.data = ml_collections.ConfigDict(
        # oov_rate: training ids encoded as out of vocabulary, so unseen (val/test) ads read a trained row
        dict(name="ads", size=args.size, seed=0, embedding_dim=16, data_dir="", feature_map="", oov_rate=0.01, prefetch=4)
    )
    c.model = ml_collections.ConfigDict(
        dict(
            name=args.model,
            channels=(16, 32, 32),
            visual_dim=16,
            prior_channels=8,
            reduction=4,
            mlp_hidden=(64, 32),
            activation="relu",
            max_unique_images=0,
            table_row_multiple=8,
            dtype="float32",
        )
    )
    c.compare = ml_collections.ConfigDict(dict(models="cnn,no_image,cbam,cscnn", seeds="0,1,2"))
    c.batch_size = 256
    c.eval_batch_size = 1024
    c.num_train_steps = 1200  # ~4.5 epochs of the small ad log
    c.eval_every_steps = 200
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 1e-4
    c.checkpoint.best_metric = "val/auc"
    c.checkpoint.best_mode = "max"
    c.checkpoint.every_steps = 600
    c.logging.every_steps = 100

    if args.smoke:
        common.shrink_for_smoke(c)
        c.data.size = "tiny"
        c.data.embedding_dim = 8
        c.batch_size = 32
        c.eval_batch_size = 64
        c.model.update(channels=(8, 8), visual_dim=8, mlp_hidden=(16, 8), max_unique_images=16)
        c.compare.seeds = "0,1"
    return c

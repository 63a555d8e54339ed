"""A plain ViT image classifier on embedded data (the foundation's reference task).

    python -m jdjax.main --config=configs/vit.py                  # digits: ~98 % test accuracy, ~4 min on 2 CPU cores
    python -m jdjax.main --config=configs/vit.py:smoke            # seconds, for CI
    python -m jdjax.main --config=configs/vit.py:shapes           # generated shapes, 32x32
    python -m jdjax.main --config=configs/vit.py:smoke,fsdp       # parameters sharded over devices
    python -m jdjax.main --config=configs/vit.py --config.optimizer.learning_rate=3e-4

Data: `digits` (scikit-learn's 1,797 handwritten 8x8 digits, split 70/10/20 train/val/test),
`shapes` (generated, any resolution), `tfds` (a prepared ArrayRecord data set in
--config.data.data_dir, e.g. --config.data.tfds_name=cifar10) or `vtab` (a VTAB-1k task,
--config.data.vtab_task=dtd, 800/200/test splits).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, shapes=False, fsdp=False, tensor_parallel=False)
    c = common.base_config()
    c.task = "classification"

    c.data = ml_collections.ConfigDict(
        dict(
            name="digits",
            image_size=8,
            num_classes=10,
            augment_shift=1,
            prefetch=4,
            data_dir="",
            classes="",  # digits: comma-separated digits to keep, relabelled 0..k-1 ('' = all ten)
            # shapes
            num_train=10000,
            num_eval=2000,
            shapes_seed=0,
            # tfds
            tfds_name="",
            # vtab: one of the 19 VTAB-1k tasks (jdjax/data/vtab.py), read from data_dir
            vtab_task="",
            train_split="train[:90%]",
            val_split="train[90%:]",
            test_split="test",
            normalization="imagenet",
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(name="vit", patch_size=2, width=64, depth=4, num_heads=4, mlp_dim=128, dropout=0.1, dtype="float32")
    )
    c.batch_size = 128
    c.num_train_steps = 3000
    c.eval_every_steps = 250
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 100

    if args.shapes:
        c.data.name = "shapes"
        c.data.image_size = 32
        c.model.patch_size = 4
    if args.fsdp:
        c.mesh.data, c.mesh.fsdp = 1, -1
        c.sharding_rules = "fsdp"
    if args.tensor_parallel:
        c.mesh.data, c.mesh.model = -1, 2
        c.sharding_rules = "tensor_parallel"
    if args.smoke:
        common.shrink_for_smoke(c)
        c.batch_size = 32
        c.eval_batch_size = 64
        c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
        c.data.num_train, c.data.num_eval = 256, 64
    return c

"""Frozen parameters get no gradient, seen in the compiled program: the loop's train step of PYRA's
recipe (LoRA on qkv, backbone frozen by the trainable mask) costs fewer XLA FLOPs than the same
step with every parameter trainable, by at least the weight-gradient matmuls of the frozen kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import pyra as pyra_config
from jdjax.tasks import pyra
from jdjax.tasks.classification import classification_task
from jdjax.testing import FAST_COMPILE
from jdjax.train import optim
from jdjax.train.loop import make_train_step
from jdjax.train.state import TrainState

BATCH, DEPTH = 8, 2


def step_flops(config, trainable: str) -> float:
    """XLA's FLOP count of one compiled `make_train_step` of PYRA's dense LoRA model with `trainable`."""
    size, k = config.data.image_size, config.data.num_classes
    task = classification_task(pyra.build_model(config, "lora", "dense", k), {"train": None}, size, trainable=trainable)
    tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps, trainable)
    params = nn.meta.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params), {}, None)
    batch = {"image": jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32),  # [B, S, S, 3]
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}  # [B]
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # raw uint32 key data
    step = make_train_step(task, tx, schedule, optim.trainable_mask(params, trainable))
    cost = jax.jit(step).lower(state, batch, rng).compile(FAST_COMPILE).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_frozen_kernels_have_no_weight_gradient_matmuls():
    """all-trainable - masked >= 0.9 x the sum of 2 T fan_in fan_out over the frozen kernels (the four of
    each block and the patch embedding). The rest of the saving is the frozen biases, norms and position
    embedding's gradients and their optimizer updates."""
    cfg = pyra_config.get_config("smoke")
    cfg.model.update(depth=DEPTH, drop_path=0.0, lora_dropout=0.0)
    m = cfg.model
    c, mlp, p = m.width, m.mlp_dim, m.patch_size
    patches = (cfg.data.image_size // p) ** 2
    tokens = BATCH * (1 + patches)  # T: every block sees all tokens (dense 'lora' model, no merging)
    # dW = x^T dy costs 2 T fan_in fan_out per frozen kernel: qkv [C, 3C], out [C, C], fc1 [C, M], fc2 [M, C]
    blocks = DEPTH * 2 * tokens * (c * 3 * c + c * c + c * mlp + mlp * c)
    embedding = 2 * BATCH * patches * (p * p * 3) * c  # the frozen patch embedding [P P 3, C] on B (S/P)^2 patches
    masked, everything = step_flops(cfg, pyra.TRAINABLE), step_flops(cfg, "")
    saved = everything - masked
    assert saved >= 0.9 * (blocks + embedding), (masked, everything, blocks, embedding)

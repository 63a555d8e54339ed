"""Shared CTR blocks: feature declarations, embedding tables, the MLP tower
(PReLU / Dice), DCN's cross network, DIN's local activation unit, a Transformer behaviour
encoder and MMoE."""

from jdjax.nn.ctr.attention import (
    BehaviourEncoder,
    LocalActivationUnit,
    masked_softmax,
    softmax_pool,
)
from jdjax.nn.ctr.embedding import Embeddings, pool, sequence_mask
from jdjax.nn.ctr.features import (
    DenseFeat,
    SparseFeat,
    TableSpec,
    VarLenFeat,
)
from jdjax.nn.ctr.layers import MLP, CrossNetwork, Dice, PReLU
from jdjax.nn.ctr.moe import MMoE

__all__ = [
    "MLP",
    "BehaviourEncoder",
    "CrossNetwork",
    "DenseFeat",
    "Dice",
    "Embeddings",
    "LocalActivationUnit",
    "MMoE",
    "PReLU",
    "SparseFeat",
    "TableSpec",
    "VarLenFeat",
    "masked_softmax",
    "pool",
    "sequence_mask",
    "softmax_pool",
]

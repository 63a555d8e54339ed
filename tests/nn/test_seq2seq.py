"""Seq2SeqLSTM / Seq2SeqTransformer: shapes, logical names, cache = teacher forcing, masking, causality, overfitting."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax import testing
from jdjax.nn.decoding import token_nll
from jdjax.nn.seq2seq import Seq2SeqLSTM, Seq2SeqTransformer
from jdjax.train.optim import path_names
from jdjax.train.sharding import LOGICAL_AXES

V = 24
MODELS = {
    # hidden != embed_dim exercises the o2e projection; 2 bidirectional layers the carry sum
    "lstm": Seq2SeqLSTM(V, embed_dim=16, hidden=12, num_layers=2),
    "transformer": Seq2SeqTransformer(V, num_layers=2, width=16, num_heads=2, mlp_dim=32, max_positions=16),
}
CONTEXT_LENGTHS, RESPONSE_LENGTHS = (6, 3, 1), (5, 2, 4)  # tokens before padding, per example
# Compile speed only (these programs are tiny): backend optimization level 0 (~2x faster) and XLA's
# elemental fusion emitter instead of the MLIR one (~1.5x faster again on 2 cores).
FAST = testing.FAST_COMPILE
compiled = testing.compiled


def make_batch(lc=6, lr=5, seed=0):
    """context [3, lc], response_in / response_out [3, lr]; right-padded with 0, tokens in [3, V)."""
    rng = np.random.default_rng(seed)
    context = np.zeros((3, lc), np.int32)
    response = np.zeros((3, lr + 1), np.int32)
    for b, (nc, nr) in enumerate(zip(CONTEXT_LENGTHS, RESPONSE_LENGTHS)):
        context[b, :nc] = rng.integers(3, V, nc)
        response[b, 0] = 1
        response[b, 1:nr] = rng.integers(3, V, nr - 1)
        response[b, nr] = 2
    response_in = np.where(response[:, :-1] == 2, 0, response[:, :-1])  # start + tokens
    return jnp.asarray(context), jnp.asarray(response_in), jnp.asarray(response[:, 1:])


def random_params(model, *args, seed=0):
    """Boxed abstract variables (eval_shape, no compile) and N(0, 0.3^2) parameters (LayerNorm scales ~1)."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)

    def fill(name, s):
        v = 0.3 * rng.normal(size=s.shape)
        return (v / 3 + 1.0 if name.endswith("/scale") else v).astype(s.dtype)

    shapes = nn.meta.unbox(boxed)
    return boxed, jax.tree.map(fill, path_names(shapes), shapes)


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    model = MODELS[request.param]
    batch = make_batch()
    boxed, params = random_params(model, *batch[:2])
    return model, boxed, params, batch


@pytest.fixture(scope="module")
def outputs(setup):
    """One compiled program: teacher-forced and step-by-step decoding, unpadded and edited inputs, dropout on."""
    model, _, params, (context, response_in, _) = setup
    steps, b = response_in.shape[1], 1  # example 1 has 3 context tokens of 6

    def run(p):
        # the batch and (causality) a copy with response_in[:, 3] changed, in one call
        both = model.apply(p, jnp.tile(context, (2, 1)), jnp.concatenate([response_in, response_in.at[:, 3].set(7)]),
                           return_aux=True, method=lambda m, c, r, **kw: m.decode(m.encode(c), c != 0, r, **kw))
        memory = model.apply(p, context, method="encode")
        mask = context != 0
        cache = model.apply(p, memory, steps + 3, method="init_cache")  # unwritten slots must be masked

        def body(cache, xs):
            token, position = xs
            logits, cache, aux = model.apply(p, memory, mask, token, cache, position, return_aux=True,
                                             method="decode_step")
            return cache, (logits, aux)

        _, stepped = jax.lax.scan(body, cache, (response_in.T, jnp.arange(steps)))
        return dict(
            memory=memory,
            forced=jax.tree.map(lambda x: x[:3], both),
            changed=both[0][3:],
            stepped=jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), stepped),
            alone=model.apply(p, context[b:b + 1, :CONTEXT_LENGTHS[b]], response_in[b:b + 1])[0],
            train=model.apply(p, context, response_in, deterministic=False, rngs={"dropout": jax.random.key(1)}),
        )

    return compiled(run, params)


@pytest.fixture(scope="module")
def training(setup):
    """100 full-batch Adam steps on the one batch: (losses [100], gradient norms [100], loss after)."""
    model, _, params, (context, response_in, response_out) = setup
    tx = optax.adam(1e-2)

    def loss_fn(p):
        total, count = token_nll(model.apply(p, context, response_in), response_out)
        return total / count

    def train(p):
        def step(carry, _):
            p, opt = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            updates, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, updates), opt), (loss, optax.tree.norm(g))

        (after, _), (losses, grad_norms) = jax.lax.scan(step, (p, tx.init(p)), None, length=100)
        return losses, grad_norms, loss_fn(after)

    return compiled(train, params)


def test_logical_axis_names(setup):
    _, boxed, _, _ = setup
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim and set(x.names) <= set(LOGICAL_AXES), x.names


def test_shapes_finite_loss_and_grads(setup, outputs, training):
    context = setup[3][0]
    losses, grad_norms, _ = training
    assert np.isfinite(losses[0]) and 0.0 < losses[0] < 50.0
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(grad_norms)) and grad_norms[0] > 0
    train = outputs["train"]  # dropout on
    assert np.all(np.isfinite(train)) and float(np.abs(train - outputs["forced"][0]).max()) > 1e-3

    assert all(x.shape[0] == 3 for x in jax.tree.leaves(outputs["memory"]))
    logits, aux = outputs["forced"]
    chex.assert_shape(logits, (3, 5, V))
    chex.assert_shape(aux["attention"], (3, 5, 6))
    np.testing.assert_allclose(aux["attention"].sum(-1), 1.0, rtol=1e-5)
    assert float(np.where(np.asarray(context)[:, None, :] == 0, aux["attention"], 0).max()) == 0.0  # no weight on pads
    assert aux["hidden"].shape[:2] == (3, 5)
    assert float(logits[..., :2].max()) < -1e8  # pad and start are never predicted


def test_decode_step_equals_teacher_forcing(outputs):
    """The incremental path (KV cache / LSTM carry) reproduces the teacher-forced logits and aux."""
    (logits, aux), (step_logits, step_aux) = outputs["forced"], outputs["stepped"]
    np.testing.assert_allclose(step_logits, logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step_aux["attention"], aux["attention"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step_aux["hidden"], aux["hidden"], rtol=1e-4, atol=1e-5)


def test_context_padding_does_not_change_outputs(outputs):
    """Example 1 alone with its 3 context tokens gives its logits in the batch (context padded to 6)."""
    np.testing.assert_allclose(outputs["alone"], outputs["forced"][0][1], rtol=1e-4, atol=1e-4)


def test_causality(outputs):
    """Changing response_in at t = 3 leaves the logits before t = 3 alone."""
    a, b = outputs["forced"][0], outputs["changed"]
    np.testing.assert_allclose(b[:, :3], a[:, :3], rtol=1e-5, atol=1e-5)
    assert float(np.abs(b[0, 3:] - a[0, 3:]).max()) > 1e-4


def test_overfits_one_batch(training):
    losses, _, final = training
    assert float(final) < 0.05 * float(losses[0]), (float(losses[0]), float(final))

"""ProductGenerator (jdjax/models/prodgen.py): the spec's invariants (§P3), cache = teacher forcing,
copy decoding of OOV words, and overfitting one batch."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax import testing
from jdjax.models import prodgen as pg
from jdjax.train.optim import path_names
from jdjax.train.sharding import LOGICAL_AXES

V, MAX_OOV = 30, 4
B, LS, M, LR, LT = 3, 8, 3, 5, 6
SIZES = dict(max_oov=MAX_OOV, num_layers=1, width=16, num_heads=2, mlp_dim=32, max_positions=16, dropout=0.0)
MODEL = pg.ProductGenerator(V, **SIZES)
SOURCE_LENGTHS, TARGET_LENGTHS = (8, 6, 4), (6, 4, 5)  # tokens before padding (target: end included)
REVIEW_LENGTHS = ((5, 3, 2), (4, 0, 5), (0, 0, 0))  # example 1 misses review 1, example 2 has none
# Compile speed only (these programs are tiny): backend optimization level 0 (~2x faster) and XLA's
# elemental fusion emitter instead of the MLIR one (~1.5x faster again on 2 cores).
FAST = testing.FAST_COMPILE
compiled = testing.compiled


def make_batch(seed=0, reviews=REVIEW_LENGTHS):
    """The batch layout of the spec; source positions 1 and n - 1 are OOV words V and V + 1, and the
    target copies word V (unk in target_in / target_out, V in target_ext)."""
    rng = np.random.default_rng(seed)
    source, segment, source_ext = (np.zeros((B, LS), np.int32) for _ in range(3))
    target_in, target_out, target_ext = (np.zeros((B, LT), np.int32) for _ in range(3))
    review = np.zeros((B, M, LR), np.int32)
    for b, (ns, nt) in enumerate(zip(SOURCE_LENGTHS, TARGET_LENGTHS)):
        source_ext[b, :ns] = rng.integers(4, V, ns)
        source_ext[b, 1], source_ext[b, ns - 1] = V, V + 1
        source[b, :ns] = np.where(source_ext[b, :ns] >= V, 3, source_ext[b, :ns])
        half = ns // 2
        segment[b, :ns] = np.where(np.arange(ns) < half, 1, 2 + (np.arange(ns) - half) % 2)
        words = rng.integers(4, V, nt - 1)
        words[0] = V  # a copied OOV word
        in_vocab = np.where(words >= V, 3, words)
        target_ext[b, :nt] = np.append(words, 2)
        target_out[b, :nt] = np.append(in_vocab, 2)
        target_in[b, :nt] = np.append(1, in_vocab)
        for j, n in enumerate(reviews[b]):
            review[b, j, :n] = rng.integers(3, V, n)
    return {k: jnp.asarray(v) for k, v in dict(source=source, segment=segment, reviews=review, target_in=target_in,
                                               target_out=target_out, source_ext=source_ext,
                                               target_ext=target_ext).items()}


def random_params(model, batch, seed=0):
    """Boxed abstract variables (eval_shape, no compile) and N(0, 0.3^2) parameters (LayerNorm scales ~1)."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), batch)
    rng = np.random.default_rng(seed)

    def fill(name, s):
        v = 0.3 * rng.normal(size=s.shape)
        return (v / 3 + 1.0 if name.endswith("/scale") else v).astype(s.dtype)

    shapes = nn.meta.unbox(boxed)
    return boxed, jax.tree.map(fill, path_names(shapes), shapes)


def with_p_gen_bias(params, value):
    """The parameters with p_gen's bias set (+large: p_gen = 1; -large: copy only)."""
    inner = dict(params["params"], p_gen=dict(params["params"]["p_gen"], bias=jnp.full((1,), value, jnp.float32)))
    return {"params": inner}


@pytest.fixture(scope="module")
def setup():
    batch = make_batch()
    boxed, params = random_params(MODEL, batch)
    return boxed, params, batch


@pytest.fixture(scope="module")
def outputs(setup):
    """One compiled program: teacher forcing (eval and train), step-by-step decoding, and the
    review-less and copy-less models on the same parameters."""
    _, params, batch = setup

    def run(p, kl_weight):
        memory = MODEL.apply(p, batch, method="encode")
        cache = MODEL.apply(p, memory, LT + 2, method="init_cache")  # unwritten slots must be masked

        def body(cache, xs):
            token, position = xs
            log_probs, cache = MODEL.apply(p, memory, token, cache, position, method="decode_step")
            return cache, log_probs

        _, stepped = jax.lax.scan(body, cache, (batch["target_in"].T, jnp.arange(LT)))
        train = MODEL.apply(p, batch, train=True)
        forced_p_gen = with_p_gen_bias(p, 1e3)
        return dict(
            eval=MODEL.apply(p, batch),
            train=train,
            loss=pg.prodgen_loss(train, batch, kl_weight, 0.5),  # a traced kl_weight (annealing)
            stepped=jnp.swapaxes(stepped, 0, 1),
            first_oov=MODEL.apply(p, memory, jnp.full((B,), V + 1), cache, 0, method="decode_step")[0],
            first_unk=MODEL.apply(p, memory, jnp.full((B,), 3), cache, 0, method="decode_step")[0],
            plain=MODEL.clone(use_reviews=False).apply(p, batch)["log_probs"],
            gen_only=MODEL.apply(forced_p_gen, batch)["log_probs"],
            no_copy=MODEL.clone(use_copy=False).apply(forced_p_gen, batch)["log_probs"],
        )

    return compiled(run, params, jnp.float32(0.7))


@pytest.fixture(scope="module")
def training(setup):
    """100 Adam steps on one batch (posterior training, beta = gamma = 1): per step the loss terms and
    the gradient norm of each top-level parameter block; the terms after training."""
    _, params, batch = setup
    tx = optax.adam(1e-2)

    def loss_fn(p):
        return pg.prodgen_loss(MODEL.apply(p, batch, train=True), batch, 1.0, 1.0)

    def train(p):
        def step(carry, _):
            p, opt = carry
            (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            updates, opt = tx.update(g, opt, p)
            norms = {k: optax.tree.norm(v) for k, v in g["params"].items()}
            return (optax.apply_updates(p, updates), opt), (loss, aux, norms)

        (after, _), history = jax.lax.scan(step, (p, tx.init(p)), None, length=100)
        return history, loss_fn(after)[1]

    return compiled(train, params)


def test_logical_axis_names(setup):
    boxed = setup[0]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim and set(x.names) <= set(LOGICAL_AXES), x.names


def test_shapes(outputs):
    out = outputs["eval"]
    chex.assert_shape(out["log_probs"], (B, LT, V + MAX_OOV))
    chex.assert_shape([out["prior"], out["posterior"], out["log_prior"]], (B, M))
    chex.assert_shape(out["gate"], (B,))
    chex.assert_shape(out["bow_logits"], (B, V))
    chex.assert_shape(outputs["no_copy"], (B, LT, V))


def test_copy_mixture_sums_to_one(outputs):
    for key in ("eval", "train"):
        np.testing.assert_allclose(np.exp(outputs[key]["log_probs"]).sum(-1), 1.0, rtol=1e-5)
    probs = np.exp(outputs["eval"]["log_probs"])
    assert probs[..., V:V + 2].min() > 0  # the source's OOV words V, V + 1 can be copied
    assert probs[..., V + 2:].max() == 0.0  # slots no source word holds


def test_copy_mixture_function():
    """Random logits, p_gen and copy weights: sums to 1; p_gen -> 1 is the plain softmax; p_gen -> 0
    the copy distribution with repeated source words added up."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, V)) * 3, jnp.float32)
    alpha = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32), axis=-1)
    source_ext = jnp.asarray([[4, V, 4, V + 2, 7], [5, 6, V + 1, V + 1, 9]], jnp.int32)
    mix = jax.jit(pg.copy_mixture, static_argnums=4)
    z = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    np.testing.assert_allclose(np.exp(mix(logits, z, alpha, source_ext, V + MAX_OOV)).sum(-1), 1.0, rtol=1e-5)
    out = mix(logits, jnp.full((2, 3), 200.0), alpha, source_ext, V + MAX_OOV)
    np.testing.assert_allclose(out[..., :V], jax.nn.log_softmax(logits, -1), rtol=1e-6, atol=1e-6)
    assert np.exp(out[..., V:]).max() == 0.0
    copy = np.exp(mix(logits, jnp.full((2, 3), -200.0), alpha, source_ext, V + MAX_OOV))
    np.testing.assert_allclose(copy[0, :, 4], alpha[0, :, 0] + alpha[0, :, 2], rtol=1e-5)
    np.testing.assert_allclose(copy[1, :, V + 1], alpha[1, :, 2] + alpha[1, :, 3], rtol=1e-5)


def test_p_gen_one_gives_plain_softmax(outputs):
    """p_gen's bias at +1e3 (p_gen = 1): the copy model's log P over V is the copy-less model's."""
    gen_only, no_copy = outputs["gen_only"], outputs["no_copy"]
    np.testing.assert_allclose(gen_only[..., :V], no_copy, rtol=1e-5, atol=1e-5)
    assert np.exp(gen_only[..., V:]).max() == 0.0


def test_prior_and_posterior_are_masked_distributions(outputs):
    """Sum 1 over the real reviews, exactly 0 on padded ones, all 0 (no NaN) for the product without."""
    mask = np.asarray([[n > 0 for n in row] for row in REVIEW_LENGTHS])
    for key in ("eval", "train"):
        for name in ("prior", "posterior"):
            d = np.asarray(outputs[key][name])
            assert np.all(np.isfinite(d)) and np.all(np.isfinite(outputs[key]["log_" + name]))
            np.testing.assert_allclose(d.sum(-1), [1.0, 1.0, 0.0], rtol=1e-5)
            assert np.all(d[~mask] == 0.0) and np.all(d[mask] > 0)


def test_kl_helper():
    rng = np.random.default_rng(0)
    mask = jnp.asarray([[True, True, False], [True, False, True], [False, False, False]])
    log_q = pg.masked_log_softmax(jnp.asarray(rng.normal(size=(3, 3)), jnp.float32), mask)
    log_p = pg.masked_log_softmax(jnp.asarray(rng.normal(size=(3, 3)), jnp.float32), mask)
    np.testing.assert_array_equal(pg.review_kl(log_q, log_q, mask), 0.0)
    kl = np.asarray(pg.review_kl(log_q, log_p, mask))
    assert kl[0] > 0 and kl[1] > 0 and kl[2] == 0.0
    q, p = np.exp(np.asarray(log_q)[0, :2]), np.exp(np.asarray(log_p)[0, :2])
    np.testing.assert_allclose(kl[0], np.sum(q * np.log(q / p)), rtol=1e-5)


def test_no_reviews_reduces_to_title_attribute_generator(outputs):
    """Product 2 has no reviews: its gate is exactly 0 and its output is the use_reviews=False model's
    (same parameters), in evaluation and in training (posterior) mode."""
    for key in ("eval", "train"):
        gate = np.asarray(outputs[key]["gate"])
        assert np.all((gate[:2] > 0) & (gate[:2] < 1)) and gate[2] == 0.0
        np.testing.assert_allclose(outputs[key]["log_probs"][2], outputs["plain"][2], rtol=1e-5, atol=1e-5)
        assert float(np.abs(outputs[key]["log_probs"][0] - outputs["plain"][0]).max()) > 1e-3  # reviews matter


def test_decode_step_equals_teacher_forcing(outputs):
    """The cached incremental path reproduces the (inference-memory) teacher-forced log P."""
    np.testing.assert_allclose(outputs["stepped"], outputs["eval"]["log_probs"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(outputs["first_oov"], outputs["first_unk"])  # an OOV id is read as unk


def test_finite_loss_and_grads(outputs, training):
    loss, aux = outputs["loss"]
    assert np.isfinite(loss) and 0 < float(loss) < 50
    assert float(aux["kl"]) > 0 and float(aux["bow"]) > 0 and float(aux["tokens"]) == sum(TARGET_LENGTHS)
    np.testing.assert_allclose(loss, aux["nll"] + 0.7 * aux["kl"] + 0.5 * aux["bow"], rtol=1e-6)
    losses, _, norms = training[0]
    assert np.all(np.isfinite(losses))
    for name, norm in norms.items():  # finite everywhere, and every block is trained from the first step
        assert np.all(np.isfinite(norm)) and norm[0] > 0, name


def test_gate_starts_open(setup):
    """b_g starts at gate_bias_init (3): at init the gate is sigmoid(3 + w . [x; c_rev]), near 1, for products
    with reviews and exactly 0 without."""
    _, _, batch = setup

    def run(rng):
        variables = nn.meta.unbox(MODEL.init(rng, batch))
        return variables["params"]["gate"]["bias"], MODEL.apply(variables, batch)["gate"]

    bias, gate = compiled(run, jax.random.key(0))
    np.testing.assert_array_equal(bias, [3.0])
    assert np.all(gate[:2] > 0.8) and gate[2] == 0.0


def test_gumbel_straight_through():
    """The Gumbel pick: one-hot forward weights on a real review (none without reviews), gradients of
    the relaxed softmax back to log pi."""
    model = MODEL.clone(review_select="gumbel", gumbel_temperature=0.5)
    review_mask = jnp.asarray([[True, False, True], [False, False, False]])
    token_mask = jnp.asarray(np.random.default_rng(0).uniform(size=(2, M, LR)) < 0.6) & review_mask[..., None]
    log_pi = pg.masked_log_softmax(jnp.asarray([[0.3, 2.0, -0.5], [0.0, 0.0, 0.0]]), review_mask)
    weights = jnp.asarray([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])

    def select(lp):
        return model.apply({}, lp, review_mask, token_mask, True, rngs={"dropout": jax.random.key(0)},
                           method=lambda m, *a: m._select(*a))

    w, selected = jax.jit(select)(log_pi)
    picked = int(np.argmax(w[0]))
    assert picked in (0, 2) and np.allclose(w[0], np.eye(M)[picked], atol=1e-6) and np.all(w[1] == 0.0)
    np.testing.assert_array_equal(selected[0], token_mask[0, picked])
    assert not np.asarray(selected[1]).any()
    grad = jax.jit(jax.grad(lambda lp: jnp.sum(select(lp)[0] * weights)))(log_pi)
    assert np.abs(grad[0]).max() > 0 and np.all(grad[0, 1] == 0.0) and np.all(grad[1] == 0.0)


def test_gumbel_model_with_dropout(setup):
    """review_select='gumbel', dropout on: finite loss, a distribution over the extended vocabulary;
    at inference the memory holds the tokens of the prior's argmax review."""
    _, params, batch = setup
    model = MODEL.clone(review_select="gumbel", dropout=0.1)

    def run(p):
        out = model.apply(p, batch, train=True, rngs={"dropout": jax.random.key(3)})
        return pg.prodgen_loss(out, batch)[0], out, model.apply(p, batch), model.apply(p, batch, method="encode")

    loss, train, evaluation, memory = compiled(run, params)
    assert np.isfinite(loss)
    np.testing.assert_allclose(np.exp(train["log_probs"]).sum(-1), 1.0, rtol=1e-5)
    pick = np.argmax(np.where(np.asarray(evaluation["prior"]) > 0, evaluation["prior"], -1), axis=-1)
    review_mask = np.asarray(memory["mask"])[:, LS:]
    for b in range(2):
        np.testing.assert_array_equal(review_mask[b], np.asarray(batch["reviews"])[b, pick[b]] != 0)
    assert not review_mask[2].any()


def test_variants(setup):
    """Prior-only training (no posterior, KL 0), no gate (g = 1 with reviews, 0 without), and a
    separate review/target encoder stack."""
    _, params, batch = setup
    prior_only, no_gate = MODEL.clone(use_posterior=False), MODEL.clone(use_gate=False)
    separate = MODEL.clone(share_encoder=False)
    boxed, separate_params = random_params(separate, batch)
    assert "side_layers_0" in boxed["params"] and "side_layers_0" not in setup[0]["params"]

    def run(p, q):
        out = prior_only.apply(p, batch, train=True)
        return (pg.prodgen_loss(out, batch)[1], out["posterior"] is None, no_gate.apply(p, batch)["gate"],
                separate.apply(q, batch, train=True)["log_probs"])

    aux, no_posterior, gate, log_probs = compiled(run, params, separate_params)
    assert no_posterior and float(aux["kl"]) == 0.0 and np.isfinite(aux["nll"]) and float(aux["bow"]) > 0
    np.testing.assert_array_equal(gate, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, rtol=1e-5)


def test_review_memory_all(setup):
    """review_memory='all': the decoder reads every real review token (mask = reviews != 0, none without
    reviews); with one review per product the selection weight is 1 on it, so 'all' and 'selected'
    give the same log P (masked keys do not count) while with several reviews they differ."""
    _, params, batch = setup
    every = MODEL.clone(review_memory="all")
    single = make_batch(seed=1, reviews=((0, 4, 0), (3, 0, 0), (0, 0, 0)))

    def run(p):
        return (every.apply(p, batch, method="encode")["mask"], every.apply(p, single)["log_probs"],
                MODEL.apply(p, single)["log_probs"], every.apply(p, batch)["log_probs"], MODEL.apply(p, batch)["log_probs"])

    mask, all_single, selected_single, all_batch, selected_batch = compiled(run, params)
    np.testing.assert_array_equal(mask[:, LS:], np.asarray(batch["reviews"]).reshape(B, M * LR) != 0)
    np.testing.assert_allclose(all_single, selected_single, rtol=1e-5, atol=1e-5)
    assert float(np.abs(all_batch[0] - selected_batch[0]).max()) > 1e-3
    np.testing.assert_allclose(all_batch[2], selected_batch[2], rtol=1e-5, atol=1e-5)  # no reviews: same model


@pytest.fixture(scope="module")
def generated(setup):
    """Beam search and greedy decoding; the batch without its target keys; a copy-dominated model on
    an all-OOV source."""
    _, params, batch = setup
    no_target = {k: v for k, v in batch.items() if not k.startswith("target")}
    oov = dict(batch, source=jnp.where(batch["source"] != 0, 3, 0),
               source_ext=jnp.where(batch["source"] != 0, V + jnp.arange(LS) % MAX_OOV, 0))
    opts = dict(beam_size=3, max_len=7, length_penalty_alpha=0.6)

    def run(p):
        return dict(
            beam=pg.generate(MODEL, p, batch, **opts),
            no_target=pg.generate(MODEL, p, no_target, **opts),
            greedy=pg.generate(MODEL, p, batch, max_len=7),
            copy=pg.generate(MODEL, with_p_gen_bias(p, -30.0), oov, **opts),
        )

    return compiled(run, params)


def test_generation_ignores_the_target(generated):
    chex.assert_shape(generated["beam"], (B, 7))
    np.testing.assert_array_equal(generated["no_target"], generated["beam"])
    for key in ("beam", "greedy"):
        assert np.all((generated[key] >= 0) & (generated[key] < V + MAX_OOV))


def test_beam_search_copies_oov_words(generated):
    """p_gen ~ e^-30 and every source word OOV: the hypotheses are copied extended ids >= V (fed back
    to the decoder as unk)."""
    tokens = np.asarray(generated["copy"])
    assert np.all((tokens >= V) & (tokens < V + MAX_OOV)), tokens


def test_overfits_one_batch(training):
    """The NLL falls by > 10x in 100 Adam steps; the BOW term falls too."""
    (losses, first, _), last = training
    assert float(last["nll"]) < 0.1 * float(first["nll"][0]), (float(first["nll"][0]), float(last["nll"]))
    assert float(last["bow"]) < float(first["bow"][0]) and float(losses[-1]) < 0.5 * float(losses[0])

"""SCPNet (jdjax/models/scpnet.py) against plain NumPy twins of the official code and the spec's
invariants (spec `ctr_and_multilabel.md` §4.8)."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax.data.clip_tokenizer import CLIPTokenizer
from jdjax.models import scpnet
from jdjax.nn.clip import CLIP, CLIPTextTower, CLIPVisionTower
from jdjax.train.optim import path_names

# A byte-level tokenizer with merges that make "a photo of a" four tokens (as CLIP's BPE does).
TOKENIZER = CLIPTokenizer(["p h", "ph o", "pho t", "phot o</w>", "o f</w>"])
NAMES = ["cat", "dog_house", "bird", "sky", "car"]
C, CONTEXT, E = len(NAMES), 24, 24
SIZES = dict(embed_dim=E, image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
             context_length=CONTEXT, vocab_size=TOKENIZER.vocab_size, text_width=32, text_layers=1, text_heads=2)


def _relation(c, seed=0):
    """A symmetric relation matrix like the shipped ones: diag 1, off-diagonal in [0.43, 1)."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.43, 1.0, (c, c))
    r = (r + r.T) / 2
    np.fill_diagonal(r, 1.0)
    return r.astype(np.float32)


# ----------------------------------------------------------------------------- NumPy twins (official code)


def np_adjacency_and_calibration(r, topk, p, temperature):
    """model.py SCPNet.__init__, step by step: top-k of R per row, zero the rest and the diagonal,
    rows to sum p, diagonal 1 - p; S = softmax(G / T) over the full row, zero outside the top-k,
    renormalise."""
    r = np.array(r, np.float64)
    c = len(r)
    keep = np.zeros((c, c), bool)
    for i in range(c):
        keep[i, np.argsort(-r[i], kind="stable")[:topk]] = True
    g = np.where(keep, r, 0.0)
    np.fill_diagonal(g, 0.0)
    g = g / g.sum(1, keepdims=True) * p
    np.fill_diagonal(g, 1 - p)
    s = np.exp(g / temperature) / np.exp(g / temperature).sum(1, keepdims=True)
    s[~keep] = 0
    return g, s / s.sum(1, keepdims=True)


def np_splc(logits, targets, epoch, margin=1.0, tau=0.6, gamma=2.0):
    """loss.py SPLC.forward (targets 0/1)."""
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    x = np.where(targets == 1, logits - margin, logits)
    if epoch >= 1:
        targets = np.where(sig(x) > tau, 1, targets)
    pred = sig(x)
    w = ((1 - pred) * targets + pred * (1 - targets)) ** gamma
    return np.sum(-(targets * np.log(sig(x)) + (1 - targets) * np.log(sig(-x))) * w)


def np_pessl(p_w, p_s, y_lb, bank, relation_s, hard_k, kl_lambda):
    """scpnet.py: the classwise thresholds from the bank, then consistency_loss(), per sample."""
    n, c = bank.shape
    counter = bank.sum(0)
    acc = np.full(c, 1 / c)
    if counter.max() >= 1:
        for i in range(c):
            acc[i] = max(counter[i] / max(counter.max(), hard_k * n - counter.sum()), 1 / c)
    relation_p = p_w @ relation_s.T
    idx = np.argsort(-p_w, axis=1, kind="stable")[:, :hard_k]
    max_probs = np.take_along_axis(p_w, idx, 1)
    mask = ((max_probs >= 0.95 * (acc[idx] / (2 - acc[idx]))).sum(1) >= 1).astype(np.float64)
    labels = np.zeros(p_w.shape)
    for i, row in enumerate(idx):
        labels[i][row] = 1
    labels[p_w < 0.95 * (acc / (2 - acc))] = 0
    labels = np.logical_or(labels, y_lb).astype(np.float64)
    pos, neg = np.log(np.maximum(p_s, 1e-8)), np.log(np.maximum(1 - p_s, 1e-8))
    cst = -np.sum((labels * pos + (1 - labels) * neg) * mask[:, None])
    dstl = -np.sum((relation_p * pos + (1 - relation_p) * neg) * mask[:, None])
    return cst, dstl, labels, mask, 0.95 * acc / (2 - acc), cst + kl_lambda * dstl


# ----------------------------------------------------------------------------- structured semantic prior


@pytest.mark.parametrize("c,topk,temperature", [(6, 3, 0.3), (20, 20, 0.3), (12, 7, 0.2)])
def test_prior_matches_official_code(c, topk, temperature):
    r = _relation(c)
    g = scpnet.adjacency(r, topk, 0.2)
    s = scpnet.calibration(g, topk, temperature)
    g_ref, s_ref = np_adjacency_and_calibration(r, topk, 0.2, temperature)
    assert g.dtype == s.dtype == np.float32
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(g), 0.8, rtol=1e-7)
    assert np.all((g > 0).sum(1) == topk) and np.all((s > 0).sum(1) == topk)  # the same top-k mask


def test_calibration_is_softmax_over_kept_entries_not_of_r():
    r = _relation(8, seed=3)
    g = scpnet.adjacency(r, 4)
    s = scpnet.calibration(g, 4, 0.3)
    for i in range(8):
        kept = np.flatnonzero(g[i])
        e = np.exp(g[i, kept] / 0.3)
        np.testing.assert_allclose(s[i, kept], e / e.sum(), rtol=1e-6)
    with pytest.raises(AssertionError):  # the pitfall: R in place of G gives another matrix
        np.testing.assert_allclose(s, scpnet.calibration(np.where(g > 0, r, 0), 4, 0.3), rtol=1e-3)


@pytest.mark.parametrize("name,c,topk,temperature,diag,offdiag", [
    ("voc", 20, 20, 0.3, 0.4224, 0.0305), ("coco", 80, 62, 0.2, 0.4682, 0.0087),
    ("nus", 81, 50, 0.2, 0.5219, 0.0098), ("cub", 312, 312, 0.3, 0.0441, 0.0031),
])
def test_golden_values_of_the_prior(name, c, topk, temperature, diag, offdiag):
    """G's off-diagonals are small (they sum to 0.2), so diag(S) hardly depends on R's values: any
    relation matrix of the data set's size and the config's k, T reproduce the spec's golden diag(S)
    to 4 decimals (the official files' max off-diagonal to ~1e-3)."""
    report = scpnet.prior_report(_relation(c, seed=c), topk, 0.2, temperature)
    assert round(report["s_diag_mean"], 4) == diag, name
    assert abs(report["s_offdiag_max"] - offdiag) < 1e-3, name
    assert report["g_diag"] == pytest.approx(0.8) and report["g_row_sum_err"] < 1e-6
    assert report["s_row_sum_err"] < 1e-6


def test_topk_mask_keeps_self_and_validates():
    r = _relation(5)
    r[0, 3] = 1.0  # ties with the diagonal: self is still kept
    m = scpnet.topk_mask(r, 2)
    assert m[0, 0] and m[0].sum() == 2 and np.all(np.diag(m)) and np.all(m.sum(1) == 2)
    with pytest.raises(ValueError, match="topk"):
        scpnet.adjacency(r, 1)
    with pytest.raises(ValueError, match="square"):
        scpnet.adjacency(r[:3], 2)


def test_text_relation_is_cosine_similarity():
    t = np.random.default_rng(0).normal(size=(6, 10)) * np.arange(1, 7)[:, None]
    r = scpnet.text_relation(t)
    u = t / np.linalg.norm(t, axis=1, keepdims=True)
    np.testing.assert_allclose(r, u @ u.T, atol=1e-6)
    np.testing.assert_array_equal(np.diag(r), 1.0)
    np.testing.assert_allclose(r, r.T)


# ----------------------------------------------------------------------------- model


def _random_params(model, *args, seed=0, scale=0.2):
    """Parameters from the traced init shapes filled with noise (LayerNorm scales around 1), without
    compiling init; prompt_ctx then starts from the token table as init does."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *args)))["params"]
    rng = np.random.default_rng(seed)

    def fill(name, s):
        v = scale * rng.normal(size=s.shape)
        return (1.0 + v if re.search(r"ln\w*/scale$", name) else v).astype(s.dtype)

    return jax.tree.map(fill, path_names(shapes), shapes)


def _towers():
    return (CLIPVisionTower(embed_dim=E, image_size=16, patch_size=8, width=32, depth=1, num_heads=2),
            CLIPTextTower(embed_dim=E, context_length=CONTEXT, vocab_size=TOKENIZER.vocab_size, width=32, depth=1,
                          num_heads=2))


@pytest.fixture(scope="module")
def setup():
    ids = scpnet.class_prompts(TOKENIZER, NAMES, context_length=CONTEXT)
    g = scpnet.adjacency(_relation(C), 3)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32))
    clip = CLIP(**SIZES)
    clip_params = _random_params(clip, images[:1], jnp.asarray(ids))
    return ids, g, images, clip, clip_params


def _scpnet(setup, **kwargs):
    visual, text = _towers()
    return scpnet.SCPNet(**{"visual": visual, "text": text, "prompt_ids": setup[0], "adjacency": setup[1], **kwargs})


def _from_clip(setup, model, gcn_scale=0.0, seed=1):
    """SCPNet parameters: CLIP's under the same names, prompt_ctx = the embeddings of "a photo of a",
    GCN weights scaled noise (0 = zero weights); logit_scale only with scale='clip'."""
    images, clip_params = setup[2], setup[4]
    fresh = _random_params(model, images[:1], seed=seed)
    params = {k: (clip_params[k] if k in clip_params else v) for k, v in fresh.items()}
    if "gcn" in params:
        params["gcn"] = jax.tree.map(lambda w: gcn_scale * w, params["gcn"])
    return scpnet.init_prompt_context(params, setup[0])


def test_class_prompts_layout(setup):
    ids = setup[0]
    assert ids.shape == (C, CONTEXT) and ids.dtype == np.int32
    ctx = TOKENIZER.encode("a photo of a")
    assert len(ctx) == 4 and np.all(ids[:, 1:5] == ctx) and np.all(ids[:, 0] == TOKENIZER.sot_token_id)
    assert TOKENIZER.decode(ids[1]) == "a photo of a dog house ."
    with pytest.raises(ValueError, match="n_ctx"):
        scpnet.class_prompts(TOKENIZER, NAMES, ctx_init="a photo of", context_length=CONTEXT)


def _init_shapes(model, images):
    return jax.tree.map(jnp.shape, jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), images))))


def test_parameter_tree_and_init(setup):
    model = _scpnet(setup, scale="clip")
    shapes = _init_shapes(model, setup[2][:1])["params"]
    assert set(shapes) == {"visual", "text", "logit_scale", "prompt_ctx", "gcn"}
    assert shapes["gcn"] == {"w1": (E, 2 * E), "w2": (2 * E, 2 * E), "w3": (2 * E, E)}
    assert shapes["prompt_ctx"] == (4, 32)
    # The CLIP module's names: a converted CLIP checkpoint fills visual/, text/ and logit_scale.
    clip_shapes = jax.tree.map(jnp.shape, setup[4])
    assert {k: shapes[k] for k in clip_shapes} == clip_shapes
    assert "logit_scale" not in _init_shapes(_scpnet(setup), setup[2][:1])["params"]
    # Values (the text side only, to keep the compile short): prompt_ctx starts as the token
    # embeddings of "a photo of a"; GCN init U(+-1/sqrt(out)).
    init = jax.jit(lambda key: model.init(key, method=scpnet.SCPNet.class_embeddings))
    params = nn.meta.unbox(init(jax.random.key(0)))["params"]
    table = params["text"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(params["prompt_ctx"], table[np.array(TOKENIZER.encode("a photo of a"))])
    for name, out in (("w1", 2 * E), ("w2", 2 * E), ("w3", E)):
        w = np.asarray(params["gcn"][name])
        assert np.abs(w).max() <= out**-0.5 and np.abs(w).max() > 0.8 * out**-0.5, name


def test_prompter_equals_text_tower_on_the_prompt_tokens(setup):
    """With ctx = the embeddings of "a photo of a", T = the text tower on "a photo of a {name}."."""
    ids, clip, clip_params = setup[0], setup[3], setup[4]
    model = _scpnet(setup, use_gcn=False)
    params = _from_clip(setup, model)
    t = model.apply({"params": params}, method=scpnet.SCPNet.text_features)
    ref = clip.apply({"params": clip_params}, jnp.asarray(ids), method=CLIP.encode_text)
    chex.assert_shape(t, (C, E))
    np.testing.assert_allclose(t, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_gcn", [False, True])
def test_reproduces_clip_zero_shot_logits(setup, use_gcn):
    """Spec §4.8 (2): W1..W3 = 0 (or no GCN) => z* = normalize(T); with the "a photo of a" context,
    s = exp(logit_scale) and CLIP's weights, the logits are CLIP's zero-shot logits."""
    ids, _, images, clip, clip_params = setup
    model = _scpnet(setup, scale="clip", use_gcn=use_gcn)
    logits = model.apply({"params": _from_clip(setup, model)}, images)
    ref = clip.apply({"params": clip_params}, images, jnp.asarray(ids))["logits_per_image"]
    chex.assert_shape(logits, (3, C))
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("center", [False, True])
def test_gcn_matches_numpy_and_residual(setup, center):
    """z* = normalize(G LReLU(G LReLU(G T W1) W2) W3 + T), fixed scale 10; gcn_center subtracts the
    GCN output's mean over classes before the residual."""
    g, images = setup[1], setup[2]
    model = _scpnet(setup, scale=10, gcn_center=center)
    params = _from_clip(setup, model, gcn_scale=1.0)
    t = np.asarray(model.apply({"params": params}, method=scpnet.SCPNet.text_features), np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in params["gcn"].items()}
    lrelu = lambda x: np.where(x > 0, x, 0.2 * x)  # noqa: E731
    z = g @ lrelu(g @ lrelu(g @ t @ w["w1"]) @ w["w2"]) @ w["w3"]
    z = z - z.mean(axis=0) if center else z
    z = z + t
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(model.apply({"params": params}, method=scpnet.SCPNet.class_embeddings), z, atol=1e-5)
    f = np.asarray(model.apply({"params": params}, images, method=lambda m, x: m.visual(x)), np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    np.testing.assert_allclose(model.apply({"params": params}, images), 10 * f @ z.T, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # about 30 s: five eager gradients through both towers
def test_gcn_grad_mask_routes_gradient_not_value(setup):
    """gcn_grad False: the same logit, no gradient into the GCN from it, the same gradient into the
    image tower; all True: the plain model's gradients. (Eager gradients: jitting each one compiles
    far longer than running it op by op at these sizes.)"""
    images = setup[2]
    model = _scpnet(setup, scale=10)
    params = _from_clip(setup, model, gcn_scale=1.0)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(3, C)), jnp.float32)
    mask = np.zeros((3, C), bool)
    mask[0, 1] = True

    def grads(w, gcn_grad=None):
        return jax.grad(lambda p: jnp.sum(w * model.apply({"params": p}, images, gcn_grad=gcn_grad)))(params)

    np.testing.assert_array_equal(model.apply({"params": params}, images, gcn_grad=mask),
                                  model.apply({"params": params}, images))
    g_ref = grads(weights)
    chex.assert_trees_all_close(grads(weights, np.ones((3, C), bool)), g_ref, atol=1e-6)
    g_none = grads(weights, np.zeros((3, C), bool))
    chex.assert_trees_all_equal(g_none["gcn"], jax.tree.map(jnp.zeros_like, g_ref["gcn"]))
    np.testing.assert_allclose(g_none["visual"]["proj"], g_ref["visual"]["proj"], atol=1e-6)
    # Only the one True entry trains the GCN: its GCN gradient is that entry's alone.
    g_one = grads(weights, mask)
    g_entry = grads(jnp.zeros((3, C)).at[0, 1].set(weights[0, 1]))
    chex.assert_trees_all_close(g_one["gcn"], g_entry["gcn"], atol=1e-6)
    assert float(jnp.abs(g_one["gcn"]["w1"]).max()) > 0


def test_model_errors(setup):
    with pytest.raises(ValueError, match="adjacency"):
        _init_shapes(_scpnet(setup, adjacency=np.eye(3, dtype=np.float32)), setup[2][:1])
    with pytest.raises(ValueError, match="scale"):
        _init_shapes(_scpnet(setup, scale="learned"), setup[2][:1])
    ids = setup[0].copy()
    ids[2, 3] = 1
    with pytest.raises(ValueError, match="context tokens"):
        _init_shapes(_scpnet(setup, prompt_ids=ids), setup[2][:1])


# ----------------------------------------------------------------------------- losses


def _logits(shape, seed=0, scale=3.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _single_positive(b, c, seed=0):
    y = np.zeros((b, c), np.int32)
    y[np.arange(b), np.random.default_rng(seed).integers(0, c, b)] = 1
    return y


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_splc_matches_official(epoch):
    x, y = _logits((6, 7)), _single_positive(6, 7)
    got = scpnet.splc_loss(jnp.asarray(x), jnp.asarray(y), epoch >= 1)
    np.testing.assert_allclose(got, np_splc(x.astype(np.float64), y, epoch), rtol=1e-5)
    assert got.dtype == jnp.float32


def test_splc_relabels_only_from_epoch_one_under_jit():
    x, y = _logits((6, 7), seed=2), _single_positive(6, 7, seed=2)
    loss = jax.jit(scpnet.splc_loss)
    a, b = loss(x, y, jnp.asarray(False)), loss(x, y, jnp.asarray(True))
    np.testing.assert_allclose(a, np_splc(x.astype(np.float64), y, 0), rtol=1e-5)
    np.testing.assert_allclose(b, np_splc(x.astype(np.float64), y, 1), rtol=1e-5)
    assert float(a) != float(b)  # some unobserved logits are > logit(0.6)


def test_splc_known_only_sums_known_entries():
    """Partial labels {1, 0 unknown, -1 known negative}: the focal-margin terms of the known entries."""
    x = _logits((5, 6), seed=4).astype(np.float64)
    ann = np.random.default_rng(4).choice([-1, 0, 1], size=(5, 6))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    xs = np.where(ann == 1, x - 1.0, x)
    y = (ann == 1).astype(np.float64)
    p = sig(xs)
    terms = -(y * np.log(sig(xs)) + (1 - y) * np.log(sig(-xs))) * ((1 - p) * y + p * (1 - y)) ** 2
    expected = np.sum(terms * (ann != 0))
    for use_splc in (False, True):
        got = scpnet.splc_loss(jnp.asarray(x, jnp.float32), jnp.asarray(ann), use_splc, known_only=True)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_splc_gradient_includes_the_focal_weight():
    x, y = jnp.asarray(_logits((2, 3), seed=5)), jnp.asarray(_single_positive(2, 3, seed=5))
    grad = jax.grad(lambda v: scpnet.splc_loss(v, y, False))(x)
    # d/dx [-p^2 log(1 - p)] for a negative, focal weight differentiated too.
    p = jax.nn.sigmoid(x[y == 0])
    np.testing.assert_allclose(grad[y == 0], 2 * p * p * (1 - p) * -jnp.log1p(-p) + p * p * p, rtol=1e-4)


def test_class_thresholds_on_a_hand_computed_bank():
    # N = 6 images, C = 4 classes, k = 1. sigma = [2, 1, 0, 0]; max 2, k N - sum = 6 - 3 = 3 -> den 3;
    # beta = max([2/3, 1/3, 0, 0], 1/4) = [2/3, 1/3, 1/4, 1/4];
    # tau = 0.95 beta / (2 - beta) = [0.95 * (2/3) / (4/3), 0.95 * (1/3) / (5/3), 0.95 * 0.25 / 1.75, same]
    #     = [0.475, 0.19, 0.1357142857, 0.1357142857].
    bank = jnp.asarray([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
                       jnp.int8)
    np.testing.assert_allclose(scpnet.class_thresholds(bank, 1), [0.475, 0.19, 0.95 * 0.25 / 1.75, 0.95 * 0.25 / 1.75],
                               rtol=1e-6)
    # k = 2: k N - sum = 9 -> den 9, beta = max([2/9, 1/9, 0, 0], 1/4) = 1/4 everywhere.
    np.testing.assert_allclose(scpnet.class_thresholds(bank, 2), 0.95 * 0.25 / 1.75, rtol=1e-6)
    # Max branch: N = 4, C = 3, k = 2, sigma = [3, 1, 2], k N - sum = 2 < max 3 -> beta = [1, 1/3, 2/3],
    # tau = [0.95, 0.19, 0.475].
    bank = jnp.asarray([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]], bool)
    np.testing.assert_allclose(scpnet.class_thresholds(bank, 2), [0.95, 0.19, 0.475], rtol=1e-6)
    # An empty bank: beta = 1/C (tau ~ 0.006 for COCO's 80 classes).
    np.testing.assert_allclose(scpnet.class_thresholds(jnp.zeros((10, 80), jnp.int8), 2), 0.95 / 80 / (2 - 1 / 80),
                               rtol=1e-6)


def test_thresholds_in_range_on_random_banks():
    rng = np.random.default_rng(0)
    thresholds = jax.jit(scpnet.class_thresholds, static_argnums=1)
    for density in (0.0, 0.05, 0.3, 0.9, 1.0):
        bank = jnp.asarray(rng.random((12, 7)) < density)
        for k in (1, 3, 7):
            tau = np.asarray(thresholds(bank, k))
            assert np.all(tau > 0) and np.all(tau <= 0.95 + 1e-7), (density, k)


def test_pessl_against_official_per_sample_code():
    b, c, n, k, kl = 6, 7, 10, 2, 2.0
    rng = np.random.default_rng(1)
    p_w = rng.uniform(0, 1, (b, c))
    p_w[:2] *= 0.05  # rows with every class below its threshold (tau >= 0.95 (1/C) / (2 - 1/C) = 0.073)
    p_s = rng.uniform(0, 1, (b, c))
    p_s[0, 0], p_s[1, 1] = 0.0, 1.0  # exercise the 1e-8 clamps
    y_lb = _single_positive(b, c, seed=1)
    bank = (rng.random((n, c)) < 0.3).astype(np.int8)
    relation_s = scpnet.calibration(scpnet.adjacency(_relation(c), 4), 4, 0.3)
    cst, dstl, labels, mask, tau_ref, _ = np_pessl(p_w, p_s, y_lb, bank, relation_s.astype(np.float64), k, kl)
    tau = scpnet.class_thresholds(jnp.asarray(bank), k)
    np.testing.assert_allclose(tau, tau_ref, rtol=1e-6)
    y_hat, m = scpnet.pseudo_labels(jnp.asarray(p_w, jnp.float32), tau, jnp.asarray(y_lb), k)
    np.testing.assert_array_equal(y_hat, labels)
    np.testing.assert_array_equal(m, mask.astype(bool))
    assert 0 < mask.sum() < b  # both kinds of rows
    p_s32 = jnp.asarray(p_s, jnp.float32)
    r = scpnet.calibrated_targets(jnp.asarray(p_w, jnp.float32), relation_s)
    np.testing.assert_allclose(scpnet.consistency_loss(p_s32, y_hat, m), cst, rtol=1e-5)
    np.testing.assert_allclose(scpnet.distill_loss(p_s32, r, m), dstl, rtol=1e-5)


def test_calibrated_targets_in_unit_interval():
    rng = np.random.default_rng(2)
    s = scpnet.calibration(scpnet.adjacency(_relation(9, seed=2), 5), 5, 0.2)
    p = jnp.asarray(rng.uniform(0, 1, (16, 9)), jnp.float32)
    r = np.asarray(scpnet.calibrated_targets(p, s))
    np.testing.assert_allclose(r, np.asarray(p) @ s.T, rtol=1e-5)
    assert r.min() >= 0 and r.max() <= 1 + 1e-6
    np.testing.assert_allclose(scpnet.calibrated_targets(jnp.ones((2, 9)), s), 1.0, rtol=1e-6)  # rows of S sum to 1


def test_memory_bank_update():
    bank = jnp.zeros((5, 3), jnp.int8).at[4].set(jnp.asarray([1, 1, 0], jnp.int8))
    pseudo = jnp.asarray([[0, 1, 1], [0, 0, 0], [1, 0, 0]], jnp.float32)
    out = scpnet.pessl_state_update(bank, jnp.asarray([2, 4, 0]), pseudo)
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(out, [[1, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]])  # row 4 kept


def test_total_loss_composition():
    b, c = 4, 5
    x_lb, x_w, x_s = (jnp.asarray(_logits((b, c), seed=s)) for s in (6, 7, 8))
    ann = jnp.asarray(_single_positive(b, c, seed=6))
    calib = scpnet.calibration(scpnet.adjacency(_relation(c), 3), 3, 0.3)
    tau = scpnet.class_thresholds(jnp.zeros((8, c), jnp.int8), 2)
    total, aux = scpnet.scpnet_loss(x_lb, x_w, x_s, ann, tau, calib, use_splc=True, hard_k=2, kappa=3.0)
    np.testing.assert_allclose(total, aux["sup"] + 0.125 * (aux["cst"] + 3.0 * aux["dstl"]), rtol=1e-6)
    np.testing.assert_allclose(aux["sup"], scpnet.splc_loss(x_lb, ann, True), rtol=1e-6)
    assert aux["pseudo_labels"].shape == (b, c) and aux["mask"].shape == (b,)


# ----------------------------------------------------------------------------- training


def test_full_model_gradients_and_overfit_one_batch(setup):
    """SCPNet (s = exp(logit_scale)) + L_sup + PESSL with Adam on one batch of 3 images (the three
    views: the images, weak and strong noise), the memory bank refreshed every step. The gradients
    are finite and reach the context, the GCN, the scale and both towers, but not the token table
    (the non-context prompt embeddings are constants, buffers in the official prompt learner); the
    loss falls and every observed positive ends up predicted positive."""
    images = setup[2]
    model = _scpnet(setup, scale="clip")
    params = {**_from_clip(setup, model, gcn_scale=0.3), "logit_scale": np.float32(np.log(1 / 0.07))}  # CLIP's
    ann = jnp.asarray(np.eye(C, dtype=np.int32)[[0, 2, 4]])
    calib = jnp.asarray(scpnet.calibration(setup[1], 3, 0.3))
    noise = jnp.asarray(np.random.default_rng(3).normal(size=(2,) + images.shape).astype(np.float32))
    views = jnp.concatenate([images, images + 0.05 * noise[0], images + 0.2 * noise[1]])  # [3B, H, W, 3]
    tx = optax.adam(3e-3)

    def loss_fn(p, bank):
        logits = model.apply({"params": p}, views)
        x_lb, x_w, x_s = jnp.split(logits, 3)
        tau = scpnet.class_thresholds(bank, 2)
        total, aux = scpnet.scpnet_loss(x_lb, x_w, x_s, ann, tau, calib, use_splc=True, hard_k=2, kappa=1.0)
        return total, {**aux, "logits": x_lb}

    @jax.jit
    def step(p, opt_state, bank):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, bank)
        updates, opt_state = tx.update(grads, opt_state, p)
        bank = scpnet.pessl_state_update(bank, jnp.arange(3), aux["pseudo_labels"])
        return optax.apply_updates(p, updates), opt_state, bank, loss, grads, aux["logits"]

    opt_state, bank = tx.init(params), jnp.zeros((3, C), jnp.int8)
    losses = []
    for i in range(40):
        params, opt_state, bank, loss, grads, _ = step(params, opt_state, bank)
        if i == 0:
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))
            for path in ("prompt_ctx", "gcn/w1", "logit_scale", "visual/proj", "text/text_projection"):
                leaf = grads
                for k in path.split("/"):
                    leaf = leaf[k]
                assert float(jnp.abs(leaf).max()) > 0, path
            np.testing.assert_array_equal(grads["text"]["token_embedding"]["embedding"], 0.0)
        assert np.isfinite(float(loss))
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], np.round(losses, 2)
    # The trained model's logits of the images: the first third of one more (compiled) step's forward,
    # which runs on the final params (its update is discarded); an eager apply costs seconds of op compiles.
    logits = np.asarray(step(params, opt_state, bank)[-1])
    assert np.all(logits[np.arange(3), [0, 2, 4]] > 0), logits

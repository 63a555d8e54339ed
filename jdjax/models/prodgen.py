"""Product description generation with review posterior distillation ("adaptive posterior network";
Zhan et al., arXiv 2103.01594; spec `experiments_ads_text.md` §P3).

Only the paper's abstract was retrievable. Everything below is the spec's [R] reading (a PostKS-style
prior/posterior over reviews, Lian et al. IJCAI'19, plus a pointer-generator copy); every choice is a
field of `ProductGenerator` so it can be switched once the equations are checked against the PDF.

Batch (int32, pad 0): `source` [B, Ls] title then attribute tokens, `segment` [B, Ls] (1 title,
2 attribute key, 3 attribute value), `reviews` [B, M, Lrev] (all-zero rows = missing reviews),
`target_in` / `target_out` [B, Lt] (start 1 + tokens / tokens + end 2), `source_ext` [B, Ls] and
`target_ext` [B, Lt] in the extended vocabulary of V + max_oov ids (the example's source OOV words
are V, V+1, ...; `source` and `target_*` hold unk 3 for them).

Encoders (one post-LN Transformer stack by default; segment 4 marks reviews, 5 the target):

    H = Enc([title; attributes])  [B, Ls, D]          x = masked mean of H          [B, D]
    H^r_j = Enc(r_j)  [B, M, Lrev, D]                 k_j = masked mean of H^r_j    [B, M, D]
    y = masked mean of Enc(target_out)  [B, D]        (teacher forcing only, never in `encode`)

Review selection over the real reviews (padded ones get exactly 0; a product without reviews gets
all zeros):

    p(j|x) = softmax_j(k_j . W_p x)            q(j|x,y) = softmax_j(k_j . W_q [x; y])
    pi = q when training with the posterior, else p (inference, evaluation, prior-only models)
    soft:    w = pi
    gumbel:  w = onehot(argmax_j(log pi_j + G_j)) + s - sg(s),  s = softmax((log pi + G) / tau)
             (straight-through, G ~ Gumbel from the 'dropout' RNG stream; inference: argmax_j p_j)
    c_rev = sum_j w_j k_j  [B, D]              H^r_sel = sum_j w_j H^r_j  [B, Lrev, D]
    g = sigmoid(w_g . [x; c_rev] + b_g)        (g = 1 without the gate), g = 0 exactly when M = 0; b_g starts at 3
    memory = [H; g H^r_sel]  [B, Ls + Lrev, D]  (review_memory='selected'; 'all': [H; g H^r_1; ...; g H^r_M]
             [B, Ls + M Lrev, D], every real review's tokens [R]); the review part is masked when M = 0, so the
             decoder then sees exactly the title + attribute generator's memory.

Decoder: the post-LN decoder layers of `jdjax.nn.seq2seq` over the memory, tied output E [V, D]:

    h_t = Dec(y_<t, memory),   P_vocab(w) = softmax(h_t E^T)   (pad and start blocked)
    a_t = last-layer cross-attention, mean over heads [B, Lt, Ls + Lrev],  c_t = sum_i a_ti memory_i
    alpha_t = a_t[:Ls] / sum_i a_t[:Ls]        (copy only from title + attributes)
    p_gen = sigmoid(w_h . h_t + w_c . c_t + w_y . e_t + b),  e_t the decoder's input embedding of y_{t-1}
    P(w) = p_gen P_vocab(w) + (1 - p_gen) sum_{i: source_ext_i = w} alpha_ti,   w < V + max_oov

computed in log space (`copy_mixture`), so `log_probs` and `decode_step` return log P; a decoded id
>= V (a copied OOV word) is fed back to the decoder as unk.

Loss (`prodgen_loss`), token means over non-pad targets:

    L = NLL(target_ext) + beta KL(q || p) + gamma BOW,
    KL(q || p) = sum_j q_j (log q_j - log p_j) over real reviews (0 without reviews), batch mean,
    BOW = mean over target tokens (pad and unk ignored, products with reviews only) of
          -log softmax(Dense_V(c_rev))[token].
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.attention import logical
from jdjax.nn.decoding import beam_search, greedy_decode, tile_beams
from jdjax.nn.seq2seq import NEG_LOGIT, PAD, TransformerDecoderLayer, TransformerEncoderLayer, mask_special_logits
from jdjax.nn.vit import layer_norm

Dtype = Any

UNK = 3
REVIEW_SEGMENT, TARGET_SEGMENT = 4, 5  # after the data's 0 pad, 1 title, 2 attribute key, 3 attribute value
NUM_SEGMENTS = 6
REVIEW_SELECTS = ("soft", "gumbel")
REVIEW_MEMORIES = ("selected", "all")


# ----------------------------------------------------------------------------- functions


def masked_mean(states, mask):
    """states [..., L, D], mask [..., L] -> [..., D] mean over the True positions (0 if none)."""
    m = mask[..., None].astype(states.dtype)
    return jnp.sum(states * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)


def masked_log_softmax(scores, mask):
    """log softmax of scores [..., M] over the True positions of mask [..., M]; 0 elsewhere (also in
    rows without any True position). Probabilities: where(mask, exp(.), 0)."""
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(jnp.where(mask, jnp.exp(scores - top), 0.0), axis=-1, keepdims=True)
    return jnp.where(mask, scores - top - jnp.log(jnp.maximum(total, jnp.finfo(jnp.float32).tiny)), 0.0)


def review_kl(log_q, log_p, mask):
    """KL(q || p) = sum_j q_j (log q_j - log p_j) over mask: log_q, log_p, mask [B, M] -> [B] (0 if none)."""
    return jnp.sum(jnp.where(mask, jnp.exp(log_q) * (log_q - log_p), 0.0), axis=-1)


def copy_mixture(vocab_logits, p_gen_logit, alpha, source_ext, ext_vocab: int):
    """log P(w) of the pointer-generator mixture over the extended vocabulary.

    Args:
      vocab_logits: [B, L, V] decoder logits (P_vocab = softmax).
      p_gen_logit: [B, L] logit of p_gen.
      alpha: [B, L, Ls] copy distribution over source positions (rows sum to 1, 0 on pads).
      source_ext: [B, Ls] extended ids of the source tokens; ids >= ext_vocab (more OOV words than
        max_oov slots) are copied as unk.
      ext_vocab: V + max_oov.

    Returns:
      [B, L, ext_vocab] float32 log P; about NEG_LOGIT (-1e9, P = 0 in float32) where P = 0, e.g. the
      OOV slots the source does not hold (finite, so that no gradient through logaddexp is NaN).
    """
    b, length, vocab = vocab_logits.shape
    log_vocab = jax.nn.log_softmax(vocab_logits.astype(jnp.float32), axis=-1)  # [B, L, V]
    log_vocab = jnp.pad(log_vocab, ((0, 0), (0, 0), (0, ext_vocab - vocab)), constant_values=NEG_LOGIT)
    source_ext = jnp.where(source_ext < ext_vocab, source_ext, UNK)  # [B, Ls]
    rows, steps = jnp.arange(b)[:, None, None], jnp.arange(length)[None, :, None]
    copy = jnp.zeros((b, length, ext_vocab), jnp.float32).at[rows, steps, source_ext[:, None, :]].add(
        alpha.astype(jnp.float32))  # [B, L, V + max_oov]
    log_copy = jnp.where(copy > 0, jnp.log(jnp.where(copy > 0, copy, 1.0)), NEG_LOGIT)  # no NaN gradient at 0
    z = p_gen_logit.astype(jnp.float32)[..., None]
    return jnp.logaddexp(jax.nn.log_sigmoid(z) + log_vocab, jax.nn.log_sigmoid(-z) + log_copy)


# ----------------------------------------------------------------------------- model


class ProductGenerator(nn.Module):
    """Title + attributes (+ reviews) -> description: the §P3 [R] generator (equations in the module
    docstring).

    Embeddings as `Seq2SeqTransformer` (xlm): encoder x = LN(E(tok) sqrt(D) + P_enc(pos) + S(segment)),
    decoder LN(E(tok) sqrt(D)) + P_dec(pos); E is shared by encoder, decoder and output (tied).
    Logical axes: E ('vocab', 'embed'), position and segment tables ('pos', 'embed'), W_p / W_q
    ('embed', 'mlp'), gate and p_gen ('embed', 'classes'), BOW ('embed', 'vocab'), layers as seq2seq.

    Attributes:
      vocab_size: V (pad 0, start 1, end 2, unk 3 included).
      max_oov: extended-vocabulary slots per example (static; the data encoder's max_oov).
      num_layers, width (D), num_heads, mlp_dim: sizes of every Transformer stack [R: 4-6 layers, 512, 8].
      max_positions: rows of the learned position tables (longest source, review and target).
      dropout / attention_dropout / relu_dropout: embeddings and residuals / attention weights / FFN.
      share_encoder: [R] reviews and target use the product encoder's layers (True) or one separate
        stack of the same size for both (False).
      use_reviews: False = the title + attribute generator (no review path at all).
      use_posterior: [R] train the memory with q(j|x,y) and a KL to p (True) or with p only (False).
      review_select: [R] 'soft' (sum_j pi_j k_j) or 'gumbel' (straight-through Gumbel-softmax pick).
      review_memory: [R] what the decoder reads of the reviews: 'selected' (the spec's reading, one
        review's worth, H^r_sel [B, Lrev, D]) or 'all' (every real review, g [H^r_1; ...; H^r_M]
        [B, M Lrev, D]; the selection then shapes c_rev, so the gate and the BOW loss, only).
      gumbel_temperature: tau of the Gumbel-softmax relaxation.
      use_copy: the pointer-generator over the extended vocabulary (False: P_vocab over V).
      use_gate: [R] the adaptive gate g on the review memory (False: g = 1 when reviews exist).
      gate_bias_init: [R] b_g at init; 3 starts the gate open (g ~ 0.95). g scales the review memory's
        keys as well as its values, so a half-open gate flattens the decoder's attention over the review
        tokens; from b_g = 0 (g = 0.5) the gate closed on the embedded data (0.2-0.4 after 800 steps, 0.01
        at learning rate 2e-3) before the review path was learned (README, product descriptions).
    """

    vocab_size: int
    max_oov: int = 0
    num_layers: int = 4
    width: int = 512
    num_heads: int = 8
    mlp_dim: int = 2048
    max_positions: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.0
    relu_dropout: float = 0.0
    activation: str = "gelu"
    ln_eps: float = 1e-5
    share_encoder: bool = True
    use_reviews: bool = True
    use_posterior: bool = True
    review_select: str = "soft"
    review_memory: str = "selected"
    gumbel_temperature: float = 1.0
    use_copy: bool = True
    use_gate: bool = True
    gate_bias_init: float = 3.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads={self.num_heads}.")
        if self.review_select not in REVIEW_SELECTS:
            raise ValueError(f"unknown review_select {self.review_select!r}; choose one of {REVIEW_SELECTS}.")
        if self.review_memory not in REVIEW_MEMORIES:
            raise ValueError(f"unknown review_memory {self.review_memory!r}; choose one of {REVIEW_MEMORIES}.")
        normal = nn.initializers.normal(self.width ** -0.5)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def table(rows, axis):
            return nn.Embed(rows, self.width, embedding_init=logical(normal, (axis, "embed")), **kw)

        def dense(features, axes, use_bias=True, bias=0.0):
            return nn.Dense(features, use_bias=use_bias, kernel_init=logical(nn.initializers.lecun_normal(), axes),
                            bias_init=logical(nn.initializers.constant(bias), axes[1:]), **kw)

        self.embed = table(self.vocab_size, "vocab")
        self.segment_embed = table(NUM_SEGMENTS, "pos")
        self.encoder_positions = table(self.max_positions, "pos")
        self.decoder_positions = table(self.max_positions, "pos")
        self.encoder_norm = layer_norm(None, self.ln_eps, self.dtype, self.param_dtype)
        self.decoder_norm = layer_norm(None, self.ln_eps, self.dtype, self.param_dtype)
        layer = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                     attention_dropout=self.attention_dropout, relu_dropout=self.relu_dropout,
                     activation=self.activation, ln_eps=self.ln_eps, **kw)
        self.encoder_layers = [TransformerEncoderLayer(**layer) for _ in range(self.num_layers)]
        self.side_layers = (self.encoder_layers if self.share_encoder
                            else [TransformerEncoderLayer(**layer) for _ in range(self.num_layers)])
        self.decoder_layers = [TransformerDecoderLayer(**layer) for _ in range(self.num_layers)]
        self.prior_proj = dense(self.width, ("embed", "mlp"), use_bias=False)  # W_p
        self.posterior_proj = dense(self.width, ("embed", "mlp"), use_bias=False)  # W_q on [x; y]
        self.gate = dense(1, ("embed", "classes"), bias=self.gate_bias_init)
        self.bow = dense(self.vocab_size, ("embed", "vocab"))
        self.p_gen = dense(1, ("embed", "classes"))
        self.drop = nn.Dropout(self.dropout)

    # ------------------------------------------------------------------ public

    def __call__(self, batch, train: bool = False):
        """Teacher forcing. train: dropout, Gumbel noise, and the posterior memory (else the prior's).

        Returns dict: log_probs [B, Lt, V + max_oov] (V without copy), prior / log_prior [B, M],
        posterior / log_posterior [B, M], gate [B], bow_logits [B, V]; the review entries are None
        without reviews, the posterior ones None without the posterior.
        """
        memory, out = self._memory(batch, train, with_target=True)
        length = batch["target_in"].shape[1]
        self._check_length(length, "target")
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Lt, Lt]
        log_probs, _ = self._decode(memory, batch["target_in"], jnp.arange(length), causal, None, None, not train)
        c_rev = out.pop("c_rev")
        out["bow_logits"] = None if c_rev is None else self.bow(c_rev).astype(jnp.float32)  # [B, V]
        return dict(log_probs=log_probs, **out)

    def encode(self, batch):
        """Inference memory from source / segment / reviews / source_ext only (the prior's selection):
        {'states' [B, Lm, D], 'mask' [B, Lm], 'source_ext' [B, Ls]}, Lm = Ls (+ Lrev with reviews)."""
        return self._memory(batch, False, with_target=False)[0]

    def init_cache(self, memory, max_len: int):
        """Per-layer decoder self-attention {'key', 'value'} zeros [B, max_len, H, Dh]."""
        self._check_length(max_len, "max_len")
        shape = (memory["states"].shape[0], max_len, self.num_heads, self.width // self.num_heads)
        return {f"layer{i}": {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
                for i in range(self.num_layers)}

    def decode_step(self, memory, token, cache, position):
        """token [B] (extended ids; >= V is fed as unk) at `position` -> (log P [B, V + max_oov], cache)."""
        max_len = cache["layer0"]["key"].shape[1]
        position = jnp.asarray(position, jnp.int32)
        self_mask = (jnp.arange(max_len) <= position)[None, None, None, :]  # [1, 1, 1, T]
        log_probs, cache = self._decode(memory, token[:, None], position[None], self_mask, cache, position, True)
        return log_probs[:, 0], cache

    # ------------------------------------------------------------------ encoders and memory

    def _encode(self, tokens, segments, layers, deterministic):
        """tokens, segments [N, L] -> states [N, L, D] (zero at pads)."""
        mask = tokens != PAD
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [N, L]
        x = self.embed(tokens) * jnp.asarray(math.sqrt(self.width), self.dtype)
        x = self.encoder_norm(x + self.encoder_positions(positions) + self.segment_embed(segments))
        x = self.drop(x, deterministic=deterministic) * mask[..., None].astype(self.dtype)
        for layer in layers:
            x = layer(x, mask, deterministic)
        return x

    def _memory(self, batch, train: bool, with_target: bool):
        """-> (memory dict, {prior, log_prior, posterior, log_posterior, gate, c_rev})."""
        deterministic = not train
        source = batch["source"]  # [B, Ls]
        self._check_length(source.shape[1], "source")
        source_mask = source != PAD
        h = self._encode(source, batch["segment"], self.encoder_layers, deterministic)  # [B, Ls, D]
        memory = {"states": h, "mask": source_mask, "source_ext": batch["source_ext"]}
        out = dict(prior=None, log_prior=None, posterior=None, log_posterior=None, gate=None, c_rev=None)
        if not self.use_reviews:
            return memory, out

        x = masked_mean(h, source_mask)  # [B, D]
        reviews = batch["reviews"]  # [B, M, Lrev]
        b, m, lr = reviews.shape
        self._check_length(lr, "review")
        flat = einops.rearrange(reviews, "b m l -> (b m) l")
        hr = self._encode(flat, jnp.full_like(flat, REVIEW_SEGMENT), self.side_layers, deterministic)
        hr = einops.rearrange(hr, "(b m) l d -> b m l d", m=m)  # [B, M, Lrev, D]
        token_mask = reviews != PAD  # [B, M, Lrev]
        review_mask = token_mask.any(-1)  # [B, M]
        k = masked_mean(hr, token_mask)  # [B, M, D]

        log_p = masked_log_softmax(jnp.einsum("bmd,bd->bm", k, self.prior_proj(x)), review_mask)  # [B, M]
        out.update(log_prior=log_p, prior=jnp.where(review_mask, jnp.exp(log_p), 0.0))
        log_pi = log_p
        if self.use_posterior and with_target:
            target = batch["target_out"]  # [B, Lt]
            self._check_length(target.shape[1], "target")
            hy = self._encode(target, jnp.full_like(target, TARGET_SEGMENT), self.side_layers, deterministic)
            y = masked_mean(hy, target != PAD)  # [B, D]
            scores = jnp.einsum("bmd,bd->bm", k, self.posterior_proj(jnp.concatenate([x, y], axis=-1)))
            log_q = masked_log_softmax(scores, review_mask)  # [B, M]
            out.update(log_posterior=log_q, posterior=jnp.where(review_mask, jnp.exp(log_q), 0.0))
            if train:
                log_pi = log_q

        w, selected_mask = self._select(log_pi, review_mask, token_mask, train)  # [B, M], [B, Lrev]
        c_rev = jnp.einsum("bm,bmd->bd", w, k)  # [B, D]
        has_reviews = review_mask.any(-1)  # [B]
        g = (jax.nn.sigmoid(self.gate(jnp.concatenate([x, c_rev], axis=-1))[:, 0].astype(jnp.float32))
             if self.use_gate else jnp.ones((b,), jnp.float32))
        g = jnp.where(has_reviews, g, 0.0)  # [B]
        if self.review_memory == "selected":
            hr_read = jnp.einsum("bm,bmld->bld", w.astype(hr.dtype), hr)  # [B, Lrev, D]
            read_mask = selected_mask  # [B, Lrev]
        else:
            hr_read = einops.rearrange(hr, "b m l d -> b (m l) d")  # [B, M Lrev, D]
            read_mask = einops.rearrange(token_mask, "b m l -> b (m l)")
        memory["states"] = jnp.concatenate([h, g[:, None, None].astype(h.dtype) * hr_read], axis=1)  # [B, Ls + Lr, D]
        memory["mask"] = jnp.concatenate([source_mask, read_mask & has_reviews[:, None]], axis=1)
        out.update(gate=g, c_rev=c_rev)
        return memory, out

    def _select(self, log_pi, review_mask, token_mask, train: bool):
        """Review weights w [B, M] and the token mask of the selected review memory [B, Lrev]."""
        if self.review_select == "soft":
            return jnp.where(review_mask, jnp.exp(log_pi), 0.0), token_mask.any(1)
        scores = log_pi
        if train:
            scores = scores + jax.random.gumbel(self.make_rng("dropout"), log_pi.shape, jnp.float32)
        pick = jnp.argmax(jnp.where(review_mask, scores, -jnp.inf), axis=-1)  # [B]
        hard = jax.nn.one_hot(pick, log_pi.shape[-1]) * review_mask  # [B, M], all 0 without reviews
        selected_mask = jnp.einsum("bm,bml->bl", hard, token_mask.astype(jnp.float32)) > 0
        if not train:
            return hard, selected_mask
        soft = jnp.exp(masked_log_softmax(scores / self.gumbel_temperature, review_mask)) * review_mask
        return hard + soft - jax.lax.stop_gradient(soft), selected_mask  # straight-through

    # ------------------------------------------------------------------ decoder

    def _decode(self, memory, tokens, positions, self_mask, cache, index, deterministic):
        """tokens [B, Lq] at positions [Lq] -> (log P [B, Lq, V + max_oov] (V without copy), cache)."""
        tokens = jnp.where(tokens >= self.vocab_size, UNK, tokens)  # copied OOV words are read as unk
        e = self.embed(tokens) * jnp.asarray(math.sqrt(self.width), self.dtype)
        e = self.decoder_norm(e) + self.decoder_positions(positions)[None]  # [B, Lq, D]
        y = self.drop(e, deterministic=deterministic)
        new_cache = {}
        for i, layer in enumerate(self.decoder_layers):
            layer_cache = None if cache is None else cache[f"layer{i}"]
            y, weights, new_cache[f"layer{i}"] = layer(y, memory["states"], memory["mask"], self_mask, layer_cache,
                                                       index, deterministic)
        logits = mask_special_logits(self.embed.attend(y))  # [B, Lq, V]
        cache = new_cache if cache is not None else None
        if not self.use_copy:
            return jax.nn.log_softmax(logits, axis=-1), cache
        attention = weights.mean(axis=1)  # [B, Lq, Lm] last layer, mean over heads
        context = jnp.einsum("bqk,bkd->bqd", attention.astype(self.dtype), memory["states"])  # c_t [B, Lq, D]
        p_gen_logit = self.p_gen(jnp.concatenate([y, context, e], axis=-1))[..., 0]  # [B, Lq]
        source_len = memory["source_ext"].shape[1]
        alpha = attention[..., :source_len]  # [B, Lq, Ls] renormalised over the source positions [R]
        alpha = alpha / jnp.maximum(alpha.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        return copy_mixture(logits, p_gen_logit, alpha, memory["source_ext"], self.vocab_size + self.max_oov), cache

    def _check_length(self, length: int, what: str):
        if length > self.max_positions:
            raise ValueError(f"{what} length {length} exceeds max_positions={self.max_positions}; truncate the "
                             f"inputs or raise max_positions.")


# ----------------------------------------------------------------------------- loss and decoding


def prodgen_loss(outputs, batch, kl_weight=1.0, bow_weight=1.0):
    """L = NLL + kl_weight KL(q || p) + bow_weight BOW (module docstring); kl_weight may be traced
    (annealing). -> (loss, {'nll', 'kl', 'bow', 'tokens'}) float32 scalars.

    NLL labels are target_ext; ids the output cannot hold (>= V without copy) count as unk.
    """
    log_probs = outputs["log_probs"]  # [B, Lt, V']
    labels = batch["target_ext"]
    labels = jnp.where(labels >= log_probs.shape[-1], UNK, labels)
    mask = labels != PAD
    tokens = jnp.sum(mask).astype(jnp.float32)
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]  # [B, Lt]
    nll = -jnp.sum(jnp.where(mask, picked, 0.0)) / jnp.maximum(tokens, 1.0)
    review_mask = (batch["reviews"] != PAD).any(-1)  # [B, M]
    kl = jnp.zeros((), jnp.float32)
    if outputs.get("posterior") is not None:
        kl = jnp.mean(review_kl(outputs["log_posterior"], outputs["log_prior"], review_mask))
    bow = jnp.zeros((), jnp.float32)
    if outputs.get("bow_logits") is not None:
        words = batch["target_out"]  # [B, Lt]
        word_mask = (words != PAD) & (words != UNK) & review_mask.any(-1)[:, None]
        log_bow = jax.nn.log_softmax(outputs["bow_logits"].astype(jnp.float32), axis=-1)  # [B, V]
        picked = jnp.take_along_axis(log_bow, words, axis=-1)  # [B, Lt]
        bow = -jnp.sum(jnp.where(word_mask, picked, 0.0)) / jnp.maximum(jnp.sum(word_mask), 1)
    loss = nll + kl_weight * kl + bow_weight * bow
    return loss, dict(nll=nll, kl=kl, bow=bow, tokens=tokens)


def generate(model: ProductGenerator, variables, batch, *, max_len: int, beam_size: int = 1,
             length_penalty_alpha: float = 0.0, min_len: int = 0, block_ngram: int = 0):
    """Descriptions for `batch` (the target keys are never read): greedy for beam_size 1, else beam
    search (`jdjax.nn.decoding`) over the extended vocabulary. -> extended ids [B, max_len] (end
    included, then pad). Jit it with the keyword arguments static."""
    memory = model.apply(variables, batch, method="encode")
    if beam_size > 1:
        memory = tile_beams(memory, beam_size)
    cache = model.apply(variables, memory, max_len, method="init_cache")

    def step_fn(token, cache, position):  # log P over V + max_oov; decoding's log-softmax keeps it
        return model.apply(variables, memory, token, cache, position, method="decode_step")

    opts = dict(min_len=min_len, block_ngram=block_ngram)
    batch_size = batch["source"].shape[0]
    if beam_size == 1:
        return greedy_decode(step_fn, cache, batch_size, max_len, **opts)[0]
    return beam_search(step_fn, cache, batch_size, beam_size, max_len, length_penalty_alpha=length_penalty_alpha,
                       **opts)[0]

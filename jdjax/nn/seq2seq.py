"""Encoder-decoder generators: ParlAI's `seq2seq` (LSTM + attention) and its XLM-variant Transformer.

Spec `experiments_ads_text.md` P4 "Training schedule" gives the sizes (the defaults here); P3's
copy-mechanism generator reuses the encoder/decoder through the same interface.

Tokens: pad 0, start 1, end 2. A batch holds `context` int32 [B, Lc] (right-padded),
`response_in` [B, Lr] (start + tokens) and `response_out` [B, Lr] (tokens + end), padded with 0;
masks are `!= 0`. Both models share one interface, so losses and decoding are model-agnostic:

    memory = encode(context, deterministic)                                # pytree, batch-leading
    logits = decode(memory, context_mask, response_in, deterministic)      # [B, Lr, V] float32
    logits, aux = decode(..., return_aux=True)   # aux: attention [B, Lr, Lc], hidden [B, Lr, D]
    logits = __call__(context, response_in, deterministic)                 # encode + decode
    cache = init_cache(memory, max_len)                  # LSTM: encoder carry; Transformer: K/V zeros
    logits, cache = decode_step(memory, context_mask, token, cache, position)   # [B, V], cache
    logits, cache, aux = decode_step(..., return_aux=True)                     # aux of this step

`decode_step` at `position` t consumes response_in[:, t] and returns decode's logits at t.
`aux['attention']` is the decoder's attention over the context (Transformer: last layer, mean
over heads), `aux['hidden']` the state the output layer reads: what a copy mechanism needs.
Logits of pad and start are NEG_LOGIT (neither is ever a label; ParlAI masks pad in seq2seq and
start in later Transformer versions).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.attention import Attention, MultiHeadAttention, logical
from jdjax.nn.vit import MlpBlock, layer_norm

Dtype = Any

PAD, START, END = 0, 1, 2
NEG_LOGIT = -1e9  # finite, so log-softmax and its gradient stay finite


def mask_special_logits(logits):
    """[..., V] float32 logits with pad and start set to NEG_LOGIT."""
    special = (jnp.arange(logits.shape[-1]) == PAD) | (jnp.arange(logits.shape[-1]) == START)
    return jnp.where(special, NEG_LOGIT, logits.astype(jnp.float32))


def _uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


# ----------------------------------------------------------------------------- LSTM seq2seq


class GeneralAttention(nn.Module):
    """Luong 'general' attention after the decoder LSTM (ParlAI AttentionLayer, attn_time='post').

        s_tj = (W_a q_t) . m_j  (padded j blocked),   a_t = softmax_j s_t,   c_t = sum_j a_tj m_j,
        out_t = tanh(W_c [q_t; c_t]).

    Parameters: `attn/kernel` [D, Dm], `combine/kernel` [D + Dm, D], no biases.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, memory, mask):
        """query [B, Lq, D], memory [B, Lc, Dm], mask [B, Lc] -> (out [B, Lq, D], weights [B, Lq, Lc] float32)."""
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "mlp")))
        keys = nn.Dense(memory.shape[-1], name="attn", **dense)(query)  # [B, Lq, Dm]
        scores = jnp.einsum("bqd,bkd->bqk", keys, memory).astype(jnp.float32)
        scores = jnp.where(mask[:, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)  # [B, Lq, Lc]
        applied = jnp.einsum("bqk,bkd->bqd", weights.astype(self.dtype), memory)  # [B, Lq, Dm]
        out = nn.Dense(query.shape[-1], name="combine", **dense)(jnp.concatenate([query, applied], axis=-1))
        return jnp.tanh(out), weights


class Seq2SeqLSTM(nn.Module):
    """ParlAI `seq2seq` with `--attention general --attention-time post --lookuptable all`.

    encoder: E(context) -> dropout -> `num_layers` LSTM layers (bidirectional: directions
      concatenated, [B, Lc, 2H]) with dropout between layers, run over the non-pad prefix
      (ParlAI's packed sequences); states at pads are zero. memory = {'states': [B, Lc, Dm],
      'carry': per layer (c, h) [B, H], the directions summed}.
    decoder: E(response_in) -> dropout -> `num_layers` LSTM layers started from memory['carry'],
      dropout between layers -> GeneralAttention over the states (query = top LSTM output of
      the same step) -> o2e Dense(H -> E; identity if H = E) -> dropout -> E^T (+ bias [V]).
    One embedding E [V, E] serves encoder, decoder and output (ParlAI lookuptable 'all').

    Deviations from the released code: its RNNEncoder has packing switched off, so there the
    final carry also runs over the context's padding; here padding never changes the outputs.
    Init: E ~ N(0, 1) and output bias ~ U(+-1/sqrt(V)) as torch; flax defaults for the LSTM.
    Logical axes: kernels (in, out) = ('embed', 'mlp'); o2e ('mlp', 'embed'); E ('vocab', 'embed').

    Attributes:
      vocab_size: V (pad 0, start 1, end 2 included).
      embed_dim: E. hidden: H per direction. num_layers: LSTM layers of encoder and decoder.
      bidirectional: encoder direction(s). dropout: embeddings, between layers, before the output.
    """

    vocab_size: int
    embed_dim: int = 300
    hidden: int = 256
    num_layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                              embedding_init=logical(nn.initializers.normal(1.0), ("vocab", "embed")))

        def lstm():
            return nn.RNN(nn.OptimizedLSTMCell(
                self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "mlp")),
                recurrent_kernel_init=logical(nn.initializers.orthogonal(), ("embed", "mlp")),
                bias_init=logical(nn.initializers.zeros, ("mlp",)),
            ), return_carry=True)

        if self.bidirectional:
            self.encoder_lstm = [nn.Bidirectional(lstm(), lstm(), return_carry=True) for _ in range(self.num_layers)]
        else:
            self.encoder_lstm = [lstm() for _ in range(self.num_layers)]
        self.decoder_lstm = [lstm() for _ in range(self.num_layers)]
        self.attention = GeneralAttention(self.dtype, self.param_dtype)
        if self.hidden != self.embed_dim:
            self.o2e = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=logical(nn.initializers.lecun_normal(), ("mlp", "embed")),
                                bias_init=logical(nn.initializers.zeros, ("embed",)))
        self.out_bias = self.param("out_bias", logical(_uniform(1 / math.sqrt(self.vocab_size)), ("vocab",)),
                                   (self.vocab_size,), self.param_dtype)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, context, response_in, deterministic: bool = True):
        """context [B, Lc], response_in [B, Lr] -> logits [B, Lr, V]."""
        memory = self.encode(context, deterministic)
        return self.decode(memory, context != PAD, response_in, deterministic)

    def encode(self, context, deterministic: bool = True):
        """context [B, Lc] -> {'states': [B, Lc, Dm], 'carry': ((c, h) [B, H] per layer)}."""
        mask = context != PAD  # [B, Lc]
        lengths = mask.sum(axis=1)  # [B]
        x = self.drop(self.embed(context), deterministic=deterministic)  # [B, Lc, E]
        carry = []
        for i, layer in enumerate(self.encoder_lstm):
            if i:
                x = self.drop(x, deterministic=deterministic)
            c, x = layer(x, seq_lengths=lengths)  # x [B, Lc, Dm]
            if self.bidirectional:  # ((c, h) fwd, (c, h) bwd) -> summed over directions
                c = jax.tree.map(jnp.add, c[0], c[1])
            carry.append(c)
        states = jnp.where(mask[..., None], x, 0).astype(self.dtype)
        return {"states": states, "carry": tuple(carry)}

    def decode(self, memory, context_mask, response_in, deterministic: bool = True, return_aux: bool = False):
        """Teacher forcing: response_in [B, Lr] -> logits [B, Lr, V] (and aux if return_aux)."""
        logits, aux, _ = self._decode(memory, context_mask, response_in, memory["carry"], deterministic)
        return (logits, aux) if return_aux else logits

    def init_cache(self, memory, max_len: int):
        """The decoder's per-layer (c, h) [B, H], starting from the encoder's final carry."""
        del max_len  # an LSTM's state does not grow with the length
        return memory["carry"]

    def decode_step(self, memory, context_mask, token, cache, position, return_aux: bool = False):
        """token [B] at `position` -> (logits [B, V], cache) (and aux of this step if return_aux)."""
        del position  # the carry holds the position
        logits, aux, cache = self._decode(memory, context_mask, token[:, None], cache, True)
        aux = jax.tree.map(lambda a: a[:, 0], aux)
        return (logits[:, 0], cache, aux) if return_aux else (logits[:, 0], cache)

    def _decode(self, memory, context_mask, tokens, carry, deterministic):
        """tokens [B, Lq] from per-layer carries -> (logits [B, Lq, V], aux, new carries)."""
        x = self.drop(self.embed(tokens), deterministic=deterministic)  # [B, Lq, E]
        new_carry = []
        for i, layer in enumerate(self.decoder_lstm):
            if i:
                x = self.drop(x, deterministic=deterministic)
            c, x = layer(x, initial_carry=carry[i])  # [B, Lq, H]
            new_carry.append(c)
        hidden, weights = self.attention(x, memory["states"], context_mask)  # [B, Lq, H], [B, Lq, Lc]
        e = self.o2e(hidden) if self.hidden != self.embed_dim else hidden
        e = self.drop(e, deterministic=deterministic)
        logits = self.embed.attend(e) + self.out_bias.astype(self.dtype)  # [B, Lq, V]
        return mask_special_logits(logits), {"attention": weights, "hidden": hidden}, tuple(new_carry)


# ----------------------------------------------------------------------------- Transformer


def _attention_kwargs(m: nn.Module) -> dict:
    return dict(num_heads=m.num_heads, dtype=m.dtype, param_dtype=m.param_dtype, attention_dropout=m.attention_dropout)


# ParlAI initialises q_lin / k_lin / v_lin / out_lin [C, C] with xavier_normal, std sqrt(1 / C);
# on the flattened [C, 3C] fused kernel that is a fan-in normal.
_XAVIER_NORMAL_SQUARE = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class TransformerEncoderLayer(nn.Module):
    """Post-LN (ParlAI 'aiayn' / 'xlm'): x = LN1(x + drop(SelfAttn x)); x = LN2(x + drop(FFN x)); pads zeroed."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    relu_dropout: float = 0.0
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):  # x [B, L, C], mask [B, L] -> [B, L, C]
        drop = nn.Dropout(self.dropout)
        h, _ = MultiHeadAttention(**_attention_kwargs(self), kernel_init=_XAVIER_NORMAL_SQUARE,
                                  out_kernel_init=_XAVIER_NORMAL_SQUARE, name="attn",
                                  )(x, mask=mask[:, None, None, :], deterministic=deterministic)
        x = layer_norm("ln1", self.ln_eps, self.dtype, self.param_dtype)(x + drop(h, deterministic=deterministic))
        h = MlpBlock(self.mlp_dim, self.relu_dropout, self.dtype, self.param_dtype, activation=self.activation,
                     name="mlp")(x, deterministic)
        x = layer_norm("ln2", self.ln_eps, self.dtype, self.param_dtype)(x + drop(h, deterministic=deterministic))
        return x * mask[..., None].astype(x.dtype)


class TransformerDecoderLayer(nn.Module):
    """Post-LN: x = LN1(x + drop(causal SelfAttn x)); x = LN2(x + drop(CrossAttn(x, memory)));
    x = LN3(x + drop(FFN x))."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    relu_dropout: float = 0.0
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, memory, context_mask, self_mask, cache=None, index=None, deterministic: bool = True):
        """x [B, Lq, C], memory [B, Lc, C], context_mask [B, Lc], self_mask broadcastable to
        [B, H, Lq, Lk] -> (x [B, Lq, C], cross weights [B, H, Lq, Lc], cache)."""
        drop = nn.Dropout(self.dropout)
        attn = dict(**_attention_kwargs(self), kernel_init=nn.initializers.xavier_normal(),
                    out_kernel_init=nn.initializers.xavier_normal())
        h, _, cache = Attention(**attn, name="self_attn")(x, mask=self_mask, cache=cache, index=index,
                                                          deterministic=deterministic)
        x = layer_norm("ln1", self.ln_eps, self.dtype, self.param_dtype)(x + drop(h, deterministic=deterministic))
        h, weights, _ = Attention(**attn, name="cross_attn")(x, memory, mask=context_mask[:, None, None, :],
                                                             deterministic=deterministic)
        x = layer_norm("ln2", self.ln_eps, self.dtype, self.param_dtype)(x + drop(h, deterministic=deterministic))
        h = MlpBlock(self.mlp_dim, self.relu_dropout, self.dtype, self.param_dtype, activation=self.activation,
                     name="mlp")(x, deterministic)
        x = layer_norm("ln3", self.ln_eps, self.dtype, self.param_dtype)(x + drop(h, deterministic=deterministic))
        return x, weights, cache


class Seq2SeqTransformer(nn.Module):
    """ParlAI `transformer/generator` with `--variant xlm` (spec P4): post-LN layers, LayerNorm on
    the embeddings, learned positions, tied embeddings.

    encoder: x = E(context) * sqrt(C) + P_enc(pos) -> LN -> dropout -> zero pads -> layers,
      pos = (#non-pad tokens so far) - 1, so padding anywhere leaves the tokens' positions alone.
    decoder: y = LN(E(response_in) * sqrt(C)) + P_dec(0..Lr-1) -> dropout -> layers (ParlAI
      normalises the decoder embeddings before adding positions, the encoder's after).
    logits = y E^T (no bias). memory = {'states': [B, Lc, C]}.
    Encoder self-attention is `MultiHeadAttention` (fused qkv); the decoder's self- and cross-
    attention are `Attention` (separate q/k/v; self-attention cached for `decode_step`, the
    cross-attention keys/values are recomputed from memory every step, as in the Flax WMT example).
    Init as ParlAI: E, P ~ N(0, 1/C), attention xavier-normal, FFN xavier-uniform; zero biases.

    Attributes:
      vocab_size: V. num_layers, width (C), num_heads, mlp_dim: encoder and decoder sizes.
      max_positions: rows of each learned position table (the longest context / response).
      dropout: embeddings and residual branches (ParlAI --dropout, 0.2 in the released params.py).
      attention_dropout: on attention weights. relu_dropout: inside the FFN.
      activation: 'gelu' (exact, ParlAI) or 'relu'. embeddings_scale: multiply E by sqrt(C).
      ln_eps: LayerNorm epsilon.
    """

    vocab_size: int
    num_layers: int = 6
    width: int = 512
    num_heads: int = 8
    mlp_dim: int = 2048
    max_positions: int = 128
    dropout: float = 0.2
    attention_dropout: float = 0.1
    relu_dropout: float = 0.1
    activation: str = "gelu"
    embeddings_scale: bool = True
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads={self.num_heads}.")
        normal = nn.initializers.normal(self.width ** -0.5)
        embed = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = nn.Embed(self.vocab_size, self.width, embedding_init=logical(normal, ("vocab", "embed")), **embed)
        self.encoder_positions = nn.Embed(self.max_positions, self.width,
                                          embedding_init=logical(normal, ("pos", "embed")), **embed)
        self.decoder_positions = nn.Embed(self.max_positions, self.width,
                                          embedding_init=logical(normal, ("pos", "embed")), **embed)
        self.encoder_norm = layer_norm(None, self.ln_eps, self.dtype, self.param_dtype)
        self.decoder_norm = layer_norm(None, self.ln_eps, self.dtype, self.param_dtype)
        layer = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                     attention_dropout=self.attention_dropout, relu_dropout=self.relu_dropout,
                     activation=self.activation, ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder_layers = [TransformerEncoderLayer(**layer) for _ in range(self.num_layers)]
        self.decoder_layers = [TransformerDecoderLayer(**layer) for _ in range(self.num_layers)]
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, context, response_in, deterministic: bool = True):
        """context [B, Lc], response_in [B, Lr] -> logits [B, Lr, V]."""
        memory = self.encode(context, deterministic)
        return self.decode(memory, context != PAD, response_in, deterministic)

    def encode(self, context, deterministic: bool = True):
        """context [B, Lc] -> {'states': [B, Lc, C]} (zero at pads)."""
        self._check_length(context.shape[1], "context")
        mask = context != PAD  # [B, Lc]
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, Lc]
        x = self.encoder_norm(self._embed(context) + self.encoder_positions(positions))
        x = self.drop(x, deterministic=deterministic) * mask[..., None].astype(self.dtype)
        for layer in self.encoder_layers:
            x = layer(x, mask, deterministic)
        return {"states": x}

    def decode(self, memory, context_mask, response_in, deterministic: bool = True, return_aux: bool = False):
        """Teacher forcing: response_in [B, Lr] -> logits [B, Lr, V] (and aux if return_aux)."""
        length = response_in.shape[1]
        self._check_length(length, "response")
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Lr, Lr]
        logits, aux, _ = self._decode(memory, context_mask, response_in, jnp.arange(length), causal, None, None,
                                      deterministic)
        return (logits, aux) if return_aux else logits

    def init_cache(self, memory, max_len: int):
        """Per-layer self-attention {'key', 'value'} zeros [B, max_len, H, Dh]."""
        self._check_length(max_len, "max_len")
        shape = (memory["states"].shape[0], max_len, self.num_heads, self.width // self.num_heads)
        return {f"layer{i}": {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
                for i in range(self.num_layers)}

    def decode_step(self, memory, context_mask, token, cache, position, return_aux: bool = False):
        """token [B] at `position` (int32 scalar) -> (logits [B, V], cache) (and aux if return_aux)."""
        max_len = cache["layer0"]["key"].shape[1]
        position = jnp.asarray(position, jnp.int32)
        self_mask = (jnp.arange(max_len) <= position)[None, None, None, :]  # [1, 1, 1, T]
        logits, aux, cache = self._decode(memory, context_mask, token[:, None], position[None], self_mask, cache,
                                          position, True)
        aux = jax.tree.map(lambda a: a[:, 0], aux)
        return (logits[:, 0], cache, aux) if return_aux else (logits[:, 0], cache)

    def _embed(self, tokens):  # [B, L] -> [B, L, C]
        x = self.embed(tokens)
        return x * jnp.asarray(math.sqrt(self.width), x.dtype) if self.embeddings_scale else x

    def _decode(self, memory, context_mask, tokens, positions, self_mask, cache, index, deterministic):
        """tokens [B, Lq] at positions [Lq] -> (logits [B, Lq, V], aux, cache)."""
        y = self.decoder_norm(self._embed(tokens)) + self.decoder_positions(positions)[None]
        y = self.drop(y, deterministic=deterministic)
        new_cache = {}
        for i, layer in enumerate(self.decoder_layers):
            layer_cache = None if cache is None else cache[f"layer{i}"]
            y, weights, new_cache[f"layer{i}"] = layer(y, memory["states"], context_mask, self_mask, layer_cache,
                                                       index, deterministic)
        logits = mask_special_logits(self.embed.attend(y))  # [B, Lq, V]
        aux = {"attention": weights.mean(axis=1), "hidden": y}  # [B, Lq, Lc], [B, Lq, C]
        return logits, aux, (new_cache if cache is not None else None)

    def _check_length(self, length: int, what: str):
        if length > self.max_positions:
            raise ValueError(f"{what} length {length} exceeds max_positions={self.max_positions}; truncate the "
                             f"inputs or raise max_positions.")

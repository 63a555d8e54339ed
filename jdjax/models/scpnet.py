"""SCPNet (Ding et al., CVPR 2023): multi-label recognition from a single (or partial) positive
label with a structured semantic prior from CLIP (spec `ctr_and_multilabel.md` §4; the official
code, jameslahm/SCPNet, is the reference wherever the spec says [C]).

Structured semantic prior (§4.1), from a relation matrix R [C, C] (cosine similarities of CLIP
text embeddings of the class names, diag 1) and the top-k mask M (row i keeps its own entry and
the k - 1 largest off-diagonal R_ij):

    G_ij = p R_ij M_ij / sum_{l != i} R_il M_il  (j != i),   G_ii = 1 - p     (ML-GCN re-weighting)
    S_ij = M_ij exp(G_ij / T) / sum_l M_il exp(G_il / T)                      (calibration matrix)

S is what the code computes as a row softmax of G / T over the full row, masked to M and
renormalised (the exp(0) of the dropped entries cancels). Rows of G and S sum to 1; diag(G) = 1 - p.

Network (§4.2), C classes, E the joint width, D the text width, n = n_ctx:

    prompt_c = [SOS][ctx_1..ctx_n][name_c tokens]["."][EOS]      ctx [n, D] shared, learned
    t_c      = TextTower(prompt_c)  (frozen CLIP text tower, EOT pooling)     T = [t_c] [C, E]
    z        = G LReLU(G LReLU(G T W1) W2) W3        W1 [E, 2E], W2 [2E, 2E], W3 [2E, E], no bias
    z*       = normalize(z + T)        (use_gcn=False: z* = normalize(T))
    logits   = s normalize(f) z*^T   [B, C]    f = ImageTower(x) [B, E],  s = 10 or exp(logit_scale)

Losses (§4.3), all sums over the batch and the classes, float32, p = sigmoid(logits):

    SPLC      x' = x - m y  (m = 1 on observed positives); from epoch 1 an unobserved entry with
              sigmoid(x') > tau (0.6) becomes a positive y; p_t = (1 - p) y + p (1 - y);
              L_sup = -sum p_t^gamma [y log sigmoid(x') + (1 - y) log sigmoid(-x')]   (gamma = 2,
              focal weight not detached)
    PESSL     sigma_c = #images whose stored pseudo-label vector holds c (memory bank [N, C]),
              beta_c = max(sigma_c / max(max_c sigma_c, k N - sum_c sigma_c), 1 / C),
              tau_c = 0.95 beta_c / (2 - beta_c) (FlexMatch), k = hard_k;
              p^w = sg(sigmoid(x_w)); y_hat = (top-k classes of p^w with p^w >= tau_c) | observed
              positives; m_i = any top-k class of image i reaches its tau_c;
              L_cst  = -sum_i m_i sum_c [y_hat log p^s + (1 - y_hat) log(1 - p^s)]
              L_dstl = -sum_i m_i sum_c [r log p^s + (1 - r) log(1 - p^s)],   r_i = S p^w_i
              (probabilities clamped at 1e-8)
    total     L = L_sup + lambda_u (L_cst + kappa L_dstl),   lambda_u = 0.125

Parameters of `SCPNet`: those of `jdjax.nn.clip.CLIP` under the same names, so a converted CLIP
checkpoint loads (`visual/...`, `text/...`, `logit_scale` [] with scale='clip'), plus
`prompt_ctx` [n, D] and `gcn/{w1 [E, 2E], w2 [2E, 2E], w3 [2E, E]}` (the official gc{1,2,3}.weight,
same [in, out] layout). A BatchNorm image tower keeps its statistics in 'batch_stats'.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdjax.nn.attention import logical
from jdjax.nn.clip import l2_normalize

Dtype = Any
PROB_EPS = 1e-8  # the official clamp of probabilities inside logs


# ----------------------------------------------------------------------------- structured semantic prior


def topk_mask(relation: np.ndarray, topk: int) -> np.ndarray:
    """M [C, C] bool: row i keeps its diagonal entry and its topk - 1 largest off-diagonal entries
    (ties: the lower class index first).

    This is the official torch.topk(R, k) whenever the diagonal is its row's unique maximum (R is a
    cosine-similarity matrix with diag 1); when an off-diagonal entry ties with it, torch.topk's
    choice is unspecified, and here the diagonal is always kept ("self included", spec §4.1).
    """
    r = np.asarray(relation, np.float64)
    c = r.shape[0]
    if r.shape != (c, c):
        raise ValueError(f"the relation matrix must be square [C, C], got {r.shape}.")
    if not 2 <= topk <= c:
        raise ValueError(f"topk={topk} must be in [2, C={c}] (the row's own entry plus at least one neighbour).")
    off = np.where(np.eye(c, dtype=bool), -np.inf, r)  # the diagonal sorts last
    order = np.argsort(-off, axis=1, kind="stable")[:, : topk - 1]  # [C, k - 1]
    mask = np.eye(c, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def adjacency(relation: np.ndarray, topk: int, p: float = 0.2) -> np.ndarray:
    """G [C, C] float32: R kept on the top-k mask, diagonal set to 1 - p, each row's off-diagonal
    entries rescaled to sum p (`reweight_p`). Rows sum to 1.

    relation: R [C, C], non-negative on the kept entries (cosine similarities of class names).
    """
    r = np.asarray(relation, np.float64)
    mask = topk_mask(r, topk) & ~np.eye(r.shape[0], dtype=bool)
    kept = np.where(mask, r, 0.0)  # [C, C] off-diagonal neighbours
    total = kept.sum(axis=1, keepdims=True)  # [C, 1]
    if np.any(total <= 0):
        raise ValueError("a row of the relation matrix has no positive weight on its top-k neighbours; "
                         "R must hold non-negative similarities (cosines of class-name embeddings).")
    g = p * kept / total
    np.fill_diagonal(g, 1.0 - p)
    return g.astype(np.float32)


def calibration(adj: np.ndarray, topk: int, temperature: float) -> np.ndarray:
    """S [C, C] float32: S_ij = M_ij exp(G_ij / T) / sum_l M_il exp(G_il / T), the softmax of G / T over
    the kept entries (module docstring). M = topk_mask(G, topk): G's diagonal (1 - p) and its k - 1
    positive off-diagonal entries, i.e. the same mask G was built with (requires p < 1/2)."""
    g = np.asarray(adj, np.float64)
    mask = topk_mask(g, topk)
    logits = np.where(mask, g / temperature, -np.inf)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))  # [C, C], 0 outside the mask
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def text_relation(text_features: np.ndarray) -> np.ndarray:
    """R [C, C] float32: cosine similarities of class text embeddings [C, E], diagonal exactly 1.

    The official relation files are such a matrix; the prompt template and the CLIP variant that
    produced them are not released (RN50 text tower inferred from the sibling HSPNet) [R].
    """
    t = np.asarray(text_features, np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    r = t @ t.T
    np.fill_diagonal(r, 1.0)
    return r.astype(np.float32)


def prior_report(relation: np.ndarray, topk: int, p: float, temperature: float) -> dict:
    """Summary of the prior built from R, to check against the golden values of spec §4.1:
    {'s_diag_mean': mean diag(S) (0.4224 VOC k=20 T=0.3, 0.4682 COCO k=62 T=0.2, 0.5219 NUS
    k=50 T=0.2, 0.0441 CUB k=312 T=0.3, on the official relation files, p = 0.2),
    's_offdiag_max': max off-diagonal S (0.0305 / 0.0087 / 0.0098 / 0.0031), 'g_diag': 1 - p,
    'g_row_sum_err', 's_row_sum_err': max |row sum - 1|}."""
    g = adjacency(relation, topk, p)
    s = calibration(g, topk, temperature).astype(np.float64)
    off = ~np.eye(s.shape[0], dtype=bool)
    return {
        "s_diag_mean": float(np.diag(s).mean()),
        "s_offdiag_max": float(s[off].max()),
        "g_diag": float(np.diag(g).mean()),
        "g_row_sum_err": float(np.abs(g.astype(np.float64).sum(1) - 1).max()),
        "s_row_sum_err": float(np.abs(s.sum(1) - 1).max()),
    }


# ----------------------------------------------------------------------------- prompts and model


def class_prompts(tokenizer, class_names, ctx_init: str = "a photo of a", n_ctx: int = 4,
                  context_length: int = 77) -> np.ndarray:
    """Token ids [C, context_length] of "{ctx_init} {name}." for each class (underscores in the
    names become spaces, as in the official code): SOT, the n_ctx context tokens, the name, ".",
    EOT, padding. `tokenizer`: a jdjax.data.clip_tokenizer.CLIPTokenizer (encode, tokenize).
    SCPNet learns the context tokens (positions 1..n_ctx) starting from their embeddings."""
    got = len(tokenizer.encode(ctx_init))
    if got != n_ctx:
        raise ValueError(f"ctx_init {ctx_init!r} is {got} tokens but n_ctx={n_ctx}; choose words of one token "
                         "each (the official 'a photo of a' is 4) or set n_ctx to match.")
    names = [str(n).replace("_", " ") for n in class_names]
    return tokenizer.tokenize([f"{ctx_init} {n}." for n in names], context_length, truncate=False)


def init_prompt_context(params: dict, prompt_ids: np.ndarray, n_ctx: int = 4) -> dict:
    """`params` with prompt_ctx [n_ctx, D] reset to the text tower's token embeddings of the context
    words (prompt_ids[0, 1:1 + n_ctx]). SCPNet.init does this with the fresh table; call it again
    after loading pretrained CLIP weights (e.g. in the task's load_pretrained) so the context starts
    from the pretrained embeddings of "a photo of a"."""
    ctx = _context_rows(params["text"]["token_embedding"]["embedding"], prompt_ids, n_ctx)
    return {**params, "prompt_ctx": ctx.astype(params["prompt_ctx"].dtype)}


def _context_rows(table, prompt_ids, n_ctx: int):
    """table [V, D] (NumPy or jnp) -> its rows of the context tokens, [n_ctx, D]."""
    return table[np.asarray(prompt_ids)[0, 1 : 1 + n_ctx]]


def _uniform(limit: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class SemanticGCN(nn.Module):
    """Three graph convolutions, z = G LReLU(G LReLU(G T W1) W2) W3 (no bias, LeakyReLU slope 0.2),
    E -> hidden -> hidden -> E, weights [in, out] ~ U(+-1 / sqrt(out)) (the official init).

    Attributes: hidden (None = 2 E), negative_slope, center ([R] subtract the output's mean over
    classes), param_dtype. Computes in float32.
    """

    hidden: int | None = None
    negative_slope: float = 0.2
    center: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, adj):
        """t [C, E] class embeddings, adj G [C, C] -> z [C, E] float32."""
        e = t.shape[-1]
        h = self.hidden or 2 * e
        dims = [(e, h, ("embed", "mlp")), (h, h, ("mlp", None)), (h, e, (None, "embed"))]
        x, g = t.astype(jnp.float32), jnp.asarray(adj, jnp.float32)
        for i, (d_in, d_out, axes) in enumerate(dims):
            w = self.param(f"w{i + 1}", logical(_uniform(1.0 / math.sqrt(d_out)), axes), (d_in, d_out),
                           self.param_dtype)
            x = g @ (x @ w.astype(jnp.float32))  # [C, d_out]
            if i < 2:
                x = nn.leaky_relu(x, self.negative_slope)
        if self.center:
            x = x - jnp.mean(x, axis=0, keepdims=True)
        return x


class SCPNet(nn.Module):
    """Image tower, prompted frozen text tower, semantic-association GCN, cosine logits.

    Attributes:
      visual: the image tower, images [B, H, W, 3] -> [B, E], called with `train` (CLIP's
        ModifiedResNet or CLIPVisionTower; BatchNorm statistics in 'batch_stats').
      text: the CLIP text tower (jdjax.nn.clip.CLIPTextTower); frozen by the task's `trainable`
        (only prompt_ctx learns through it), always run deterministic.
      prompt_ids: [C, T] int token ids of "{ctx_init} {name}." (`class_prompts`): the positions
        1..n_ctx are replaced by the learned context.
      adjacency: G [C, C] (`adjacency`), a constant of the model, not a parameter.
      n_ctx: number of learned context vectors (4).
      scale: the logit scale s: a number (10: COCO, VOC, CUB) or 'clip' (exp of the learned
        CLIP `logit_scale`, NUS-WIDE).
      use_gcn: False gives the "no GCN" ablation, z* = normalize(T).
      gcn_hidden: the GCN width (None = 2 E).
      gcn_center: [R] subtract the GCN output's mean over classes before the residual, so that the
        GCN cannot shift every class embedding alike (not in the paper or the code; off there).
      param_dtype: of prompt_ctx, the GCN weights and logit_scale.
    """

    visual: nn.Module
    text: nn.Module
    prompt_ids: Any
    adjacency: Any
    n_ctx: int = 4
    scale: float | str = 10.0
    use_gcn: bool = True
    gcn_hidden: int | None = None
    gcn_center: bool = False
    param_dtype: Dtype = jnp.float32

    def setup(self):
        ids = np.asarray(self.prompt_ids)
        c = ids.shape[0]
        if np.asarray(self.adjacency).shape != (c, c):
            raise ValueError(f"adjacency has shape {np.asarray(self.adjacency).shape} but there are {c} class "
                             f"prompts; build it with adjacency(R, topk) from the [{c}, {c}] relation matrix.")
        ctx_ids = ids[:, 1 : 1 + self.n_ctx]
        if not np.all(ctx_ids == ctx_ids[:1]):
            raise ValueError("the class prompts do not share their context tokens at positions 1..n_ctx; build "
                             "them with class_prompts(tokenizer, names, ctx_init, n_ctx).")

        def init_ctx(_, shape, dtype):
            self.text(jnp.asarray(ids[:1]))  # creates the tower's parameters, the token table among them
            return _context_rows(self._table_params()["token_embedding"]["embedding"], ids, self.n_ctx).astype(dtype)

        width = self.text.width
        self.prompt_ctx = self.param("prompt_ctx", logical(init_ctx, (None, "embed")), (self.n_ctx, width),
                                     self.param_dtype)
        if self.use_gcn:
            self.gcn = SemanticGCN(hidden=self.gcn_hidden, center=self.gcn_center, param_dtype=self.param_dtype)
        if self.scale == "clip":
            self.logit_scale = self.param("logit_scale", logical(nn.initializers.constant(math.log(1 / 0.07)), ()),
                                          (), self.param_dtype)
        elif isinstance(self.scale, str):
            raise ValueError(f"scale must be a number or 'clip', got {self.scale!r}.")

    def _table_params(self) -> dict:
        return nn.meta.unbox(self.text.variables["params"])

    def text_features(self):
        """T [C, E] float32: the prompts through the text tower, the context vectors in place of the
        context tokens; the other token embeddings are constants (no gradient into the table)."""
        ids = jnp.asarray(self.prompt_ids)
        table = jax.lax.stop_gradient(jnp.asarray(self._table_params()["token_embedding"]["embedding"]))  # [V, D]
        tokens = table[ids]  # [C, T, D]
        ctx = jnp.broadcast_to(self.prompt_ctx.astype(tokens.dtype), (ids.shape[0], self.n_ctx, tokens.shape[-1]))
        embeddings = tokens.at[:, 1 : 1 + self.n_ctx].set(ctx)
        return self.text(ids, train=False, embeddings=embeddings)

    def class_embeddings(self):
        """z* [C, E] float32, unit rows: normalize(GCN(T) + T), or normalize(T) without the GCN."""
        t = self.text_features()
        if not self.use_gcn:
            return l2_normalize(t)
        return l2_normalize(self.gcn(t, self.adjacency) + t)

    def logit_scale_value(self):
        """s: the fixed scale, or exp(logit_scale) with scale='clip' (float32 scalar)."""
        if self.scale == "clip":
            return jnp.exp(self.logit_scale.astype(jnp.float32))
        return jnp.float32(self.scale)

    def __call__(self, images, train: bool = False, gcn_grad=None):
        """images [B, H, W, 3] -> logits [B, C] = s normalize(f) z*^T (float32).

        `train` reaches the image tower only (BatchNorm batch statistics); the official run keeps it
        False through epoch 0 (CLIP's build_model returns an eval-mode model; train() is first called
        after the first validation) and True from epoch 1. `gcn_grad` [B, C] bool (None = all True):
        where False, the logit's value is the same but its gradient does not reach the GCN (it
        still reaches the image tower and the prompt)."""
        f = l2_normalize(self.visual(images, train=train))  # [B, E]
        s = self.logit_scale_value()
        if gcn_grad is None or not self.use_gcn:
            return s * f @ self.class_embeddings().T
        t = self.text_features()
        z = self.gcn(t, self.adjacency)
        through = s * f @ l2_normalize(z + t).T
        around = s * f @ l2_normalize(jax.lax.stop_gradient(z) + t).T
        return jnp.where(gcn_grad, through, around)


# ----------------------------------------------------------------------------- losses


def splc_loss(logits, annotations, use_splc, margin: float = 1.0, tau: float = 0.6, gamma: float = 2.0,
              known_only: bool = False):
    """SPLC with the focal margin loss (module docstring), summed: a float32 scalar.

    Args:
      logits: [B, C].
      annotations: [B, C] 1 = observed positive, 0 = unobserved, -1 = known negative (partial labels).
      use_splc: bool, or a traced bool (epoch >= 1): relabel unobserved entries with
        sigmoid(logit) > tau as positives.
      known_only: the partial-label protocol: sum over known entries (annotation != 0) only, so the
        SPLC relabelling, which only touches unobserved entries, has no effect there [R: the
        paper's partial-label loss is not in the released code]. Otherwise unobserved entries are
        negatives ("assume negative"), the SPML setting of the code.
    """
    x = logits.astype(jnp.float32)
    positive = annotations == 1
    x = jnp.where(positive, x - margin, x)
    p = jax.nn.sigmoid(x)
    relabel = jnp.logical_and(use_splc, (annotations == 0) & (p > tau))
    y = (positive | relabel).astype(jnp.float32)
    focal = ((1 - p) * y + p * (1 - y)) ** gamma  # not detached, as in the code
    loss = -(y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x)) * focal
    if known_only:
        loss = jnp.where(annotations != 0, loss, 0.0)
    return jnp.sum(loss)


def pessl_state_update(bank, indices, pseudo):
    """Memory bank [N, C] with the rows `indices` [B] set to the pseudo-label vectors [B, C] of the
    images that have at least one label (others keep their row). Indices within a batch are unique
    (one epoch's permutation); the bank keeps its dtype (bool / int8)."""
    pseudo = pseudo.astype(bank.dtype)
    keep = jnp.any(pseudo != 0, axis=-1, keepdims=True)  # [B, 1]
    return bank.at[indices].set(jnp.where(keep, pseudo, bank[indices]))


def class_thresholds(bank, hard_k: int):
    """tau [C] float32 in (0, 0.95]: tau_c = 0.95 beta_c / (2 - beta_c), beta_c = max(sigma_c /
    max(max_c sigma_c, k N - sum_c sigma_c), 1 / C), sigma_c = images whose stored vector holds c
    (bank [N, C]). An empty bank gives beta = 1 / C, the official initial value."""
    n, c = bank.shape
    sigma = jnp.sum(bank != 0, axis=0, dtype=jnp.int32).astype(jnp.float32)  # [C]
    den = jnp.maximum(jnp.max(sigma), hard_k * n - jnp.sum(sigma))
    beta = jnp.maximum(sigma / den, 1.0 / c)
    return 0.95 * beta / (2.0 - beta)


def pseudo_labels(p_w, tau, observed, hard_k: int):
    """(y_hat [B, C] float32, mask [B] bool) from the weak-view probabilities p_w [B, C] (detached
    here), tau [C] and observed positives (observed [B, C], > 0 = positive):
    y_hat = (top-k classes with p_w >= tau_c) | observed; mask = any top-k class reaches its tau_c.
    Ties among the top k: the lower class index first."""
    p = jax.lax.stop_gradient(p_w.astype(jnp.float32))
    top_p, top_i = jax.lax.top_k(p, hard_k)  # [B, k]
    hit = top_p >= tau[top_i]  # [B, k]
    chosen = jnp.zeros(p.shape, bool).at[jnp.arange(p.shape[0])[:, None], top_i].set(hit)
    return (chosen | (observed > 0)).astype(jnp.float32), jnp.any(hit, axis=-1)


def _masked_bce_sum(p_s, target, mask):
    """-sum_i m_i sum_c [t log max(p, eps) + (1 - t) log max(1 - p, eps)]."""
    p = p_s.astype(jnp.float32)
    ll = target * jnp.log(jnp.maximum(p, PROB_EPS)) + (1 - target) * jnp.log(jnp.maximum(1 - p, PROB_EPS))
    return -jnp.sum(ll * mask.astype(jnp.float32)[:, None])


def consistency_loss(p_s, y_hat, mask):
    """L_cst (float32 scalar): the strong view's probabilities p_s [B, C] against the pseudo labels
    y_hat [B, C] on the images with mask [B]."""
    return _masked_bce_sum(p_s, y_hat.astype(jnp.float32), mask)


def calibrated_targets(p_w, calib):
    """r [B, C] = sg(p_w) S^T (r_i = S p^w_i; rows of S sum to 1, so r is in [0, 1])."""
    return jax.lax.stop_gradient(p_w.astype(jnp.float32)) @ jnp.asarray(calib, jnp.float32).T


def distill_loss(p_s, r, mask):
    """L_dstl (float32 scalar): p_s [B, C] against the calibrated soft targets r [B, C] on mask [B]."""
    return _masked_bce_sum(p_s, r.astype(jnp.float32), mask)


def scpnet_loss(logits_lb, logits_w, logits_s, annotations, tau, calib, *, use_splc, hard_k: int, kappa: float,
                lambda_u: float = 0.125, known_only: bool = False):
    """L = L_sup + lambda_u (L_cst + kappa L_dstl) on the three views of the same B images.

    Args:
      logits_lb, logits_w, logits_s: [B, C] logits of the weak (labelled), second weak and strong
        views (one forward over the concatenated 3B batch, as the code does: BatchNorm sees all).
      annotations: [B, C] in {1, 0, -1} (see splc_loss); observed positives join the pseudo labels
        (known negatives are not removed from them: the partial-label variant is not in the code [R]).
      tau: [C] class_thresholds of the memory bank before this step; calib: S [C, C].
      use_splc, known_only: see splc_loss; hard_k: top-k of the pseudo labels; kappa: `kl_lambda`.

    Returns:
      (L, aux): aux = {'sup', 'cst', 'dstl' (scalars), 'pseudo_labels' [B, C] (store them with
      pessl_state_update), 'mask' [B]}.
    """
    sup = splc_loss(logits_lb, annotations, use_splc, known_only=known_only)
    p_w = jax.lax.stop_gradient(jax.nn.sigmoid(logits_w.astype(jnp.float32)))
    p_s = jax.nn.sigmoid(logits_s.astype(jnp.float32))
    y_hat, mask = pseudo_labels(p_w, tau, annotations, hard_k)
    cst = consistency_loss(p_s, y_hat, mask)
    dstl = distill_loss(p_s, calibrated_targets(p_w, calib), mask)
    total = sup + lambda_u * (cst + kappa * dstl)
    return total, {"sup": sup, "cst": cst, "dstl": dstl, "pseudo_labels": y_hat, "mask": mask}

"""TempMe kernels and plan against a plain NumPy reference and the spec's tables (§2.1, §2.2, §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.merging import flops, tempme, tome
from jdjax.merging.tempme import TemporalConfig

RELEASED_B32 = TemporalConfig(12, 2, (8, 9, 10), (2, 2, 3), 0.30, 0.10)
B16_R = TemporalConfig(12, 10, (8, 9, 10), (2, 2, 3), 0.40, 0.20)  # [R] reconstructed (spec §2.2)


# ----------------------------------------------------------------------------- NumPy reference


def ref_merge(x, metric, size, r, k):
    """One example: x [N, C], metric [N, D], size [N] -> (x' [N - r, C], size' [N - r]), written from
    the spec's words: drop the k class tokens, alternate the patches with the full sequence's
    parity, cosine scores, the r best A tokens merge (size-weighted) into their best B partner,
    output [CLS, kept A ascending, B]."""
    n = len(x)
    r = min(r, (n - k) // 2)
    pos = list(range(k, n))  # patch positions in the full sequence
    a_pos = [p for p in pos if p % 2 == 0]  # ToMe's full-sequence alternation: A = even positions
    b_pos = [p for p in pos if p % 2 == 1]
    unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    best = []
    for pa in a_pos:
        scores = [float(unit[pa] @ unit[pb]) for pb in b_pos]
        best.append((max(scores), int(np.argmax(scores))))
    order = sorted(range(len(a_pos)), key=lambda i: -best[i][0])  # stable
    src, kept = order[:r], sorted(order[r:])
    xs, ss = x * size[:, None], size.astype(float).copy()
    bx, bs = xs[b_pos].copy(), ss[b_pos].copy()
    for i in src:
        j = best[i][1]
        bx[j] += xs[a_pos[i]]
        bs[j] += ss[a_pos[i]]
    kx, ks = xs[[a_pos[i] for i in kept]], ss[[a_pos[i] for i in kept]]
    out_s = np.concatenate([ss[:k], ks, bs])
    out_x = np.concatenate([xs[:k], kx, bx]) / out_s[:, None]
    return out_x, out_s


@pytest.mark.parametrize("k,n,r", [(1, 11, 3), (2, 12, 4), (3, 15, 5), (4, 20, 8), (12, 40, 14), (2, 9, 10)])
def test_merge_matches_numpy_reference(k, n, r):
    rng = np.random.default_rng(k * 100 + n)
    x = rng.normal(size=(3, n, 5)).astype(np.float32)
    metric = rng.normal(size=(3, n, 4)).astype(np.float32)
    size = rng.integers(1, 4, size=(3, n, 1)).astype(np.float32)
    out, out_size = tempme.merge_tokens(jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size), r, k)
    for b in range(3):
        ref_x, ref_s = ref_merge(x[b].astype(np.float64), metric[b].astype(np.float64), size[b, :, 0], r, k)
        np.testing.assert_allclose(np.asarray(out[b]), ref_x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out_size[b, :, 0]), ref_s)


def test_one_class_token_is_tome():
    """ImgMe on a frame (k = 1) is ToMe with a class token, exactly."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 50, 16)), jnp.float32)
    metric = jnp.asarray(rng.normal(size=(4, 50, 8)), jnp.float32)
    ours = tempme.merge_tokens(x, metric, None, 2, 1)
    theirs = tome.merge_tokens(x, metric, None, 2, class_token=True)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mass_and_identical_tokens():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 30, 6)), jnp.float32)
    size = jnp.asarray(rng.integers(1, 5, size=(2, 30, 1)), jnp.float32)
    out, out_size = tempme.merge_tokens(x, x, size, 9, 4)
    np.testing.assert_allclose(np.asarray(out_size.sum(1)), np.asarray(size.sum(1)))
    np.testing.assert_allclose(np.asarray((out * out_size).sum(1)), np.asarray((x * size).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out[:, :4]), np.asarray(x[:, :4]), rtol=1e-6)  # class tokens kept
    v = jnp.broadcast_to(jnp.arange(6.0), (1, 20, 6))
    same, _ = tempme.merge_tokens(v, v + 1.0, None, 6, 2)
    np.testing.assert_allclose(np.asarray(same), np.broadcast_to(np.arange(6.0), (1, 14, 6)), rtol=1e-6)


def test_no_gradient_through_the_matching():
    x = jax.random.normal(jax.random.key(0), (1, 12, 4))
    grad = jax.grad(lambda m: tempme.merge_tokens(x, m, None, 3, 2)[0].sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_group_clips_layout():
    # 2 videos x 4 clips, each clip [cls, p1, p2] with values video*100 + clip*10 + token
    x = np.array([[[v * 100 + f * 10 + t] for t in range(3)] for v in range(2) for f in range(4)], np.float32)
    out = np.asarray(tempme.group_clips(jnp.asarray(x), 2, 1))[..., 0]
    assert out.shape == (4, 6)
    np.testing.assert_array_equal(out[0], [0, 10, 1, 2, 11, 12])  # both CLS first, then each member's patches
    np.testing.assert_array_equal(out[3], [120, 130, 121, 122, 131, 132])
    again = np.asarray(tempme.group_clips(jnp.asarray(out[..., None]), 2, 2))[..., 0]
    np.testing.assert_array_equal(again[1], [100, 110, 120, 130, 101, 102, 111, 112, 121, 122, 131, 132])
    with pytest.raises(ValueError, match="do not group"):
        tempme.group_clips(jnp.asarray(x[:6]), 4, 1)


# ----------------------------------------------------------------------------- plan and MACs


def test_released_b32_plan_is_the_spec_table():
    plan = tempme.plan_layers(RELEASED_B32, 50, 12)
    table = [(p.clips, p.tokens_attn, p.tokens_out) for p in plan]
    imgme = [(12, n, n - 2) for n in range(50, 34, -2)]
    assert table == imgme + [(6, 48, 44), (3, 62, 56), (1, 118, 107), (1, 107, 97)]
    assert [(p.cross_r, p.intra_r) for p in plan[8:]] == [(20, 4), (26, 6), (50, 11), (0, 10)]
    assert [p.num_cls for p in plan] == [1] * 8 + [2, 4, 12, 12]
    assert [p.kind for p in plan] == ["imgme"] * 8 + ["clipme"] * 3 + ["intra"]
    assert tempme.output_shape(plan) == (1, 97)


def test_b16_plans():
    assert tempme.output_shape(tempme.plan_layers(B16_R, 197, 12)) == (1, 127)
    released_ratios = TemporalConfig(12, 10, (8, 9, 10), (2, 2, 3), 0.30, 0.10)
    assert tempme.output_shape(tempme.plan_layers(released_ratios, 197, 12)) == (1, 321)  # spec: no match


@pytest.mark.parametrize("temporal,n0,patch,gmacs", [
    (TemporalConfig(12), 50, 32, 52.90),
    (RELEASED_B32, 50, 32, 34.70),
    (B16_R, 197, 16, 121.1),
    (TemporalConfig(12, 10, (8, 9, 10), (2, 2, 3), 0.30, 0.10), 197, 16, 127.4),
])
def test_visual_gmacs(temporal, n0, patch, gmacs):
    plan = tempme.plan_layers(temporal, n0, 12)
    macs = flops.video_macs(plan, image_size=224, patch_size=patch, width=768, num_heads=12, mlp_dim=3072,
                            num_frames=12)
    assert round(macs.gmacs, 2 if gmacs < 100 else 1) == gmacs
    assert macs.token_counts[-1] == tempme.output_shape(plan)[1]


def test_dense_video_macs_equal_twelve_images():
    plan = tempme.plan_layers(TemporalConfig(12), 50, 12)
    video = flops.video_macs(plan, image_size=224, patch_size=32, width=768, num_heads=12, mlp_dim=3072,
                             num_frames=12)
    image = flops.vit_macs(image_size=224, patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072)
    assert video.total == 12 * image.total and video.matching == 0


def test_config_errors():
    with pytest.raises(ValueError, match="does not divide"):
        TemporalConfig(12, 2, (8, 9), (5, 2), 0.3, 0.1)
    with pytest.raises(ValueError, match="same length"):
        TemporalConfig(12, 2, (8, 9), (2,), 0.3, 0.1)
    with pytest.raises(ValueError, match="ascending"):
        TemporalConfig(12, 2, (9, 8), (2, 2), 0.3, 0.1)
    with pytest.raises(ValueError, match="beyond"):
        tempme.plan_layers(RELEASED_B32, 50, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        TemporalConfig(12, 2, (8,), (2,), 1.5, 0.1)

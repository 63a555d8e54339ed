"""Merge schedules against the spec's tables (§1.4, §3.1, §5.7)."""

import pytest

from jdjax.merging.schedules import PerLayer, clamp_schedule, parse_r, token_counts

VIT_B_HIGH = [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]
VIT_L_HIGH = [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1]


def test_parse_r_int_is_constant():
    assert parse_r(16, 12) == [16] * 12
    assert parse_r(0, 3) == [0, 0, 0]


def test_parse_r_decreasing_tuple():
    assert parse_r((16, -1), 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r((16, 0), 12) == [16] * 12
    assert parse_r((16, 0.0), 4) == [16] * 4


def test_parse_r_list_is_zero_padded():
    assert parse_r([5, 4], 4) == [5, 4, 0, 0]
    assert parse_r(VIT_B_HIGH, 12) == VIT_B_HIGH


def test_per_layer_is_a_list_never_a_tome_tuple():
    assert parse_r(PerLayer([16, 0]), 4) == [16, 0, 0, 0]
    assert parse_r((16, 0), 4) == [16] * 4
    assert PerLayer([16, 0]) != (16, 0) and (16, 0) != PerLayer([16, 0]) and PerLayer([16, 0]) == PerLayer((16, 0))
    assert len({PerLayer([16, 0]), (16, 0)}) == 2 and repr(PerLayer([3])) == "PerLayer([3])"
    assert list(PerLayer([3, 2])) == [3, 2] and PerLayer([3, 2])[1] == 2
    with pytest.raises(ValueError, match="non-negative ints"):
        parse_r(PerLayer([16, -1]), 4)


@pytest.mark.parametrize(
    "r, num_layers, message",
    [
        ([1] * 13, 12, "13 entries but the model has 12 layers"),
        ([3, -1], 12, "non-negative ints"),
        ([3, 1.5], 12, "non-negative ints"),
        (-2, 12, "non-negative ints"),
        (True, 12, "must be an int, a tuple"),
        (2.0, 12, "must be an int, a tuple"),
        ("16", 12, "must be an int, a tuple"),
        ((16,), 12, r"\(r: int, inflect: float\)"),
        ((16, -1), 1, "at least 2 layers"),
        ((4, 3.0), 12, "negative r values"),
        (16, 0, "num_layers must be a positive int"),
    ],
)
def test_parse_r_rejects_bad_input(r, num_layers, message):
    with pytest.raises(ValueError, match=message):
        parse_r(r, num_layers)


def test_vit_b_constant_r16_clamps_last_layer():
    schedule = parse_r(16, 12)
    assert clamp_schedule(schedule, 197) == [16] * 11 + [10]
    assert token_counts(schedule, 197) == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]


def test_clamp_by_hand():
    # 10 tokens, 1 protected: min(8, 9 // 2) = 4 -> 6; min(8, 5 // 2) = 2 -> 4; min(8, 3 // 2) = 1 -> 3.
    assert clamp_schedule([8, 8, 8], 10) == [4, 2, 1]
    assert token_counts([8, 8, 8], 10) == [6, 4, 3]
    # 2 protected: min(8, 8 // 2) = 4 -> 6; min(8, 4 // 2) = 2 -> 4; min(8, 2 // 2) = 1 -> 3.
    assert clamp_schedule([8, 8, 8], 10, protected=2) == [4, 2, 1]
    assert clamp_schedule([8, 8, 8], 9, protected=2) == [3, 2, 1]


@pytest.mark.parametrize(
    "schedule, num_tokens, protected, final",
    [
        (VIT_B_HIGH, 197, 1, 5),  # PYRA ViT-B/16 high
        ([8] * 23 + [6], 197, 1, 7),  # PYRA ViT-L/16 low
        (VIT_L_HIGH, 197, 1, 5),  # PYRA ViT-L/16 high
        ([16] * 6 + [10] * 6, 198, 2, 42),  # PYRA DeiT-B distilled low
        (VIT_B_HIGH, 198, 2, 6),  # PYRA DeiT-B distilled high
    ],
)
def test_pyra_schedules_reach_the_spec_counts_without_clamping(schedule, num_tokens, protected, final):
    assert clamp_schedule(schedule, num_tokens, protected) == schedule
    assert token_counts(schedule, num_tokens, protected)[-1] == final


def test_pyra_vit_b_high_token_table():
    assert token_counts(VIT_B_HIGH, 197) == [157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]


def test_clamp_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative ints"):
        clamp_schedule([2, -1], 10)
    with pytest.raises(ValueError, match="num_tokens must be an int >= protected"):
        clamp_schedule([2], 1, protected=2)
    with pytest.raises(ValueError, match="protected must be a non-negative int"):
        token_counts([2], 10, protected=-1)

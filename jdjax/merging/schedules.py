"""Per-layer merge schedules (spec `vision_token_merging.md` §1.4, §3.1).

A schedule is a list of L non-negative ints, r_l = tokens removed by layer l. Layers are
clamped by the 50% rule: layer l removes at most (N_l - protected) // 2 tokens.
"""

from collections.abc import Sequence
from numbers import Integral, Real

# PYRA's released per-layer schedules (spec §3.1; `pyra_r` equals ToMe's r per layer), by
# (model, compression). None of them hits the 50% clamp at 224 px, which PYRA needs: W_r has one
# row per merged pair. ViT-B/16 high ends at 5 tokens, ViT-L/16 high at 5, DeiT-B low at 42.
PAPER_SCHEDULES = {
    ("B/16", "low"): [16] * 11 + [10],
    ("B/16", "high"): [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    ("L/16", "low"): [8] * 23 + [6],
    ("L/16", "high"): [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
    # [R] The spec lists no ViT-S schedule; ViT-S/16 has ViT-B/16's 197 tokens and 12 layers, so it
    # takes the B schedules (the paper's "low"/"high" are defined by the token budget).
    ("S/16", "low"): [16] * 11 + [10],
    ("S/16", "high"): [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    ("DeiT-B/16", "low"): [16] * 6 + [10] * 6,
    ("DeiT-B/16", "high"): [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
}


class PerLayer(tuple):
    """A per-layer schedule [r_0, r_1, ...] as a hashable value that is never mistaken for ToMe's
    (r, inflect) tuple: `parse_r` reads it as a list, and it equals (and hashes like) only another
    PerLayer, so PerLayer([16, 0]) != (16, 0). `MergeConfig` stores a list schedule this way."""

    __slots__ = ()

    def __eq__(self, other):
        return type(other) is PerLayer and tuple.__eq__(self, other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((PerLayer, tuple(self)))

    def __repr__(self):
        return f"PerLayer({list(self)})"


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_schedule(schedule: Sequence[int]) -> list[int]:
    bad = [v for v in schedule if not _is_int(v) or v < 0]
    if bad:
        raise ValueError(f"a merge schedule holds non-negative ints, got {list(schedule)} (bad entries {bad}).")
    return [int(v) for v in schedule]


def parse_r(r: int | tuple[int, float] | list[int], num_layers: int) -> list[int]:
    """Expands a schedule spec into one r per layer.

    Args:
      r: an int (the same r in every layer); a tuple (r, inflect) (ToMe's "decreasing"
        schedule: min = int(r(1 - inflect)), max = 2r - min, r_l = int(min + l(max - min)/(L - 1)),
        e.g. (16, -1) over 12 layers gives [32, 29, ..., 2, 0] and (16, 0) gives 16 in every
        layer); or a list (or `PerLayer`) of at most L ints, zero-padded to L.
      num_layers: L.

    Returns:
      [r_0, ..., r_{L-1}], before the 50% clamp.
    """
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}.")
    if _is_int(r):
        return _check_schedule([r] * num_layers)
    if isinstance(r, PerLayer):
        r = list(r)
    if isinstance(r, tuple):
        if len(r) != 2 or not _is_int(r[0]) or isinstance(r[1], bool) or not isinstance(r[1], Real):
            raise ValueError(f"a tuple schedule is (r: int, inflect: float), got {r!r}.")
        if num_layers < 2:
            raise ValueError(
                f"a tuple schedule {r!r} needs at least 2 layers, got num_layers={num_layers}; use an int."
            )
        base, inflect = r
        min_val = int(base * (1.0 - inflect))
        max_val = 2 * base - min_val
        step = (max_val - min_val) / (num_layers - 1)
        schedule = [int(min_val + step * i) for i in range(num_layers)]
        if any(v < 0 for v in schedule):
            raise ValueError(
                f"the tuple schedule {r!r} gives negative r values {schedule}; use r >= 0 and -1 <= inflect <= 1."
            )
        return schedule
    if isinstance(r, list):
        if len(r) > num_layers:
            raise ValueError(
                f"the list schedule has {len(r)} entries but the model has {num_layers} layers; "
                "give at most one r per layer."
            )
        return _check_schedule(r) + [0] * (num_layers - len(r))
    raise ValueError(f"r must be an int, a tuple (r, inflect) or a list of ints, got {type(r).__name__} {r!r}.")


def clamp_schedule(schedule: Sequence[int], num_tokens: int, protected: int = 1) -> list[int]:
    """Applies the 50% rule layer by layer: r_l <- min(r_l, (N_l - protected) // 2).

    Args:
      schedule: one r per layer (see `parse_r`).
      num_tokens: N_0, tokens entering the first layer (protected tokens included).
      protected: class + distill tokens, never merged away.

    Returns:
      The r each layer actually merges.
    """
    schedule = _check_schedule(schedule)
    if not _is_int(protected) or protected < 0:
        raise ValueError(f"protected must be a non-negative int, got {protected!r}.")
    if not _is_int(num_tokens) or num_tokens < protected:
        raise ValueError(f"num_tokens must be an int >= protected={protected}, got {num_tokens!r}.")
    clamped, n = [], num_tokens
    for r in schedule:
        r = min(r, (n - protected) // 2)
        clamped.append(r)
        n -= r
    return clamped


def token_counts(schedule: Sequence[int], num_tokens: int, protected: int = 1) -> list[int]:
    """Token count after every layer, [N_1, ..., N_L], with the 50% clamp applied."""
    counts, n = [], num_tokens
    for r in clamp_schedule(schedule, num_tokens, protected):
        n -= r
        counts.append(n)
    return counts

"""Checks SCPNet's structured prior on a relation file: diag(S), max off-diagonal, row sums.

    python -m jdjax.tools.scpnet_prior --relation=relation+voc.npy --topk=20 --temperature=0.3
    python -m jdjax.tools.scpnet_prior --relation=relation+coco.npy --topk=62 --temperature=0.2

With the official files and the spec's settings (§4.1) the mean diagonal of S is 0.4224 (VOC,
k=20, T=0.3), 0.4682 (COCO, k=62, T=0.2), 0.5219 (NUS, k=50, T=0.2) and 0.0441 (CUB, k=312,
T=0.3); a different value means the file or the settings differ from the released ones. Exit
status 2 on a missing or malformed file.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jdjax.data.multilabel import load_relation
from jdjax.models.scpnet import prior_report

_RELATION = flags.DEFINE_string("relation", None, "A [C, C] relation matrix (.npy).", required=True)
_TOPK = flags.DEFINE_integer("topk", 20, "Entries kept per row (self included).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.3, "Softmax temperature T of the calibration matrix S.")
_P = flags.DEFINE_float("reweight_p", 0.2, "Off-diagonal mass p of each row of G.")


def main(argv) -> None:
    del argv
    try:
        relation = load_relation(_RELATION.value)
        if not 1 <= _TOPK.value <= len(relation):
            raise ValueError(f"--topk={_TOPK.value} must be in [1, {len(relation)}] (the file has {len(relation)} classes).")
    except (OSError, ValueError) as e:
        print(f"jdjax: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    report = prior_report(relation, _TOPK.value, _P.value, _TEMPERATURE.value)
    print(f"{_RELATION.value}: {len(relation)} classes, topk={_TOPK.value}, T={_TEMPERATURE.value}, p={_P.value}")
    for key, value in report.items():
        print(f"  {key}: {value:.4f}")


if __name__ == "__main__":
    app.run(main)

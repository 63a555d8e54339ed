"""Trains every CTR model of `compare.models` with every seed of `compare.seeds` and prints the table.

    python -m jdjax.tools.ctr_compare --config=configs/kfatt.py --workdir=runs/kfatt-compare
    python -m jdjax.tools.ctr_compare --config=configs/dadnn.py:smoke --workdir=/tmp/dadnn --config.compare.seeds=0

Each run trains in <workdir>/<model>/seed<k> (jobs of jdjax.train.sweep: rerunning skips finished
runs, resumes interrupted ones and retries failed ones); compare.md / compare.json hold the mean and
standard deviation over seeds of the test metrics of the checkpoint selected on validation AUC,
with RelaImpr against the first model (jdjax.tasks.ctr.compare). Exits 1 if a run failed.
"""

from __future__ import annotations

import sys

from jdjax import cli
from jdjax.io import as_path
from jdjax.tasks import ctr


def main(config, workdir: str) -> None:
    out = ctr.compare(config, workdir)
    if out["rows"]:
        print((as_path(workdir) / "compare.md").read_text(), end="")
    if out["status"] != "completed":
        print(f"jdjax: comparison {out['status']}: {out['failed'] or 'stopped'}; rerun the same command to resume.",
              file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli.run_app(main, example="--config=configs/kfatt.py --workdir=runs/kfatt-compare", workdir_required=True)

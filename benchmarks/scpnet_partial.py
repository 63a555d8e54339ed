"""mAP against the proportion of known labels: SCPNet vs the assume-negative baseline on the embedded scenes.

    python -m benchmarks.scpnet_partial --config=configs/scpnet.py --workdir=runs/scpnet-partial \
        --proportions=0.1,0.3,0.5,0.7,0.9 --seeds=0,1,2

One small CLIP is pretrained once (workdir/pretrain, the recipe's pretraining stage); then for
every known-label proportion p and seed, the partial-label protocol (each training label kept with
probability p, known positives and known negatives used; `data.protocol='partial'`) trains every
method of `--methods` from that backbone (workdir/p<p>_seed<k>, jobs of the sweep runner: finished
ones are reused). The seed sets both the training seed and the data (scenes and label draw). Test
mAP of the checkpoint chosen on val: mean and standard deviation over seeds per (method, p), written
to benchmarks/RESULTS.md and drawn as workdir/scpnet_partial.png (copied next to RESULTS.md).
"""

from __future__ import annotations

import os
import shutil
import statistics

from absl import flags

from benchmarks import harness
from jdjax import cli, tasks
from jdjax.io import as_path
from jdjax.tasks import scpnet
from jdjax.train import sweep

_PROPORTIONS = flags.DEFINE_string("proportions", "0.1,0.3,0.5,0.7,0.9", "Comma-separated known-label proportions.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
_METHODS = flags.DEFINE_string("methods", "scpnet,assume_negative", "Methods compared (configs/scpnet.py).")
PLOT = "scpnet_partial.png"


def run_config(base, backbone: str, proportion: float, seed: int):
    c = base.copy_and_resolve_references()
    c.init_from = backbone
    c.method = _METHODS.value
    c.seed = seed
    c.data.seed = seed
    c.data.protocol = "partial"
    c.data.known_proportion = proportion
    return c


def plot(rows: dict, proportions: list[float], path: str) -> None:
    """Test mAP (mean, +- std band) against the known-label proportion, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    xs = [100 * p for p in proportions]
    for method, per_p in rows.items():
        means = [statistics.mean(per_p[p]) for p in proportions]
        stds = [statistics.stdev(per_p[p]) if len(per_p[p]) > 1 else 0.0 for p in proportions]
        ax.plot(xs, means, marker="o", label=method)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.set_xlabel("known labels (%)")
    ax.set_ylabel("test mAP (%)")
    ax.set_title("Embedded scenes, partial labels (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(base, workdir: str) -> None:
    proportions = [float(p) for p in _PROPORTIONS.value.split(",")]
    seeds = [int(s) for s in _SEEDS.value.split(",")]
    methods = [m.strip() for m in _METHODS.value.split(",")]
    tasks.check(base)
    data = scpnet.load_data(base.data)
    backbone = scpnet.pretrained_backbone(base, data, workdir, "scpnet_partial")
    jobs = []
    for p in proportions:
        for seed in seeds:
            config = run_config(base, backbone, p, seed)
            tasks.check(config)
            jobs.append(sweep.Job(f"p{p:g}_seed{seed}", lambda wd, config=config: tasks.run(config, wd)))
    out = sweep.run_sweep(workdir, jobs, desc="scpnet_partial")
    if out.status != sweep.COMPLETED:
        raise SystemExit(f"scpnet_partial: {out.status} {out.failed or ''}; rerun to resume.")
    rows: dict[str, dict[float, list[float]]] = {m: {p: [] for p in proportions} for m in methods}
    for p in proportions:
        for seed in seeds:
            for row in out.results[f"p{p:g}_seed{seed}"]["runs"]:
                rows[row["run"]][p].append(row["test/mAP"])
    smoke = "smoke" in cli.config_arg()
    notes = (f"Test mAP (%) of the val-selected checkpoint, mean and std over {len(seeds)} seeds, partial-label "
             f"protocol on the embedded scenes (configs/scpnet.py; 16 classes in 4 cliques). ![mAP vs known labels]({PLOT})")
    for method in methods:
        for p in proportions:
            values = rows[method][p]
            harness.record("scpnet_partial", f"{method} p={p:g}", {
                "notes": notes,
                "seeds": len(values),
                "test_mAP_mean": statistics.mean(values),
                "test_mAP_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "test_mAP_per_seed": " / ".join(f"{v:.1f}" for v in values),
            }, smoke=smoke)
    path = str(as_path(workdir) / PLOT)
    plot(rows, proportions, path)
    if not smoke:
        shutil.copy(path, os.path.join(os.path.dirname(__file__), PLOT))
        harness.write_results_md()
    print(f"plot: {path}")


if __name__ == "__main__":
    cli.run_app(main, example="--config=configs/scpnet.py --workdir=runs/scpnet-partial", workdir_required=True)

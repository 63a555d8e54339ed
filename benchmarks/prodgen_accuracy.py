"""The embedded product-description recipe's test table, into RESULTS.md.

    python -m benchmarks.prodgen_accuracy --config=configs/prodgen.py [--workdir=runs/prodgen]

Runs `configs/prodgen.py` (four methods; a finished workdir is read back, an interrupted one resumes) and
records every row of its comparison table: each method's test metrics at the checkpoint chosen on val
BLEU-4, with its val BLEU-4, and the non-learned aspect rows (`prodgen.aspect_rules`).
"""

from __future__ import annotations

from benchmarks import harness
from jdjax import cli, tasks

NOTES = ("Embedded generated products (jdjax/data/products.py), jdjax/tasks/prodgen.py: test split (300 "
         "products; long tail = at most 1 review, reviewed = the rest), beam 4, checkpoint chosen on val "
         "BLEU-4. BLEU (sacrebleu) and ROUGE-L in %, Dist-n over the corpus; aspects = aspect coverage (our "
         "metric: the share of the reference's user-cared aspects the output mentions), aspect_prec = the "
         "share of mentioned aspects that are the product's. 'rule:' rows are non-learned references for the "
         "aspect columns only.")


def accuracy_rows(runs: list[dict]) -> dict[str, dict]:
    """The recipe's table rows ({'run', 'selected_step', 'test/...', 'val/bleu_4'}) -> {case: metrics} for
    harness.record: test/x -> test_x, missing values left out."""
    out = {}
    for row in runs:
        metrics = {"selected_step": row.get("selected_step")}
        for key, value in row.items():
            if key.startswith("test/") and value is not None:
                metrics["test_" + key[len("test/"):]] = value
        if row.get("val/bleu_4") is not None:
            metrics["val_bleu_4"] = row["val/bleu_4"]
        out[row["run"]] = metrics
    return out


def main(config, workdir: str) -> None:
    out = tasks.run(config, workdir)
    if out.get("status") != "completed":
        raise SystemExit(f"prodgen_accuracy: {out.get('status')} {out.get('failed') or ''}; rerun to resume.")
    smoke = "smoke" in cli.config_arg()
    for case, metrics in accuracy_rows(out["runs"]).items():
        harness.record("prodgen_accuracy", case, {"notes": NOTES, **metrics}, smoke=smoke)


if __name__ == "__main__":
    cli.run_app(main, example="--config=configs/prodgen.py", workdir_default="runs/prodgen")

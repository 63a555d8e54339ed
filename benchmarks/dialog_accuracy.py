"""MLE vs group-wise contrastive learning on the embedded dialogue recipe, into RESULTS.md.

    python -m benchmarks.dialog_accuracy --config=configs/dialog_cl.py [--workdir=runs/dialog-cl]

Runs `configs/dialog_cl.py` (the MLE reference, the matcher, the contrastive model; a finished
workdir is read back, an interrupted one resumes) and records each model's test metrics
(checkpoint chosen on val) with its val perplexity, and the matcher's val / test accuracy and AUC.
"""

from __future__ import annotations

from benchmarks import harness
from jdjax import cli, tasks
from jdjax.tasks import dialog_cl

NOTES = ("Embedded chatterbot recipe (jdjax/tasks/dialog_cl.py): test split, greedy decoding, MLE selected on val "
         "perplexity, CL on val CL loss + 0.5 NLL; BLEU-4 on vocabulary tokens, Dist-n over the corpus, Ent-2 in nats, "
         "ppl of the gold responses. matcher: val / test accuracy and AUC of the response matcher [R] on gold pairs "
         "vs in-batch negatives.")


def main(config, workdir: str) -> None:
    out = tasks.run(config, workdir)
    if out.get("status") != "completed":
        raise SystemExit(f"dialog_accuracy: {out.get('status')} {out.get('failed') or ''}; rerun to resume.")
    smoke = "smoke" in cli.config_arg()
    for row in out["runs"]:
        if row["run"] == "samples":
            continue
        metrics = {f"test_{k}": row[f"test/{k}"] for _, k, _ in dialog_cl.COLUMNS}
        harness.record("dialog_accuracy", row["run"], {"notes": NOTES, "selected_step": row["selected_step"],
                                                       **metrics, "val_ppl": row["val/ppl"]}, smoke=smoke)
    m = out["matcher"]
    harness.record("dialog_accuracy", "matcher", {"notes": NOTES, **{k.replace("/", "_"): v for k, v in m.items()}},
                   smoke=smoke)


if __name__ == "__main__":
    cli.run_app(main, example="--config=configs/dialog_cl.py", workdir_default="runs/dialog-cl")

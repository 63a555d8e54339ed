"""How much the label prior could add: the embedded backbone's zero-shot scores mixed with S.

    python -m benchmarks.scpnet_prior_value --config=configs/scpnet.py --workdir=runs/scpnet-prior
    # the scenes without faint objects:
    python -m benchmarks.scpnet_prior_value --config=configs/scpnet.py --workdir=runs/scpnet-prior-nofaint \
        --config.data.faint=0

The recipe's pretraining stage (workdir/pretrain, reused when finished) gives the zero-shot CoOp
classifier of "a photo of a {name}." (SCPNet with the GCN weights at 0). Its test logits l [N, C]
are mixed with the calibration matrix S of the structured prior, l' = (1 - a) l + a l S^T, for
each a of `--mix`: a = 0 is the zero-shot classifier, a > 0 what a classifier that borrows a share
a of each class's score from its prior neighbours would rank (roughly a GCN with z* = T + a S T, no
training). Test mAP and, with `data.faint` > 0, the faint-object mAP (faint test objects ranked
against the absent classes) go to benchmarks/RESULTS.md. Nothing here is tuned on test: the table
reports every a of the grid; it measures the information in the prior, not a method.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from absl import flags

from benchmarks import harness
from jdjax import cli, tasks
from jdjax.tasks import scpnet
from jdjax.train import sharding as shd
from jdjax.train.loop import evaluate

_MIX = flags.DEFINE_string("mix", "0,0.25,0.5,0.75", "Comma-separated shares a of the prior-mixed logits.")


def zero_shot_logits(config, data, backbone: str, relation: np.ndarray) -> tuple[np.ndarray, dict]:
    """Test logits [N, C] of the backbone's zero-shot classifier ('no_gcn', prompt context "a photo of a")
    and the eval sources."""
    task = scpnet.transfer_task(config, "no_gcn", backbone, data, relation)
    params = nn.meta.unbox(jax.jit(task.init)(jax.random.key(0)))
    state = {k: v for k, v in nn.meta.unbox(jax.jit(task.init_model_state)(jax.random.key(0))).items()
             if k != "pessl"}
    variables = task.load_pretrained({"params": params, **state})
    params = variables.pop("params")
    predict = jax.jit(lambda weights, batch: task.predict(weights["params"], weights["model_state"], batch))
    out = evaluate(predict, {"params": params, "model_state": variables}, task.eval_sources["test"],
                   config.eval_batch_size, shd.make_mesh(dict(config.mesh)), summarize=lambda outputs: outputs)
    return np.asarray(out["logits"], np.float64), task.eval_sources


def main(base, workdir: str) -> None:
    mixes = [float(a) for a in _MIX.value.split(",")]
    tasks.check(base)
    data = scpnet.load_data(base.data)
    backbone = scpnet.pretrained_backbone(base, data, workdir, "scpnet_prior_value")
    relation = scpnet.relation_matrix(base, data, backbone)
    _, calib = scpnet.prior_matrices(base, relation, scpnet.METHODS["scpnet"])
    logits, sources = zero_shot_logits(base, data, backbone, relation)
    test, faint = sources["test"], sources.get("faint")
    # The faint split holds the test images with the salient positives marked known (left out of hidden_mAP).
    annotations = faint.annotations if faint is not None else test.annotations
    notes = ("Test split of the embedded scenes (case = data.faint and the share a): zero-shot logits of the "
             "pretrained backbone mixed with the prior, (1 - a) l + a l S^T, no training "
             "(benchmarks/scpnet_prior_value.py). faint mAP: the faint objects ranked against the absent classes.")
    smoke = "smoke" in cli.config_arg()
    for a in mixes:
        mixed = (1 - a) * logits + a * logits @ calib.T
        summary = scpnet.summarize({"logits": mixed, "labels": test.labels, "annotations": annotations})
        metrics = {"notes": notes, "test_mAP": summary["mAP"]}
        if faint is not None:
            metrics["faint_mAP"] = summary["hidden_mAP"]
        harness.record("scpnet_prior_value", f"faint={base.data.faint:g} a={a:g}", metrics, smoke=smoke)


if __name__ == "__main__":
    cli.run_app(main, example="--config=configs/scpnet.py --workdir=runs/scpnet-prior --config.data.faint=0.3",
                workdir_required=True)

"""Regret table and regret-curve figure for the delayed-feedback simulations (spec P1)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from jdjax import io
from jdjax.econ.delayed_feedback import POLICY_LABELS


def regret_table(results, reference=None) -> list[dict]:
    """One row per (scenario, policy).

    results: {scenario: {policy: run}} where run has regret [R, T] (cumulative expected regret),
    decision_time [R], decided [R], correct [R] and seconds_per_replication (simulate.PolicyRun).
    reference: optional {(scenario, policy): text}, the published figure to compare with.
    """
    reference = reference or {}
    rows = []
    for scenario, runs in results.items():
        for policy, run in runs.items():
            final = np.asarray(run.regret)[:, -1]
            rows.append(
                {
                    "scenario": scenario,
                    "policy": policy,
                    "label": POLICY_LABELS.get(policy, policy),
                    "replications": int(final.shape[0]),
                    "horizon": int(np.asarray(run.regret).shape[1]),
                    "regret_mean": float(final.mean()),
                    "regret_p10": float(np.quantile(final, 0.1)),
                    "regret_p90": float(np.quantile(final, 0.9)),
                    "paper_regret": reference.get((scenario, policy), ""),
                    "decided_rate": float(np.mean(run.decided)),
                    "decision_time_mean": float(np.mean(run.decision_time)),
                    "correct_selection_rate": float(np.mean(run.correct)),
                    "seconds_per_replication": float(run.seconds_per_replication),
                }
            )
    return rows


def table_markdown(rows: list[dict]) -> str:
    header = (
        "| scenario | policy | R | final regret mean | 10-90% | paper | decided | rows to decision | correct selection | s / rep |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['scenario']} | {r['label']} | {r['replications']} | {r['regret_mean']:.1f} | "
        f"{r['regret_p10']:.0f}-{r['regret_p90']:.0f} | {r['paper_regret']} | {r['decided_rate']:.2f} | "
        f"{r['decision_time_mean']:.0f} | {r['correct_selection_rate']:.2f} | {r['seconds_per_replication']:.2f} |\n"
        for r in rows
    )
    notes = (
        "\nRegret: cumulative expected regret at T, sum_t (max_k p_k - p_a_t). Stopping rule (ours, not the "
        "paper's): delay-corrected posterior of D-TS evaluated at every update whatever the allocation; "
        "'rows to decision' counts T when it never fired; correct selection uses the arm recommended at the "
        "stop, or at the last update.\n"
    )
    return header + body + notes


def write_table(table: dict, workdir) -> None:
    """table = {"rows": regret_table(...), "protocol": {...}} -> workdir/regret_table.{md,json}."""
    root = io.as_path(workdir)
    io.write_text(root / "regret_table.md", table_markdown(table["rows"]))
    io.write_json(root / "regret_table.json", table)


def plot_regret_curves(results, path, t_min: int = 100) -> None:
    """One panel per scenario: mean cumulative regret per policy with its 10-90% band, log x-axis
    from row t_min (as released). results: as for `regret_table`.
    The y-axis stops above the highest non-Random band, as in the released figures. Uses a bare
    Figure, not pyplot: the PNG renders with Agg and no global backend is switched.
    """
    fig = Figure(figsize=(5 * len(results), 4))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (scenario, runs) in zip(axes[0], results.items()):
        top = 0.0
        for policy, run in runs.items():
            regret = np.asarray(run.regret)  # [R, T]
            rows = np.arange(1, regret.shape[1] + 1)
            keep = rows >= max(t_min, 1)
            lo, hi = np.quantile(regret, [0.1, 0.9], axis=0)
            (line,) = ax.plot(rows[keep], regret.mean(0)[keep], label=POLICY_LABELS.get(policy, policy))
            ax.fill_between(rows[keep], lo[keep], hi[keep], color=line.get_color(), alpha=0.2, linewidth=0)
            top = top if policy == "random" else max(top, hi.max())
        if top > 0:
            ax.set_ylim(0, 1.1 * top)
        ax.set_xscale("log")
        ax.set_title(scenario)
        ax.set_xlabel("round t")
        ax.set_ylabel("regret")
        ax.legend(fontsize=8)
    fig.tight_layout()
    io.save_figure(fig, path)

"""What a comparison concludes, arm by arm against the baseline: the matching axis, the paired
uncertainty from every source, the replicates' agreement, and one verdict sentence each.

Rendered into the comparison report (:mod:`moe_lab.analysis.compare_report`) and the README's
result block (:mod:`moe_lab.results`) from :class:`~moe_lab.analysis.comparison.ComparisonInfo`.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from .format import (
    DASH,
    cell,
    fmt_ci,
    fmt_float,
    fmt_p,
    fmt_pct,
    fmt_signed,
    fmt_value,
    missing,
    table,
)

#: Within this relative difference two models count as having the same params or FLOPs (the
#: width matching's tolerance is tighter; a plain cnn vs its MoE twin is far outside it).
SAME_WITHIN = 0.03


def axis_phrase(arm: pd.Series, base: pd.Series) -> str:
    """What the baseline is against the arm on both matching axes, e.g. ``"same FLOPs, 0.60×
    params"`` (ratios are baseline / arm, FLOPs per example first)."""
    parts = []
    for column, name in (("flops_per_example", "FLOPs"), ("params", "params")):
        a, b = arm.get(column), base.get(column)
        if missing(a) or missing(b) or not float(a):
            parts.append(f"{name} unknown")
            continue
        ratio = float(b) / float(a)
        parts.append(f"same {name}" if abs(ratio - 1) <= SAME_WITHIN else f"{ratio:.2f}× {name}")
    return ", ".join(parts)


def _has_paired(row: pd.Series) -> bool:
    return "boot_ci_low" in row.index and not missing(row.get("boot_ci_low"))


def verdict(row: pd.Series, base: pd.Series, budget: int, epochs: Any, replicates: int = 1) -> str:
    """One sentence, e.g. "moe K=2 vs cnn_flop_matched (same FLOPs, 0.60× params) at an equal
    budget of 8 trials × 10 epochs per arm: −5.2 pp test accuracy [95% bootstrap CI −6.8, −3.7;
    seeds × test examples], Holm p = 0.003, P(moe K=2 > cnn_flop_matched) = 0.00 (3 vs 3 seeds);
    resolved: worse." The interval is the paired bootstrap's where the runs kept their
    predictions, else Welch's over the final seeds."""
    head = f"{row['label']} vs {base['label']} ({axis_phrase(row, base)}) at an equal budget of "
    head += f"{budget} trials"
    if not missing(epochs):
        head += f" × {int(epochs)} epoch{'s' if int(epochs) != 1 else ''}"
    head += " per arm" + (f" and replicate ({replicates} replicates)" if replicates > 1 else "")
    if missing(row["diff"]):
        return f"{head}: no test ({row['note'] or 'no completed final runs'})."
    text = f"{head}: {fmt_signed(100 * row['diff'])} pp test accuracy"
    runs = f"({int(row['final_n'])} vs {int(base['final_n'])} runs)"
    if _has_paired(row):
        sources = (
            "replicates × seeds × test examples" if replicates > 1 else "seeds × test examples"
        )
        low, high = row["boot_ci_low"], row["boot_ci_high"]
        text += (
            f" [95% bootstrap CI {fmt_signed(100 * low)}, {fmt_signed(100 * high)}; {sources}], "
            f"Holm p = {fmt_p(row['paired_p_holm'])}, "
            f"P({row['label']} > {base['label']}) = {fmt_float(row['p_improvement'], 2)} {runs}"
        )
    elif not missing(row["ci_low"]):
        low, high = row["ci_low"], row["ci_high"]
        text += (
            f" [95% CI {fmt_signed(100 * low)}, {fmt_signed(100 * high)}; Welch, final seeds only], "
            f"p = {fmt_p(row['p_value'])} {runs}"
        )
    else:
        return f"{text}; no interval ({row['note']})."
    if low > 0:
        return text + "; resolved: better."
    if high < 0:
        return text + "; resolved: worse."
    return text + "; not resolved at this budget (the interval contains 0)."


def paired_section(info: Any) -> list[str]:
    """Every other arm against the baseline with the paired statistics (or why there are
    none)."""
    summary, base, labels = info.summary, info.baseline, info.labels
    lines = [
        f"## Against the baseline ({labels[base]}), paired over seeds and test examples",
        "",
    ]
    others = summary[summary["arm"] != base]
    if others.empty or "boot_ci_low" not in summary.columns:
        why = info.paired_note or "no final run kept its predictions"
        return [*lines, f"No paired statistics: {why}.", ""]
    if info.paired_note:
        lines += [f"Note: {info.paired_note}.", ""]
    header = ["arm", "vs baseline", "difference (pp)", "95% CI, paired t (pp)",
              "95% CI, bootstrap (pp)", "p (paired t)", "p (Holm)", "P(arm > baseline)", "note"]  # fmt: skip
    base_row = summary[summary["arm"] == base].iloc[0]
    rows = [
        [
            cell(row["label"]),
            axis_phrase(row, base_row),
            DASH if missing(row["paired_diff"]) else fmt_signed(100 * row["paired_diff"], 2),
            fmt_ci(row["paired_ci_low"], row["paired_ci_high"], signed=True),
            fmt_ci(row["boot_ci_low"], row["boot_ci_high"], signed=True),
            fmt_p(row["paired_p"]),
            fmt_p(row["paired_p_holm"]),
            f"{fmt_float(row['p_improvement'], 2)} [{fmt_float(row['p_improvement_ci_low'], 2)}, "
            f"{fmt_float(row['p_improvement_ci_high'], 2)}]",
            cell(" ".join(str(n) for n in (row.get("paired_note"), row.get("effect_note")) if n)),
        ]
        for _, row in others.iterrows()
    ]
    return [*lines, table(header, rows, right={2, 3, 4, 5, 6, 7}), ""]


def replicates_section(info: Any) -> list[str]:
    """Each replicate's chosen configuration and result, and how far they disagree (only for a
    comparison with several replicates)."""
    data, reps = info.data, info.replicates
    if data.replicates < 2 or reps.empty:
        return []
    keys = list(data.settings["space"])
    lines = [
        f"## Replicates: {data.replicates} independent tuning studies per arm",
        "",
        "Each replicate tuned with its own sampler seed and tuning seeds, and its best "
        "configuration got its own final runs; the verdicts pool them.",
        "",
    ]
    rows = []
    for row in reps.itertuples():
        params = json.loads(row.best_params) if isinstance(row.best_params, str) else {}
        rows.append(
            [cell(info.labels[row.arm]), str(row.replicate), str(row.best_trial),
             fmt_pct(row.best_val_acc, with_se=False), fmt_pct(row.test_acc_mean, row.test_acc_se)]
            + [fmt_value(params[k]) if k in params else DASH for k in keys]
        )  # fmt: skip
    header = ["arm", "replicate", "best trial", "best val acc (%)", "final test acc (%)",
              *(f"`{k}`" for k in keys)]  # fmt: skip
    lines += [table(header, rows, right={1, 2, 3, 4}), ""]
    for arm, mine in reps.groupby("arm", sort=False):
        sd_val = mine["best_val_acc"].std(ddof=1)
        sd_test = mine["test_acc_mean"].std(ddof=1)
        lines.append(
            f"- {info.labels[arm]}: the replicates' best validation accuracy varies by "
            f"{fmt_float(100 * sd_val, 2)} pp (SD), their final test accuracy by "
            f"{fmt_float(100 * sd_test, 2)} pp (SD)."
        )
    return [*lines, ""]


def matched_verdict_lines(info: Any) -> list[str]:
    """One verdict per arm (the matched CNNs aside) against each matched CNN."""
    settings = info.data.settings
    budget, epochs = int(settings["trials"]), settings.get("max_epochs")
    summary = info.summary.set_index("arm")
    lines = []
    for matched, rows in info.against.items():
        base = summary.loc[matched].copy()
        base["arm"] = matched
        for _, row in rows.iterrows():
            if row["arm"] not in info.against:  # the matched CNNs against each other: above
                lines.append(f"- {verdict(row, base, budget, epochs, info.data.replicates)}")
    return lines


def matched_verdicts(info: Any) -> list[str]:
    """Every arm against each matched CNN (same FLOPs, same params): a section of verdicts."""
    if not info.against:
        return []
    return [
        "## Against each matched baseline",
        "",
        "Equal budget has two axes: the CNN widened to an arm's FLOPs per example and the one "
        "widened to its parameters. Every arm against each, with the paired statistics (Holm "
        "across the arms compared with that baseline):",
        "",
        *matched_verdict_lines(info),
        "",
    ]


def _scales(values: dict[str, float]) -> str:
    return " / ".join(fmt_float(v, 3) for v in values.values()) if values else DASH


def why_section(info: Any) -> list[str]:
    """Why: each arm's fit (train vs validation at the last epoch), its layers' activation scale
    at initialisation and at the end, and its MoE layers' routing over training."""
    why = info.why
    if why.empty:
        return []
    lines = [
        "## Why: fit, activation scale and routing (final runs)",
        "",
        "Train and validation accuracy at the last epoch (train far below validation's ceiling "
        "with a small gap: underfitting; a large positive gap: overfitting); each layer's output "
        "std on the validation set before training and at the end, input to output; and, "
        "averaged over the MoE layers, the gate entropy (nats), the fraction of dead experts and "
        "the expert similarity (mean cosine between a unit's expert kernels) at the first and "
        "last epoch. Per layer and per epoch: the runs' `metrics.csv` (`act/...`, `gate/...`).",
        "",
    ]
    header = ["arm", "train acc (%)", "val acc (%)", "train − val (pp)",
              "activation std per layer, init", "… at the end",
              "gate entropy", "dead experts", "expert similarity"]  # fmt: skip
    rows = []
    for row in why.itertuples():
        rows.append(
            [
                cell(info.labels[row.arm]),
                fmt_pct(row.train_acc, with_se=False),
                fmt_pct(row.val_acc, with_se=False),
                fmt_signed(100 * row.fit_gap, 2) if not missing(row.fit_gap) else DASH,
                _scales(row.act_init),
                _scales(row.act_end),
                *(
                    DASH if missing(getattr(row, f"{s}_first"))
                    else f"{fmt_float(getattr(row, f'{s}_first'), 3)} → {fmt_float(getattr(row, f'{s}_last'), 3)}"
                    for s in ("entropy", "dead", "similarity")
                ),
            ]
        )  # fmt: skip
    return [*lines, table(header, rows, right={1, 2, 3}), ""]


__all__ = [
    "SAME_WITHIN",
    "axis_phrase",
    "matched_verdict_lines",
    "matched_verdicts",
    "paired_section",
    "replicates_section",
    "verdict",
    "why_section",
]

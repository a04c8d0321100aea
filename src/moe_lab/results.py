"""``python -m moe_lab.results COMPARISON_DIR [...] [--out FILE] [--why] [--across]``: the README's
result block, rendered from comparison dirs, never typed.

Per comparison: its dataset, the table (params, FLOPs per example, final test accuracy, and
against the baseline the paired difference with its bootstrap interval, Holm's p and P(arm >
baseline)), the budget, the command, the commit the runs were made at, the wall time (set-up and
report excluded, as the comparison records its sessions) and its figures (the EVP and test
accuracy against FLOPs per example); then the verdicts; with ``--why``, the report's Why table
(each arm's fit, activation scale per layer, and routing over training); with ``--across``, one
last table of all the comparisons given, an arm a row and a comparison a column. Everything comes from the same statistics as the comparison's own report
(:func:`moe_lab.analysis.comparison.comparison_info`).

Exit status: 0, or 2 with one line on stderr when a dir is not a comparison or cannot be read.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from moe_lab.analysis.comparison import ComparisonInfo, comparison_info, load_comparison
from moe_lab.analysis.format import cell, fmt_duration, fmt_int, fmt_pct, table
from moe_lab.analysis.verdicts import axis_phrase, matched_verdict_lines, verdict, why_section
from moe_lab.run.comparison import read_sessions
from moe_lab.run.record import read_summary_data
from moe_lab.run.report_files import COMPARE_REPORT_FILES


def _commits(info: ComparisonInfo) -> str:
    """The commit(s) the final runs were made at (as their records say)."""
    finals = info.data.runs[info.data.runs["stage"] == "final"]
    commits = set()
    for run_dir in finals["run_dir"]:
        summary = read_summary_data(Path(run_dir)) or {}
        commits.add(summary.get("git_commit") or "unknown (an installed wheel)")
    return ", ".join(f"`{c}`" for c in sorted(commits)) or "no final run"


def _title(experiment: str, command: str | None) -> str:
    """The experiment, and the command's overrides beyond it, so that two comparisons of one
    preset (one with ``data.topology.batch_norm=true``, say) have headings that tell them apart."""
    try:
        words = shlex.split(command or "")
    except ValueError:
        words = []
    extra = [w for w in words if "=" in w and not w.startswith("experiment=")]
    return f"{experiment} ({' '.join(extra)})" if extra else experiment


def _vs_baseline(row, base_row) -> list[str]:
    if row["arm"] == base_row["arm"]:
        return ["baseline", "", "", ""]
    if "boot_ci_low" not in row.index or row.isna().get("boot_ci_low", True):
        return [axis_phrase(row, base_row), "no paired statistics", "", ""]
    diff = f"{100 * row['paired_diff']:+.2f} [{100 * row['boot_ci_low']:+.2f}, {100 * row['boot_ci_high']:+.2f}]"
    return [
        axis_phrase(row, base_row),
        diff.replace("-", "−"),
        f"{row['paired_p_holm']:.3g}",
        f"{row['p_improvement']:.2f}",
    ]


def render_block(
    info: ComparisonInfo,
    relative_to: Path | None = None,
    figures: Path | None = None,
    why: bool = False,
) -> str:
    """The markdown block of one comparison; with ``figures``, its EVP and accuracy-vs-FLOPs
    figures are copied there (as ``<experiment>_<dir name>_<file name>``) and the block shows
    those copies."""
    data, summary = info.data, info.summary
    settings = data.settings
    base_row = summary[summary["arm"] == info.baseline].iloc[0]
    header = ["arm", "params", "FLOPs / example", "test acc (%)", "baseline is",
              "Δ vs baseline (pp) [95% bootstrap CI]", "p (Holm)", "P(arm > baseline)"]  # fmt: skip
    rows = [
        [
            cell(row["label"]),
            fmt_int(row["params"]),
            fmt_int(row["flops_per_example"]),
            fmt_pct(row["test_acc_mean"], row["test_acc_se"]) + f" (n={int(row['final_n'])})",
            *_vs_baseline(row, base_row),
        ]
        for _, row in summary.iterrows()
    ]
    sessions = read_sessions(data.dir)
    wall = sum(float(s.get("wall_time_s") or 0) for s in sessions)
    experiment = data.record.experiment or "comparison"

    def figure(key: str, what: str) -> str:
        """The markdown image of one of the report's figures (copied into ``figures``)."""
        path = data.dir / COMPARE_REPORT_FILES[key]
        if figures is not None and path.is_file():
            figures.mkdir(parents=True, exist_ok=True)
            copy = figures / f"{experiment}_{data.dir.name}_{path.name}"
            shutil.copyfile(path, copy)
            path = copy.resolve()
        if relative_to is not None and path.is_relative_to(relative_to):
            path = path.relative_to(relative_to)
        return f"![{data.record.experiment}: {what}]({path})"

    replicates = data.replicates
    budget = (
        f"{settings['trials']} trials × {settings.get('max_epochs')} epochs per arm"
        + (f" and replicate ({replicates} replicates)" if replicates > 1 else "")
        + f", then {settings['seeds']} final seeds"
        + (" per replicate" if replicates > 1 else "")
    )
    others = summary[summary["arm"] != info.baseline]
    epochs = settings.get("max_epochs")
    lines = [
        f"#### {_title(data.record.experiment or data.dir.name, data.record.command)}",
        "",
        table(header, rows, right={1, 2, 3, 5, 6, 7}),
        "",
        f"- Budget: {budget}; baseline `{info.baseline}`.",
        f"- Command: `{data.record.command}`",
        f"- Commit of the runs: {_commits(info)}",
        f"- Wall time: {fmt_duration(wall)} over {len(sessions)} session(s) (set-up and report "
        "excluded).",
        figure("evp_png", "expected best validation accuracy vs trials"),
        figure("flops_png", "final test accuracy (95% t interval over the final runs) vs FLOPs"),
        "",
        *(
            f"- {verdict(row, base_row, int(settings['trials']), epochs, replicates)}"
            for _, row in others.iterrows()
            if row["arm"] in info.against or not info.against
        ),
        *matched_verdict_lines(info),
        "",
    ]
    if why:  # the report's Why table, its heading made a paragraph of this block
        section = why_section(info)
        lines += [f"**{section[0].removeprefix('## ')}.** {section[2]}", "", *section[4:]]
    return "\n".join(lines)


def render_across(infos: list[ComparisonInfo]) -> str:
    """One table of several comparisons of the same arms (a preset run as it is and with a fix
    for every arm, say): a row per arm, a column per comparison (headed by its
    :func:`_title`), each cell the final test accuracy and the paired difference against that
    comparison's baseline with its bootstrap interval, as each block gives them."""
    arms: list[str] = []
    for info in infos:
        arms += [arm for arm in info.summary["arm"] if arm not in arms]
    titles = [
        _title(i.data.record.experiment or i.data.dir.name, i.data.record.command) for i in infos
    ]
    rows = []
    for arm in arms:
        cells = [arm]
        for info in infos:
            found = info.summary[info.summary["arm"] == arm]
            if found.empty:
                cells.append("")
                continue
            row = found.iloc[0]
            base_row = info.summary[info.summary["arm"] == info.baseline].iloc[0]
            diff = _vs_baseline(row, base_row)[1]
            text = fmt_pct(row["test_acc_mean"], with_se=False)
            cells.append(text if diff in ("", "no paired statistics") else f"{text}, {diff}")
        rows.append(cells)
    header = ["arm", *(f"`{t}`" for t in titles)]
    return table(header, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_lab.results",
        description="Render the README's result block from comparison dirs (their runs, never "
        "typed numbers).",
    )
    parser.add_argument("comparison_dirs", nargs="+", metavar="COMPARISON_DIR")
    parser.add_argument("--out", type=Path, default=None, help="write the block here as well")
    parser.add_argument(
        "--relative-to", type=Path, default=Path.cwd(), help="figure paths relative to this dir"
    )
    parser.add_argument(
        "--figures", type=Path, default=None, help="copy each comparison's figures into this dir"
    )
    parser.add_argument(
        "--why",
        action="store_true",
        help="add each comparison's Why table (fit, activation scale, routing of the final runs)",
    )
    parser.add_argument(
        "--across",
        action="store_true",
        help="end with one table of every comparison given: per arm, its test accuracy and "
        "difference against the baseline in each",
    )
    args = parser.parse_args(argv)
    blocks, infos = [], []
    for path in args.comparison_dirs:
        try:
            info = comparison_info(load_comparison(path))
        except (OSError, ValueError) as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        infos.append(info)
        blocks.append(render_block(info, args.relative_to.resolve(), args.figures, args.why))
    if args.across:
        blocks.append(render_across(infos))
    text = "\n".join(blocks)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

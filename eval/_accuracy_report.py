"""Markdown table and plot for ``eval/accuracy.py`` results."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _open_label(report: dict) -> str:
    return "shape+colour acc %" if report["dataset"].startswith("easy-VQA") else "non-yes/no acc %"


def markdown(report: dict) -> str:
    """A pivot (accuracy per method and budget) and the full table (one row per run)."""
    results = report["results"]
    base = results[0]
    budgets = sorted({r["budget"] for r in results[1:]}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in results[1:]))
    by = {(r["method"], r["budget"]): r for r in results}
    lines = [
        f"Model: `{Path(report['model']).name}`; data: {report['dataset']} (n = {report['n']}); "
        f"scoring: {report['scoring']}; {report['machine']}; {report['seconds'] / 60:.1f} min.",
        "",
        f"Uncompressed ({base.get('visual_tokens')} visual tokens): **{_pct(base['accuracy'])} %** ± "
        f"{_pct(base['se'])}"
        + (
            f"; question only (no image): {_pct(report['floor']['accuracy'])} % ± {_pct(report['floor']['se'])}"
            if report.get("floor")
            else ""
        )
        + ".",
        "",
        "Accuracy % (± binomial s.e.) by budget (fraction of visual tokens kept):",
        "",
        "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for m in methods:
        cells = [
            f"{_pct(by[(m, b)]['accuracy'])} ± {_pct(by[(m, b)]['se'])}" if (m, b) in by else "–" for b in budgets
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    label = _open_label(report)
    lines += [
        "",
        "Full table (visual tokens: after the last stage, e.g. inside the LLM for fastv / pdrop / todre; "
        "equiv. budget: layer-averaged fraction of visual tokens the LLM processes):",
        "",
        f"| method | budget | visual tokens | equiv. budget | accuracy % | s.e. | retention | {label} "
        "| yes-share (yes/no qs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = results + ([report["floor"]] if report.get("floor") else [])
    for r in rows:
        retention = "–" if r.get("retention") is None else f"{r['retention']:.3f}"
        tokens = r.get("visual_tokens", 0 if r["method"] == "no image" else "–")
        yes = "–" if r.get("yes_share") is None else f"{r['yes_share']:.2f}"
        equiv = "–" if r.get("equivalent_budget") is None else f"{r['equivalent_budget']:.3f}"
        lines.append(
            f"| {r['method']} | {r['budget']:g} | {tokens} | {equiv} | {_pct(r['accuracy'])} | {_pct(r['se'])} "
            f"| {retention} | {_pct(r.get('open_accuracy'))} | {yes} |"
        )
    lines += _family_tables(report) + _paired_tables(report)
    if report.get("skipped"):
        why = "; ".join(f"{m} ({reason})" for m, reason in report["skipped"].items())
        lines += ["", f"Not applicable to this model: {why}"]
    return "\n".join(lines)


def _interval(d: dict | None) -> str:
    if d is None:
        return "–"
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _family_tables(report: dict) -> list[str]:
    """Accuracy per question family: floors, then every method at each budget."""
    results = report["results"]
    families = sorted(results[0].get("families") or {})
    if not families:
        return []
    floor = report.get("floor") or {}
    lines = [
        "",
        "Accuracy % per question family (majority answer: always the most frequent answer of the family):",
        "",
        "| method | budget | " + " | ".join(families) + " | all |",
        "|---|---:|" + "---:|" * (len(families) + 1),
    ]
    rows = results[:1] + ([floor] if floor else []) + results[1:]
    for r in rows:
        cells = [_pct(r["families"].get(f, {}).get("accuracy")) for f in families]
        lines.append(f"| {r['method']} | {r['budget']:g} | " + " | ".join(cells) + f" | {_pct(r['accuracy'])} |")
    lines.append(f"| majority answer | – | {' | '.join('–' for _ in families)} | {_pct(report.get('majority'))} |")
    return lines


def beats_random(report: dict, budget: float) -> tuple[list[str], list[str], list[str]]:
    """Methods whose interval vs random at ``budget`` lies above 0, below 0, or covers 0."""
    above, below, tied = [], [], []
    for r in report["results"]:
        d = r.get("vs_random")
        if r["budget"] != budget or d is None:
            continue
        (above if d["low"] > 0 else below if d["high"] < 0 else tied).append(r["method"])
    return above, below, tied


def _cell(r: dict) -> str:
    """Accuracy, with what a budget hides: the layer-averaged share of visual tokens an in-LLM method lets the
    LLM process ("LLM x"), or the token count of the ``native`` smaller picture."""
    note = ""
    if "native" in r:
        note = f" ({r.get('visual_tokens')} tok.)"
    elif r.get("equivalent_budget") is not None and abs(r["equivalent_budget"] - r["budget"]) > 0.005:
        note = f" (LLM {r['equivalent_budget']:.2f})"
    return _pct(r["accuracy"]) + note


def ranking(report: dict, budgets: tuple[float, float] = (0.111, 0.05)) -> list[str]:
    """Two budgets side by side, every method with its paired intervals against random and uncompressed, sorted
    by accuracy at the first budget (the README's table); empty unless both budgets were run."""
    by = {(r["method"], r["budget"]): r for r in report["results"][1:]}
    ran = {b for _, b in by}
    if not all(b in ran for b in budgets) or not any("vs_uncompressed" in r for r in by.values()):
        return []
    first, second = budgets
    methods = sorted({m for m, b in by if b == first}, key=lambda m: -by[(m, first)]["accuracy"])
    head = " | ".join(f"{b:g}: acc. % | minus random | minus uncompressed" for b in budgets)
    lines = [
        "",
        f"Ranking at budgets {first:g} and {second:g}, sorted by accuracy at {first:g} (paired differences as above):",
        "",
        f"| method | {head} |",
        "|---|" + "---:|" * 6,
    ]
    for m in methods:
        cells = []
        for b in budgets:
            r = by.get((m, b))
            cells += (
                ["–"] * 3
                if r is None
                else [_cell(r), _interval(r.get("vs_random")), _interval(r.get("vs_uncompressed"))]
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _paired_tables(report: dict) -> list[str]:
    """Per budget: every method minus random and minus uncompressed, with 95 % bootstrap intervals."""
    results = report["results"]
    if not any("vs_uncompressed" in r for r in results):
        return []
    clusters = report.get("pictures", "–")
    lines = [
        "",
        f"Paired differences in accuracy points, 95 % bootstrap interval over pictures ({clusters} pictures, "
        f"{report['n']} questions; a picture is resampled with all its questions):",
        "",
        "| budget | method | accuracy % | minus random | minus uncompressed |",
        "|---:|---|---:|---:|---:|",
    ]
    for budget in sorted({r["budget"] for r in results[1:]}, reverse=True):
        rows = sorted((r for r in results[1:] if r["budget"] == budget), key=lambda r: -r["accuracy"])
        for r in rows:
            lines.append(
                f"| {budget:g} | {r['method']} | {_pct(r['accuracy'])} | {_interval(r.get('vs_random'))} "
                f"| {_interval(r.get('vs_uncompressed'))} |"
            )
    lines += ranking(report)
    for budget in sorted({r["budget"] for r in results[1:]}, reverse=True):
        above, below, tied = beats_random(report, budget)
        if above or below or tied:
            lines += [
                "",
                f"At budget {budget:g}: better than random (interval above 0): {', '.join(above) or 'none'}; "
                f"worse than random: {', '.join(below) or 'none'}; not distinguishable from random: "
                f"{', '.join(tied) or 'none'}.",
            ]
    return lines


def plot(report: dict, path: Path) -> None:
    """Accuracy vs budget (log x), one line per method, uncompressed and no-image levels dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    base = results[0]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in results[1:]))
    markers = "osv^<>DpP*Xh"
    for i, m in enumerate(methods):
        rows = sorted((r for r in results if r["method"] == m), key=lambda r: r["budget"])
        ax.errorbar(
            [r["budget"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            yerr=[100 * r["se"] for r in rows],
            marker=markers[i % len(markers)],
            capsize=2,
            linewidth=1.2,
            label=m,
        )
    ax.axhline(100 * base["accuracy"], color="black", linestyle="--", linewidth=1, label="uncompressed")
    if report.get("floor"):
        ax.axhline(100 * report["floor"]["accuracy"], color="gray", linestyle=":", linewidth=1, label="no image")
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in results[1:]})
    ax.set_xticks(budgets)
    ax.set_xticklabels([f"{b:g}" for b in budgets])
    ax.set_xlabel("budget (fraction of visual tokens kept)")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"{Path(report['model']).name}: {report['dataset']} (n = {report['n']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""Reports of ``eval/bench_speed.py``: the markdown tables, issue 9's acceptance rows, the plot."""

from __future__ import annotations

import pathlib
from typing import Any

# -- tables -------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _pair(row: dict, key: str, spec: str) -> str:
    """``wall / cpu`` for a key pattern like ``"ttft{}_ms"`` (just the wall value where there is no CPU one)."""
    wall, cpu = row.get(key.format("")), row.get(key.format("_cpu"))
    return _fmt(wall, spec) if cpu is None else f"{_fmt(wall, spec)} / {_fmt(cpu, spec)}"


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        "# vtc speed benchmark",
        "",
        f"Machine: {m['device_name']}, {m['cpu_count']} CPU cores, torch {m['torch']} ({m['torch_threads']} "
        f"thread(s)), transformers {m['transformers']}, {s['dtype']}. Load average (1, 5, 15 min) at start "
        f"{s['load_start']}, at end {s['load_end']}. Wall time {s['seconds']:.0f} s.",
        "",
        f"Command: `{s['command']}`",
        "",
        (
            "Random weights: timings, token counts and FLOPs are real; generated text is meaningless. "
            if s["random_weights"]
            else ""
        )
        + "TTFT = `generate()` call to first-token logits (vision tower + projector + vtc + LLM prefill); decode = "
        "the following `new_tokens - 1` steps of the same calls. On a CPU each is measured on two clocks: wall time "
        "(what a user waits) and the process's CPU time (`time.process_time`, all threads), which time slices "
        "taken by other processes on a shared machine do not inflate. "
        f"Medians of {s['repeats']} calls per configuration and {2 * s['repeats']} for the uncompressed baseline, "
        "interleaved round-robin in shuffled order; [best] = fastest call over fastest call, on the CPU clock "
        "(the idle-machine estimate). Ideal "
        "speed-ups: *LLM-only* = analytic LLM prefill FLOPs ratio (`vtc.flops`, as in the record); *end-to-end* = "
        "ratio of the model FLOPs counted while it runs (vision tower + projector + LLM + LM head; the vision tower "
        "runs at full cost for every method here); *real-scale* = end-to-end ratio computed analytically for the "
        "real checkpoint on the same prompt. vtc ms = vtc's own time before the first token measured from outside "
        "(`session.prepare` minus the model's own vision encoding, plus vtc's hook computations), in brackets "
        "`record.seconds_in_vtc`; per decode step: vtc's hooks during decoding (in-LLM methods). vtc GFLOPs = FLOPs "
        "of vtc's own ops (similarities, vision signals) beyond the model's.",
        "",
        f"Peak memory of one prefill: {s['memory_method']}"
        + (
            f"; a 64 MiB tensor made and freed inside a measured call reads {s['memory_calibration_mib']:.1f} MiB."
            if s.get("memory_calibration_mib") is not None
            else "."
        ),
    ]
    for entry in results["presets"]:
        lines += ["", f"## {entry['preset']}", "", entry["summary"] + ".", ""]
        if "skipped" in entry:
            lines.append(f"**{entry['skipped']}**")
            continue
        base = entry["baseline"]
        flops = base["flops"]
        clocks = " (wall / CPU)" if base.get("ttft_cpu_ms") is not None else ""
        vision = flops["vision"] + flops["projector"]
        ref = base.get("reference")
        ref_text = ""
        if ref:
            ref_text = (
                f" The real `{entry['reference']}` on the same prompt: {ref['total'] / 1e12:.2f} TFLOPs, vision "
                f"tower + projector {100 * ref['vision'] / ref['total']:.1f} %."
            )
        lines += [
            f"{entry['params_m']} M parameters, {entry['prompt_tokens']} prompt tokens, {entry['new_tokens']} new "
            f"tokens per call. Uncompressed prefill {flops['model'] / 1e9:.1f} GFLOPs, vision tower + projector "
            f"{100 * vision / flops['model']:.1f} %.{ref_text} "
            f"**Uncompressed: TTFT {_pair(base, 'ttft{}_ms', '.0f')} ms{clocks}, "
            f"decode {_pair(base, 'decode{}_tok_s', '.1f')} tok/s, peak memory {_fmt(base.get('peak_mib'), '.0f')} "
            f"MiB.** Measured in {entry['seconds']:.0f} s; load {entry['load_before']} -> {entry['load_after']}.",
            "",
            f"| method | budget | visual tokens | equiv. budget | TTFT ms{clocks} | speed-up{clocks} [best] "
            f"| ideal e2e | ideal LLM-only | % of e2e ideal{clocks} [best] | real-scale ideal "
            f"| vtc ms{clocks} (record) | vtc % of TTFT{clocks} | decode tok/s{clocks} | vtc ms per decode step "
            "| peak MiB | vtc GFLOPs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in entry["runs"]:
            if "skipped" in run:
                lines.append(f"| {run['method']} | {run['budget']} | {run['skipped']} |" + " |" * 13)
                continue
            real = ""
            if run.get("reference") and ref:
                real = f"{ref['total'] / run['reference']['total']:.2f}x"
            lines.append(
                f"| {run['method']} | {run['budget']} | {run['visual_tokens_kept']} / {run['visual_tokens_in']} "
                f"| {run['equivalent_budget']:.3f} | {_pair(run, 'ttft{}_ms', '.0f')} "
                f"| {_pair(run, 'speedup{}', '.2f')} [{run['speedup_best']:.2f}] | {run['ideal_e2e']:.2f} "
                f"| {run['ideal_llm']:.2f} | {_pair(run, 'of_ideal_e2e{}', '.0%')} [{run['of_ideal_e2e_best']:.0%}] "
                f"| {real} "
                f"| {_pair(run, 'vtc{}_ms', '.1f')} ({run['vtc_record_ms']:.1f}) | {_pair(run, 'vtc_share{}', '.1%')} "
                f"| {_pair(run, 'decode{}_tok_s', '.1f')} | {run['vtc_decode_step_ms']:.1f} "
                f"| {_fmt(run.get('peak_mib'), '.0f')} "
                f"| {run['flops']['vtc'] / 1e9:.2f} |"
            )
    rows = results.get("acceptance")
    if rows:
        lines += ["", "## Acceptance (issue 9): LLaVA-1.5 preset, budget 0.2 (wall / CPU time)", ""]
        for row in rows:
            lines.append(
                f"- {row['method']}: speed-up {_pair(row, 'speedup{}', '.2f')}x "
                f"[best-of-N {row['speedup_best']:.2f}x] = {_pair(row, 'of_ideal_e2e{}', '.0%')} "
                f"[{row['of_ideal_e2e_best']:.0%}] of the end-to-end ideal {row['ideal_e2e']:.2f}x "
                f"(>= 80 %: {_pair(row, 'speed_ok{}', '')}); vtc "
                f"{_pair(row, 'vtc_share{}', '.1%')} of TTFT (< 5 %: {_pair(row, 'vtc_ok{}', '')})"
            )
    return "\n".join(lines) + "\n"


def acceptance(results: dict) -> list[dict]:
    """Issue 9's criteria on the LLaVA-1.5 preset at budget 0.2, on both clocks."""
    rows = []
    for entry in results["presets"]:
        if entry["preset"] != "llava15" or "skipped" in entry:
            continue
        for run in entry["runs"]:
            if run["method"] not in ("hired", "visionzip", "divprune") or run["budget"] != 0.2 or "skipped" in run:
                continue
            row = {key: run[key] for key in ("method", "ideal_e2e", "speedup_best", "of_ideal_e2e_best")}
            for suffix in ("", "_cpu"):
                of_ideal, share = run.get(f"of_ideal_e2e{suffix}"), run.get(f"vtc_share{suffix}")
                row[f"speedup{suffix}"] = run.get(f"speedup{suffix}")
                row[f"of_ideal_e2e{suffix}"] = of_ideal
                row[f"vtc_share{suffix}"] = share
                row[f"speed_ok{suffix}"] = None if of_ideal is None else ("yes" if of_ideal >= 0.8 else "NO")
                row[f"vtc_ok{suffix}"] = None if share is None else ("yes" if share < 0.05 else "NO")
            rows.append(row)
    return rows


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in results["presets"] if "skipped" not in e and any("skipped" not in r for r in e["runs"])]
    if not entries:
        return
    counts = [sum("skipped" not in r for r in e["runs"]) for e in entries]
    fig, axes = plt.subplots(
        1, len(entries), figsize=(sum(1.5 + 0.75 * c for c in counts), 4.4), squeeze=False,
        gridspec_kw={"width_ratios": [1.5 + 0.75 * c for c in counts]},
    )  # fmt: skip
    for ax, entry in zip(axes[0], entries, strict=True):
        runs = [r for r in entry["runs"] if "skipped" not in r]
        ref = entry["baseline"].get("reference")
        labels = [f"{r['method']}\n{r['budget']}" for r in runs]
        x = range(len(runs))
        width = 0.2
        ax.bar([i - 1.5 * width for i in x], [r["speedup"] for r in runs], width, label="measured TTFT (wall)")
        if all(r.get("speedup_cpu") for r in runs):
            ax.bar([i - 0.5 * width for i in x], [r["speedup_cpu"] for r in runs], width, label="measured (CPU time)")
        ax.bar([i + 0.5 * width for i in x], [r["ideal_e2e"] for r in runs], width, label="ideal, end-to-end FLOPs")
        ax.bar([i + 1.5 * width for i in x], [r["ideal_llm"] for r in runs], width, label="ideal, LLM FLOPs only")
        if ref and all(r.get("reference") for r in runs):
            real = [ref["total"] / r["reference"]["total"] for r in runs]
            ax.scatter([i + 0.5 * width for i in x], real, marker="_", s=120, color="black", zorder=3,
                       label="ideal end-to-end, real checkpoint")  # fmt: skip
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("speed-up over uncompressed")
        ax.set_title(f"{entry['preset']} ({entry['prompt_tokens']} prompt tokens)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(
        f"vtc prefill speed-up, {m['device_name']}, {m['torch_threads']} thread(s); random weights", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_line(name: str, run: dict) -> str:
    if "skipped" in run:
        return f"[{name}] {run['method']} @ {run['budget']}: {run['skipped']}"
    return (
        f"[{name}] {run['method']} @ {run['budget']}: TTFT {_pair(run, 'ttft{}_ms', '.0f')} ms (wall / CPU) -> "
        f"{_pair(run, 'speedup{}', '.2f')}x (ideal e2e {run['ideal_e2e']:.2f}x, LLM-only {run['ideal_llm']:.2f}x); "
        f"vtc {_pair(run, 'vtc{}_ms', '.1f')} ms = {_pair(run, 'vtc_share{}', '.1%')}"
    )

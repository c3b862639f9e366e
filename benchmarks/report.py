"""Results -> JSON, Markdown and PNG plots."""

import json
from pathlib import Path

MiB = 2**20


def _ms(s: dict) -> str:
    return f"{s['median_ms']:.1f}"


def latency_table(point: dict) -> list:
    lines = [
        f"### batch {point['batch']}, sequence {point['seq']} ({point['gflop']:.1f} GFLOP per forward)",
        "",
        "| contender | median ms | IQR ms | p10–p90 ms | GFLOP/s | of GEMM ceiling | speed-up vs eager "
        "| time vs peer | max abs diff vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in point["contenders"].items():
        s = r["summary"]
        peer = f"{r['vs_peer']:.2f}" if r.get("vs_peer") is not None else ""
        diff = f"{r['max_abs_vs_eager']:.1e}" if r.get("max_abs_vs_eager") is not None else ""
        lines.append(
            f"| {name} | {_ms(s)} | {s['p25_ms']:.1f}–{s['p75_ms']:.1f} "
            f"| {s['p10_ms']:.1f}–{s['p90_ms']:.1f} "
            f"| {r['gflops']:.0f} | {r['of_ceiling']:.0%} | {r['speedup_vs_eager']:.2f}× | {peer} | {diff} |"
        )
    g = point["gemm"]
    lines += [
        "",
        "GEMM in the same rounds: "
        + ", ".join(f"{k.split()[1]} {v:.0f} GFLOP/s" for k, v in g["shapes"].items())
        + f"; ceiling for this point {g['ceiling_gflops']:.0f} GFLOP/s.",
    ]
    n = point.get("noise")
    lines += [
        "",
        f"Noise: `{n['twin']}` is `{n['of']}` timed again as its own contender; median ratio "
        f"{n['ratio']:.3f} ({abs(n['ratio'] - 1):.1%} apart)."
        if n
        else "Noise: not measured (the twin contender did not run).",
        "",
    ]
    return lines


ACCURACY_COLUMNS = [
    ("relative_error", "rel. error", "{:.3g}"),
    ("token_cosine_min", "token cos min", "{:.4f}"),
    ("sentence_cosine_min", "sentence cos min", "{:.4f}"),
    ("similarity_deviation_max", "similarity dev", "{:.3f}"),
    ("rank_agreement", "rank agreement", "{:.3f}"),
]


def speed_accuracy_table(r: dict) -> list:
    """Each contender's median time at the first point next to its accuracy against the float64 oracle."""
    acc = r["accuracy"]
    point = r["latency"][0] if r["latency"] else {"contenders": {}, "batch": "?", "seq": "?"}
    columns = [c for c in ACCURACY_COLUMNS if any(c[0] in v for v in acc["contenders"].values())]
    lines = [
        "## Speed and accuracy",
        "",
        f"Time at batch {point['batch']}, sequence {point['seq']}; accuracy against the float64 oracle on "
        f"{acc['inputs']}, worst over them, by the accuracy contract (docs/accuracy-contract.md).",
        "",
        "| contender | median ms | speed-up vs eager | "
        + " | ".join(c[1] for c in columns)
        + " | contract |",
        "|---|---:|---:|" + "---:|" * len(columns) + "---|",
    ]
    for name, a in acc["contenders"].items():
        timed = point["contenders"].get(name)
        ms = f"{timed['summary']['median_ms']:.1f}" if timed else "—"
        speed = f"{timed['speedup_vs_eager']:.2f}×" if timed else "—"
        cells = [fmt.format(a[key]) if key in a else "—" for key, _, fmt in columns]
        lines.append(
            f"| {name} | {ms} | {speed} | "
            + " | ".join(cells)
            + f" | {'holds' if a['contract'] else 'misses'} |"
        )
    return lines + [""]


def memory_table(memory: dict) -> list:
    runners = list(memory["runners"])
    lines = [
        "| sequence | floor MiB | + one fp32 L×L per head MiB | "
        + " | ".join(f"{r} MiB" for r in runners)
        + " |",
        "|---:|---:|---:|" + "---:|" * len(runners),
    ]
    for point in memory["points"]:
        f = point["floor"]
        cells = [
            f"{point['peak_mb'][r]:.0f}" if isinstance(point["peak_mb"][r], (int, float)) else "failed"
            for r in runners
        ]
        lines.append(
            f"| {point['seq']} | {f['floor'] / MiB:.0f} | {(f['floor'] + f['scores']) / MiB:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    errors = [f"- {p['seq']} {r}: {p['errors'][r]}" for p in memory["points"] for r in p.get("errors", {})]
    return lines + ([""] + errors if errors else [])


def pipeline_table(cost: dict) -> list:
    if "error" in cost:
        return [f"Pipeline run failed: {cost['error']}"]
    lines = [
        f"Whole process {cost['process_s']:.1f} s: imports {cost['imports_s']:.1f} s, export "
        f"{cost['export']['total_s']:.1f} s (exit {cost['export']['exit_code']}), validation "
        f"{cost['validate']['total_s']:.1f} s (exit {cost['validate']['exit_code']}).",
        "",
        "| step | stage | s |",
        "|---|---|---:|",
    ]
    for step in ("export", "validate"):
        for stage, s in sorted(cost[step]["stages_s"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {step} | {stage} | {s:.2f} |")
    return lines


def run_header(title: str, r: dict) -> list:
    """The first lines of a results.md: the title, then the command, when, the machine and the versions."""
    return [
        f"# {title}",
        "",
        f"- command: `{r['command']}`",
        f"- when: {r['started']} ({r['wall_s']:.0f} s)",
        f"- machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, "
        f"{r['machine']['memory_gib']:.0f} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
    ]


def markdown(results: dict) -> str:
    r = results
    g = r["gemm"]
    lines = [
        *run_header(f"qkv-bench: {r['model']} ({r['dtype']})", r),
        f"- settings: {r['settings']['note']}",
        f"- background load: other processes took "
        f"{r.get('machine_load', {}).get('other', 0):.0%} of all cores' "
        "time during the run",
        "",
        "## GEMM rate (ONNX Runtime, one fp32 MatMul), before the latency points",
        "",
        "Each latency point below also times GEMMs in its own rounds (the model's FFN shape and the first "
        "shape here); a point's share of the ceiling is against the better of those two.",
        "",
        "| shape (M×K×N) | median ms | GFLOP/s |",
        "|---|---:|---:|",
    ]
    for name, rate in g["shapes"].items():
        lines.append(f"| {name.split()[1]} | {g['summaries'][name]['median_ms']:.2f} | {rate:.0f} |")
    lines += ["", f"Best: {g['ceiling_gflops']:.0f} GFLOP/s ({g['ceiling_shape']}).", "", "## Latency", ""]
    if r.get("peer"):
        lines += [f"Peer: {r['peer']['how']}; fused ops {r['peer']['fused_ops']}.", ""]
    for point in r["latency"]:
        lines += latency_table(point)
    if r.get("accuracy"):
        lines += speed_accuracy_table(r)
    if r.get("targets"):
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in r["targets"]
        ]
        lines.append("")
    if r.get("memory"):
        lines += (
            [
                "## Peak memory of one encoder layer (hidden 768, 12 heads, FFN 3072, batch 1)",
                "",
                r["memory"]["note"],
                "",
            ]
            + memory_table(r["memory"])
            + [""]
        )
    if r.get("pipeline"):
        lines += [f"## Pipeline cost: qkv-export --model {r['model']} then qkv-validate", ""]
        lines += pipeline_table(r["pipeline"]) + [""]
    if r.get("profiles"):
        lines += ["## ORT profile (share of node time by op type, top 6)", ""]
        for key, ops in r["profiles"].items():
            lines.append(f"- {key}: " + ", ".join(f"{op} {share:.0%}" for op, share in list(ops.items())[:6]))
        lines.append("")
    lines += r.get("notes", [])
    return "\n".join(lines) + "\n"


def _plain(x):
    """numpy scalars -> Python numbers for JSON."""
    return x.item() if hasattr(x, "item") else str(x)


def write_json(results: dict, path: Path):
    path.write_text(json.dumps(results, indent=1, default=_plain) + "\n")


def plots(results: dict, out: Path) -> list:
    """latency.png (median ms vs sequence length per batch, log-log) and memory.png; [] with a note when
    matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        results.setdefault("notes", []).append(
            "matplotlib is not installed: no plots (pip install '.[bench]')."
        )
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = (
        [n for n in results["latency"][0]["contenders"] if not n.endswith("(again)")]
        if results["latency"]
        else []
    )
    batches = sorted({p["batch"] for p in results["latency"]})
    for i, name in enumerate(names):
        for j, batch in enumerate(batches):
            pts = sorted(
                (p["seq"], p["contenders"][name]["summary"]["median_ms"])
                for p in results["latency"]
                if p["batch"] == batch and name in p["contenders"]
            )
            ax.plot(
                *zip(*pts),
                color=f"C{i}",
                marker="os^vD"[j % 5],
                linestyle="-" if j == 0 else "--",
                label=f"{name}, batch {batch}",
            )
    seqs = sorted({p["seq"] for p in results["latency"]})
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length",
        ylabel="median latency (ms)",
        title=f"{results['model']} latency, ORT CPU vs PyTorch eager",
    )
    written.append(_save(plt, fig, ax, seqs, out / "latency.png"))
    if results.get("memory"):
        mem = results["memory"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        seqs = [p["seq"] for p in mem["points"]]
        for runner in mem["runners"]:
            pts = [
                (p["seq"], p["peak_mb"][runner]) for p in mem["points"] if p["peak_mb"][runner] is not None
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=runner)
        ax.plot(seqs, [p["floor"]["floor"] / MiB for p in mem["points"]], "k--", label="floor (no L×L)")
        ax.plot(
            seqs,
            [(p["floor"]["floor"] + p["floor"]["scores"]) / MiB for p in mem["points"]],
            "k:",
            label="floor + one fp32 L×L per head",
        )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length",
            ylabel="peak RSS above baseline (MiB)",
            title="one encoder layer (hidden 768, 12 heads), batch 1",
        )
        written.append(_save(plt, fig, ax, seqs, out / "memory.png"))
    if results.get("accuracy") and results["latency"]:
        written.append(_accuracy_plot(plt, results, out / "accuracy.png"))
    return written


def _accuracy_plot(plt, results: dict, path) -> str:
    """One point per contender: median time at the first point against its relative error to the oracle."""
    point = results["latency"][0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, a) in enumerate(results["accuracy"]["contenders"].items()):
        timed = point["contenders"].get(name)
        if timed is None:
            continue
        ms, err = timed["summary"]["median_ms"], max(a["relative_error"], 1e-9)
        ax.scatter(ms, err, color=f"C{i % 10}", marker="o" if a["contract"] else "x", s=50)
        ax.annotate(name, (ms, err), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0.2, color="red", linestyle="--", linewidth=1, label="contract: relative error 0.2")
    ax.set(
        yscale="log",
        xlabel=f"median ms at {point['batch']}x{point['seq']}",
        ylabel="relative error vs float64 oracle (worst)",
        title="speed and accuracy (x: misses the contract)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _save(plt, fig, ax, seqs: list, path) -> str:
    """Sequence-length ticks, legend, write the PNG; its file name."""
    ax.set_xticks(seqs, [str(x) for x in seqs])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name

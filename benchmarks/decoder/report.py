"""results.md of `qkv-bench decoder`: per-model tables, the memory section and its recommendation."""

from ..report import run_header
from .measure import growth
from .options import EAGER, MiB


def _cell(point: dict | None, name: str, key: str, fmt) -> str:
    if point is None:
        return "—"
    c = point["contenders"].get(name)
    if c is None:
        return "failed" if name in point["errors"] else "—"
    value = c["summary"]["median_ms"] if key == "ms" else c.get(key)
    return fmt(value) if value is not None else "—"


def _num(value: float) -> str:
    """Three significant figures below 100, whole numbers above."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def model_table(name: str, m: dict, r: dict) -> list:
    cfg = m["config"]
    kv = cfg["num_kv_heads"] or cfg["num_heads"]
    decodes = [k for k in m["points"] if k.startswith("decode")]
    prefills = [k for k in m["points"] if k.startswith("prefill")]
    lines = [
        f"## {name} ({m['parameters']:,} parameters: {cfg['num_layers']} layers, "
        f"hidden {cfg['hidden_size']}, "
        f"{cfg['num_heads']} heads / {kv} kv, FFN {cfg['ffn_size']}, vocab {cfg['vocab_size']})",
        "",
        f"Checkpoint: {m['checkpoint']}; every contender reads it.",
        "",
        "| contender | "
        + " | ".join(f"tokens/s {k.split()[1]}" for k in decodes)
        + " | "
        + " | ".join(f"prefill ms {k.split()[1]}" for k in prefills)
        + " | "
        + " | ".join(
            f"vs eager {k.replace('decode ', 'decode ').replace('prefill ', 'prefill ')}"
            for k in decodes + prefills
        )
        + " | greedy = eager |",
        "|---|" + "---:|" * (2 * (len(decodes) + len(prefills))) + "---|",
    ]
    names = list(m["contenders"]) + [n for n in m["skipped"] if n not in m["contenders"]]
    for n in names:
        if n in m["skipped"]:
            lines.append(f"| {n} | " + " | ".join(["—"] * (2 * (len(decodes) + len(prefills)))) + " | — |")
            continue
        points = m["points"]
        cells = [_cell(points[k], n, "tokens_per_s", _num) for k in decodes]
        cells += [_cell(points[k], n, "ms", _num) for k in prefills]
        cells += [_cell(points[k], n, "speedup_vs_eager", "{:.2f}×".format) for k in decodes + prefills]
        check = m["check"]["by"].get(n)
        verdict = "(reference)" if n == EAGER else ("yes" if check and check["equal"] else "**no**")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {verdict} |")
    lines.append("")
    for n, why in m["skipped"].items():
        lines.append(f"- {n}: {why}")
    c = m["check"]
    lines += [
        f"- greedy check: {c['steps']} greedy tokens at batch {c['batch']} from the same prompt, "
        "each contender "
        f"against eager's: "
        + ", ".join(
            f"{n} " + ("equal" if v["equal"] else f"DIFFERENT ({v.get('first_diff') or v.get('error', '')})")
            for n, v in c["by"].items()
        )
        + f" (eager's smallest top-2 logit margin over them {c['eager_min_margin']:.3g}).",
    ]
    spread = []
    for k, p in m["points"].items():
        cells = [
            f"{n} {c['summary']['median_ms']:.1f} ({c['summary']['p25_ms']:.1f}–{c['summary']['p75_ms']:.1f})"
            for n, c in p["contenders"].items()
        ]
        spread.append(f"  - {k}: " + "; ".join(cells))
    lines += ["- median ms per timed run (IQR):", *spread]
    for n, b in m["build"].items():
        if "ops" in b:
            fused = [f"{op} {k}" for op, k in b["ops"].items() if "Attention" in op or "Norm" in op]
            lines.append(
                f"- {n}: built in {b['s']:.0f} s; {sum(b['ops'].values())} nodes, of them " + ", ".join(fused)
            )
    return lines + [""]


def memory_section(mem: dict) -> list:
    f = mem["floor"]
    seq = mem["seq"]
    lines = [
        f"## Attention memory of a {seq}-token prefill (batch 1, float32)",
        "",
        f"One node: {mem['shape']}, its fused attention op cut from each artifact, alone in a fresh process "
        "(benchmarks/decoder/memory.py); peak RSS above the process once the session exists. Floor: Q, K, V, "
        "the output and the cache it returns (present key and value), O(L·d). The mask comes in as the "
        "artifact's graph builds it (a (1, 1, L, L) boolean for Attention, an additive (1, 1, L, L) float32 "
        "bias for GroupQueryAttention) and counts in the peak.",
        "",
        "| backend | op | peak MiB | floor MiB | floor + its mask input MiB | peak / floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for backend, b in mem["backends"].items():
        mask = f["mask_bool"] if b["op"] == "Attention" else f["bias_fp32"]
        lines.append(
            f"| {backend} | {b['op']} | {b['peak_mb']:.0f} | {f['floor'] / MiB:.0f} "
            f"| {(f['floor'] + mask) / MiB:.0f} "
            f"| {b['peak_mb'] * MiB / f['floor']:.1f}× |"
        )
    lines.append("")
    lines.append(
        f"For scale: one fp32 L×L score matrix per head is {f['scores'] / MiB:.0f} MiB at L = {seq}."
    )
    for backend, e in mem["errors"].items():
        lines.append(f"- {backend}: {e}")
    if len(mem.get("scaling", [])) > 1:
        backends = list(mem["backends"])
        lines += [
            "",
            "How the peaks grow (MiB; the same node and process at each length):",
            "",
            "| L | " + " | ".join(backends) + " | floor | one fp32 L×L per head |",
            "|---:|" + "---:|" * (len(backends) + 2),
        ]
        for p in mem["scaling"]:
            cells = [f"{p['peak_mb'][b]:.0f}" if b in p["peak_mb"] else "failed" for b in backends]
            lines.append(
                f"| {p['seq']} | " + " | ".join(cells) + f" | {p['floor']['floor'] / MiB:.0f} "
                f"| {p['floor']['scores'] / MiB:.0f} |"
            )
        lines.append("")
        for b in backends:
            g = growth(mem, b, mem["backends"][b]["op"])
            if g:
                above = ", ".join(f"{mb:.0f} at {seq}" for seq, mb in g[1])
                lines.append(
                    f"- {b}: the peak above the floor and its mask input ({above} MiB) grows as L^{g[0]:.1f} "
                    "between the two longest."
                )
    lines += ["", recommendation(mem), ""]
    return lines


def recommendation(mem: dict) -> str:
    b = mem["backends"]
    if len(b) < 2:
        return "Not both backends measured: no recommendation."
    best = min(b, key=lambda k: b[k]["peak_mb"])
    other = next(k for k in b if k != best)
    scores = mem["floor"]["scores"] / MiB
    ratio = b[other]["peak_mb"] / max(b[best]["peak_mb"], 1e-9)
    if ratio < 1.5:
        return (
            f"At {mem['seq']} tokens the two backends' attention peaks are within 1.5× of each other "
            f"({best} {b[best]['peak_mb']:.0f} MiB, {other} {b[other]['peak_mb']:.0f} MiB): "
            "no memory reason to "
            "pick one at this length."
        )
    text = (
        f"Long contexts: **{best}**. At {mem['seq']} tokens its attention peaked at {b[best]['peak_mb']:.0f} "
        f"MiB, {other}'s at {b[other]['peak_mb']:.0f} MiB ({ratio:.1f}×)"
    )
    if b[other]["peak_mb"] >= 0.8 * scores:
        text += (
            f", about the {scores:.0f} MiB of one fp32 L×L score matrix per head: "
            "ONNX Runtime's CPU kernel for "
            f"{b[other]['op']} materializes the scores, so its memory grows with L², while "
            f"{b[best]['op']} stays within "
            f"{b[best]['peak_mb'] * MiB / mem['floor']['floor']:.1f}× the O(L·d) floor."
        )
        if b[best]["op"] == "GroupQueryAttention":
            text += (
                f" Its one L² term left is the graph's, not the kernel's: the additive fp32 padding bias "
                f"(1, 1, L, L) the ort-contrib graph builds, {mem['floor']['bias_fp32'] / MiB:.0f} MiB here "
                "(4·L² bytes)."
            )
    else:
        text += "."
    return text


def markdown(r: dict) -> str:
    lines = run_header(f"qkv-bench decoder: {', '.join(r['models'])} (float32)", r)
    if r.get("genai_versions"):
        g = r["genai_versions"]
        lines.append(
            f"- onnxruntime-genai {g['genai']} on onnxruntime {g['onnxruntime']} (its own environment)"
        )
    lines += [
        f"- settings: {r['settings']['note']}",
        "- background load: other processes took "
        f"{r.get('machine_load', {}).get('other', 0):.0%} of all cores' "
        "time during the run",
        "",
    ]
    for name, m in r["models"].items():
        lines += model_table(name, m, r)
    if r.get("memory"):
        lines += memory_section(r["memory"])
    lines += r.get("notes", [])
    return "\n".join(lines) + "\n"

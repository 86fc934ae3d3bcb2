"""The one chart: a scorecard of every target, and the figures behind the main ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import num

GREEN, RED, GREY = "#2e7d32", "#c62828", "#9e9e9e"
SERVICE, BASELINE = "#1565c0", "#ef6c00"


LOW, HIGH = 1 / 16, 16.0  # the scorecard's axis: measured / target, clamped


def _score(x: float, target: float, better: str) -> float:
    """Measured over target, >= 1 when met, whatever the direction; clamped to the axis."""
    if better == "higher":
        return min(max(x / target, LOW), HIGH) if target else HIGH
    # lower is better; at or below zero is as good as it gets
    return min(max(target / x, LOW), HIGH) if x > 0 else HIGH


def _label(r: dict[str, Any]) -> str:
    name = r["metric"].replace("orchestration: ", "orch: ")
    v = r["value"]
    sign = ">=" if r["better"] == "higher" else "<="
    measured = "skipped" if v is None else f"{num(v['median'])} {r['unit']}"
    return f"{name}\n{measured}  (target {sign} {r['target']:g} {r['unit']})"


def _scorecard(ax: Any, rows: list[dict[str, Any]]) -> None:
    scored = [r for r in rows if r["target"] is not None]
    if not scored:
        ax.text(0.5, 0.5, "no targets measured", ha="center", va="center")
        ax.axis("off")
        return
    labels, scores, lows, highs, colours = [], [], [], [], []
    for r in reversed(scored):
        labels.append(_label(r))
        v = r["value"]
        if v is None:
            scores.append(1.0)
            lows.append(0.0)
            highs.append(0.0)
            colours.append(GREY)
            continue
        s = _score(v["median"], r["target"], r["better"])
        ends = sorted(_score(v[k], r["target"], r["better"]) for k in ("min", "max"))
        scores.append(s)
        lows.append(max(s - ends[0], 0.0))
        highs.append(max(ends[1] - s, 0.0))
        colours.append(GREEN if r["status"] == "PASS" else RED)
    y = list(range(len(labels)))
    ax.barh(y, scores, color=colours, alpha=0.85, height=0.6)
    ax.errorbar(scores, y, xerr=[lows, highs], fmt="none", ecolor="black", lw=1, capsize=3)
    ax.axvline(1.0, color="black", lw=1.2, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlim(LOW / 2, HIGH)  # clamped values still show as a stub
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel(
        "measured vs target (log2, clamped; right of the dashed line meets it;"
        " bar: median of rounds, whiskers: min..max)",
        fontsize=8,
    )
    ax.set_title("Targets (green: met, red: missed, grey: skipped)", loc="left", fontweight="bold")


def _latency(ax: Any, orch: dict[str, Any] | None) -> None:
    ax.set_title(
        "Job latency vs concurrency (ImageUpscale, instant agents)", loc="left", fontsize=9
    )
    figures = (orch or {}).get("figures")
    if not figures:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    levels = sorted(int(k) for k in figures if k.isdigit())
    for who, colour in (("service", SERVICE), ("direct", BASELINE)):
        for q, style in (("p50", "-"), ("p99", "--")):
            key = f"{who}_{q}"
            ys = [figures[str(n)][key]["median"] for n in levels if key in figures[str(n)]]
            if len(ys) == len(levels):
                label = f"{'service (gRPC)' if who == 'service' else 'direct client'} {q}"
                ax.plot(levels, ys, style, color=colour, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xlabel("concurrent jobs")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)


def _pairs(
    ax: Any, title: str, unit: str, pairs: list[tuple[str, float, float, str]], baseline: str
) -> None:
    ax.set_title(title, loc="left", fontsize=9)
    if not pairs:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    x = list(range(len(pairs)))
    width = 0.38
    service = [p[1] for p in pairs]
    base = [p[2] for p in pairs]
    ax.bar([i - width / 2 for i in x], service, width, color=SERVICE, label="service")
    ax.bar([i + width / 2 for i in x], base, width, color=BASELINE, label=baseline)
    for i, p in enumerate(pairs):
        ax.text(i, max(p[1], p[2]), p[3], ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [p[0] for p in pairs], fontsize=7)
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)


def _memory(ax: Any, mem: dict[str, Any] | None) -> None:
    ax.set_title("Server RSS (aiserver serve)", loc="left", fontsize=9)
    f = (mem or {}).get("figures")
    if not f or "peak_mib" not in f:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    bars = [("idle at start", f.get("idle_start_mib")), ("peak, uploads", f.get("peak_mib"))]
    bars = [(name, v) for name, v in bars if v]
    ax.bar(
        [b[0] for b in bars],
        [b[1]["median"] for b in bars],
        color=[GREY, SERVICE][: len(bars)],
        yerr=[
            [b[1]["median"] - b[1]["min"] for b in bars],
            [b[1]["max"] - b[1]["median"] for b in bars],
        ],
        capsize=3,
    )
    ax.set_ylabel("MiB")
    lines = [str((mem or {}).get("setup", {}).get("uploads", ""))]
    for key, label in (
        ("idle_upload_64k_kib_per_caller", "per idle upload (64 KiB sent)"),
        ("idle_upload_1m_kib_per_caller", "per idle upload (1 MiB sent)"),
        ("watchjob_kib_per_caller", "per WatchJob caller"),
    ):
        if key in f:
            lines.append(f"{label}: {f[key]['median']:.1f} KiB")
    ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=7)


def draw(results: dict[str, dict[str, Any]], machine: dict[str, Any], mode: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for result in results.values() for r in result.get("rows", [])]
    fig = plt.figure(figsize=(17, 10), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1.5, 1, 1])
    _scorecard(fig.add_subplot(grid[:, 0]), rows)
    _latency(fig.add_subplot(grid[0, 1]), results.get("orchestration"))

    transport = results.get("transport", {}).get("figures", {})
    pairs = []
    for kind in ("read", "upload"):
        s, b = transport.get(f"service_{kind}"), transport.get(f"bare_{kind}")
        r = transport.get(f"{kind}_ratio")
        if s and b and r:
            pairs.append((kind, s["median"], b["median"], f"{r['median']:.2f}x"))
    title = "Transport MB/s (higher is better)"
    _pairs(fig.add_subplot(grid[0, 2]), title, "MB/s", pairs, "bare grpcio")

    imaging = results.get("imaging", {}).get("figures", {})
    pairs = []
    for op in ("crop", "convert_webp", "convert_png"):
        if op in imaging:
            f = imaging[op]
            pairs.append(
                (
                    op.replace("convert_", "-> "),
                    f["grpc_ms"]["median"],
                    f["in_process_ms"]["median"],
                    f"{f['ratio']['median']:.2f}x",
                )
            )
    cold = imaging.get("variant_cold", {})
    if "thumbor_ms" in cold:
        pairs.append(
            (
                "variant (thumbor)",
                cold["service_ms"]["median"],
                cold["thumbor_ms"]["median"],
                f"{cold['speedup']['median']:.2f}x",
            )
        )
    ax = fig.add_subplot(grid[1, 1])
    title = "Image tasks ms (lower is better)"
    _pairs(ax, title, "ms", pairs, "in-process / thumbor")
    if pairs:
        ax.set_yscale("log")
    _memory(fig.add_subplot(grid[1, 2]), results.get("memory"))
    passed = sum(r["status"] == "PASS" for r in rows)
    missed = sum(r["status"] == "MISS" for r in rows)
    fig.suptitle(
        f"aiserver benchmarks ({mode}) - {machine['date']} - {machine['cpu_count']} CPUs,"
        f" Python {machine['python']}, load {machine['load_average'][0]} at start -"
        f" {passed} targets met, {missed} missed",
        fontsize=11,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)

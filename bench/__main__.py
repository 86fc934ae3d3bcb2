"""Run every benchmark, print a table against the targets, write JSON and one chart.

    python -m bench            # full: several minutes; writes bench/results/
    python -m bench --quick    # smoke run, well under a minute; writes bench/results/quick/
    python -m bench --only orchestration,transport --out /tmp/bench

Every figure is the median of repeated rounds, with the range; the service and its baseline
alternate within each round. The machine is shared: the load average before and after each
script is recorded. Exit status 1 if a script failed (a missed target is not a failure).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, num

SCRIPTS = (
    "orchestration",
    "gateway_path",
    "transport",
    "imaging",
    "memory",
    "upscale",
    "scaleout",
)


def _fmt(value: dict[str, Any] | None) -> str:
    if value is None:
        return "-"
    m, lo, hi = value["median"], value["min"], value["max"]
    return f"{num(m)} [{num(lo)}..{num(hi)}]"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'metric':58s} {'median [min..max]':>25s} {'unit':6s} {'target':>9s} {'x tgt':>6s}"
        f" {'':4s}  baseline / note"
    ]
    for r in rows:
        target = ""
        if r["target"] is not None:
            target = f"{'>=' if r['better'] == 'higher' else '<='}{r['target']:g}"
        score = f"{r['score']:.2f}" if r["score"] is not None else ""
        extra = "; ".join(x for x in (r["baseline"], r["note"]) if x)
        lines.append(
            f"{r['metric'][:58]:58s} {_fmt(r['value']):>25s} {r['unit']:6s} {target:>9s}"
            f" {score:>6s} {r['status']:4s}  {extra}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (seconds)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SCRIPTS}")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results[/quick])")
    parser.add_argument("--no-chart", action="store_true", help="skip summary.png")
    parser.add_argument(
        "--redraw", action="store_true", help="only redraw summary.png from the JSON in --out"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCRIPTS)
    unknown = set(names) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown scripts: {', '.join(sorted(unknown))}")
    out: Path = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    if args.redraw:
        return redraw(out)
    info = machine()
    results: dict[str, dict[str, Any]] = {}
    failed = []
    started = time.perf_counter()
    for name in names:
        print(f"[bench] {name} ({mode}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
            result = module.run(args.quick)
        except Exception as exc:
            traceback.print_exc()
            failed.append(name)
            result = {
                "name": name,
                "error": f"{type(exc).__name__}: {exc}",
                "rows": [],
            }
        result["mode"] = mode
        result["machine"] = machine() | {"date_started": info["date"]}
        results[name] = result
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = [r for result in results.values() for r in result.get("rows", [])]
    summary = {
        "mode": mode,
        "machine": info,
        "load_average_at_end": machine()["load_average"],
        "seconds": round(time.perf_counter() - started, 1),
        "failed": failed,
        "rows": rows,
        "notes": {n: r.get("notes", []) for n, r in results.items() if r.get("notes")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(
        f"{mode} run, {info['date']}, {info['cpu_count']} CPUs, Python {info['python']},"
        f" load {info['load_average']} -> {summary['load_average_at_end']},"
        f" {summary['seconds']} s"
    )
    print(table(rows))
    for name, notes in summary["notes"].items():
        for note in notes:
            print(f"note ({name}): {note}")
    if not args.no_chart:
        try:
            from bench.chart import draw

            draw(results, info, mode, out / "summary.png")
            print(f"chart: {out / 'summary.png'}")
        except ImportError as exc:
            print(f"chart skipped: {exc} (pip install matplotlib)")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def redraw(out: Path) -> int:
    from bench.chart import draw

    summary = json.loads((out / "summary.json").read_text())
    results = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in SCRIPTS
        if (out / f"{name}.json").exists()
    }
    draw(results, summary["machine"], summary["mode"], out / "summary.png")
    print(f"chart: {out / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

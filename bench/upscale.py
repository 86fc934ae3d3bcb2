"""Embedded upscaler: seconds per input megapixel of the default model, through
``bench/upscale_local.py``.

That script is another engineer's, with its own ``main`` (speed of every model, then a
quality study: about ten minutes here). The suite imports it and times only what the service
runs by default, with the script's own pieces: its ``DEFAULT_MODEL`` through its
``upscale_image`` pipeline on its ``TIMING_SIDE`` and ``BIG_SIDE`` test images, its ``timed``
helper (a warm-up, then ``RUNS`` runs). If those pieces are not there (the script changed),
its ``main`` runs instead (``--quick``), and its report is read back. Skipped, with a note,
when the script or ncnn is missing, and in quick mode.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import ROOT
from bench.common import LoadWatch, row, spread

NAME = "upscale"
SCRIPT = ROOT / "bench" / "upscale_local.py"
RUNS = 3
PIECES = (
    "DEFAULT_MODEL",
    "MODELS",
    "TIMING_SIDE",
    "BIG_SIDE",
    "RealEsrganNet",
    "LocalUpscaleSettings",
    "landscape",
    "timed",
    "upscale_image",
)


def _result(
    rows: list[dict[str, Any]], notes: list[str], figures: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": NAME,
        "about": __doc__.strip().split("\n\n")[0],
        "notes": notes,
        "figures": figures,
        "rows": rows,
    }


def _skipped(why: str) -> dict[str, Any]:
    skipped = row("upscale: default model, s per input MP", None, "s/MP", better="lower", note=why)
    return _result([skipped], [why], {})


def _with_pieces(m: ModuleType) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    settings = m.LocalUpscaleSettings()
    net = m.RealEsrganNet(m.MODELS[m.DEFAULT_MODEL], settings.threads)
    speed = {}
    for seed, side in ((7, m.TIMING_SIDE), (8, m.BIG_SIDE)):
        img = m.landscape(np.random.default_rng(seed)).resize(
            (side, side), Image.Resampling.LANCZOS
        )
        runs = RUNS if side == m.TIMING_SIDE else 2
        timing = m.timed(
            functools.partial(m.upscale_image, img, net, tile_size=settings.tile_size), runs
        )
        mp = side * side / 1e6
        speed[f"{side}x{side}"] = spread([t / mp for t in timing["runs_s"]], 2)
    return {"model": m.DEFAULT_MODEL, "tile_size": settings.tile_size, "s_per_input_mp": speed}


def _with_main(m: ModuleType) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-upscale-"))
    out = tmp / "upscale_local.json"
    argv = sys.argv
    try:
        sys.argv = [str(SCRIPT), "--quick", "--runs", str(RUNS), "--out", str(out)]
        with contextlib.redirect_stdout(sys.stderr):
            m.main()
        report = json.loads(out.read_text())
    finally:
        sys.argv = argv
        shutil.rmtree(tmp, ignore_errors=True)
    default = report.get("default_model", "")
    speed = {}
    for model, f in report.get("speed", {}).items():
        if model == default or model.startswith(f"{default}@"):
            per_mp = [f["s_per_input_mp_median"]]
            speed[str(f.get("input", model))] = spread(per_mp, 2)
    return {"model": default, "s_per_input_mp": speed, "via": "main()"}


def run(quick: bool) -> dict[str, Any]:
    if quick:
        return _skipped("quick mode: the embedded upscaler is timed in full mode only")
    if not SCRIPT.exists():
        return _skipped("bench/upscale_local.py is not there")
    watch = LoadWatch()
    spec = importlib.util.spec_from_file_location("bench_upscale_local", SCRIPT)
    assert spec is not None and spec.loader is not None
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if all(hasattr(module, name) for name in PIECES):
            figures = _with_pieces(module)
        else:
            figures = _with_main(module)
    except (ImportError, OSError, RuntimeError, KeyError) as exc:
        return _skipped(f"bench/upscale_local.py could not run: {type(exc).__name__}: {exc}")
    rows = [
        row(
            f"upscale: {figures['model']} {size}, s per MP",
            value,
            "s/MP",
            better="lower",
            baseline="local ncnn provider, its default tile size",
        )
        for size, value in figures["s_per_input_mp"].items()
    ]
    result = _result(rows, [], figures)
    result["load"] = watch.done()
    return result

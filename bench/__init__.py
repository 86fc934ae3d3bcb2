"""Benchmarks: the service against its baselines, in one run (``python -m bench [--quick]``).

Each script module has ``run(quick: bool) -> dict``; ``bench/__main__.py`` runs them, prints a
table of figures against their targets, writes ``bench/results/*.json`` and one chart,
``bench/results/summary.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The ComfyUI stand-in lives in tests/support; the repository root must be importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

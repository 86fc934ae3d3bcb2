"""What a growing ``input/`` folder costs every prompt on a ComfyUI agent.

    python -m bench.agent_inputs [--sizes 10,2000,10000]

ComfyUI validates a prompt's ``LoadImage`` against its input types, and ``LoadImage``'s input
types are the folder's listing: every entry is listed, checked to be a file, its content type
guessed from its extension (cached per extension), and the names sorted (``nodes.py``
``LoadImage.INPUT_TYPES``, read in ComfyUI's source). This script times those same operations
on a folder of N small files (a temp directory, warm cache), median of repeats, for
N = the jobs left behind: 10 (what the service now leaves: the jobs in flight), 2,000 (an
afternoon of tests, as the issue measured 7.7 ms at 1,944 files on the agent's machine) and
10,000. Writes ``bench/results/agent_inputs.json``.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS

REPEATS = 30


def listing_cost(folder: Path) -> float:
    """Seconds for one listing the way LoadImage's input types build it."""
    start = time.perf_counter()
    names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]
    kinds: dict[str, str] = {}  # the content type by extension, guessed once (as ComfyUI does)
    images = []
    for name in names:
        extension = name.rsplit(".", 1)[-1]
        if extension not in kinds:
            kinds[extension] = (mimetypes.guess_type(name, strict=False)[0] or "").split("/")[0]
        if kinds[extension] == "image":
            images.append(name)
    sorted(images)
    return time.perf_counter() - start


def measure(sizes: list[int]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
        folder = Path(tmp)
        made = 0
        for size in sorted(sizes):
            while made < size:
                (folder / f"01JOB{made:021d}-image-{made:08x}.png").write_bytes(b"\x89PNG")
                made += 1
            runs = [listing_cost(folder) for _ in range(REPEATS)]
            figures[str(size)] = {
                "median_ms": round(statistics.median(runs) * 1000, 3),
                "min_ms": round(min(runs) * 1000, 3),
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,2000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {
        "name": "agent_inputs",
        "about": __doc__.strip().split("\n\n")[0],
        "per_prompt_listing_by_files": measure(sizes),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent_inputs.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

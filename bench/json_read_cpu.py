"""CPU of reading the service's JSON: orjson as on main, with a regex guard, and this tree's.

    python -m bench.json_read_cpu [--rounds 9] [--calls 20000]

One process; each round times every variant once per document (``time.process_time``), the
variants' order rotating from round to round. Documents as the service reads them: a job
row's outputs (one image and its random seed), a job row's spec (the image_to_image workflow
with a random seed), an agent's ``/history`` answer (the same prompt) and a progress frame.
Prints µs per read, median (min..max) over the rounds.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from aiserver import fast_json
from aiserver.tasks import MAX_SEED

_DIGITS_19 = re.compile(r"[0-9]{19}")


def _main_loads(text: str) -> Any:  # main before the fix
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _regex_guard_loads(text: str) -> Any:  # the review's sketch: 19 digits to the stdlib
    if _DIGITS_19.search(text) is not None:
        return json.loads(text)
    return _main_loads(text)


VARIANTS: dict[str, Callable[[str], Any]] = {
    "main": _main_loads,
    "regex [0-9]{19}": _regex_guard_loads,
    "this tree": fast_json.loads,
}


def _documents() -> dict[str, str]:
    seed = secrets.randbelow(MAX_SEED + 1)
    workflow = json.loads((Path("workflows") / "image_to_image.json").read_text())
    for node in workflow.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = seed
    outputs = [
        {
            "name": "out.png",
            "sha256": "ab" * 32,
            "size": 812_345,
            "mime_type": "image/png",
            "width": 1024,
            "height": 1024,
            "seed": seed,
            "node": "9",
        }
    ]
    spec = {
        "workflow": "image_to_image",
        "params": {"seed": seed, "strength": 0.6},
        "doc": workflow,
    }
    history = {"p": {"prompt": [3, "p", workflow, {}, ["9"]], "outputs": {}, "status": {}}}
    frame = {"type": "progress", "data": {"value": 7, "max": 20, "prompt_id": "p", "node": "7"}}
    return {
        "outputs row": fast_json.dumps_text(outputs),
        "spec row": fast_json.dumps_text(spec),
        "/history answer": json.dumps(history),
        "progress frame": json.dumps(frame),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    docs = _documents()
    names = list(VARIANTS)
    figures: dict[tuple[str, str], list[float]] = {(d, n): [] for d in docs for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for doc, text in docs.items():
            for name in order:
                loads = VARIANTS[name]
                start = time.process_time()
                for _ in range(args.calls):
                    loads(text)
                figures[doc, name].append((time.process_time() - start) / args.calls * 1e6)
    for doc, text in docs.items():
        print(f"{doc} ({len(text)} B):")
        for name in names:
            got = figures[doc, name]
            print(f"  {name:15s} {statistics.median(got):6.2f} µs ({min(got):.2f}..{max(got):.2f})")


if __name__ == "__main__":
    main()

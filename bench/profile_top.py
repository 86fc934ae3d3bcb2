"""The top lines of a py-spy profile, for the bench notes.

    py-spy record --format raw --threads -o prof.txt -- .venv/bin/python -m bench.transport
    .venv/bin/python -m bench.profile_top prof.txt [lines] [filter]

Prints the functions with the most samples of their own ("self"), then the functions whose
name contains ``filter`` (default ``aiserver``) by samples including their callees.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def summary(path: Path, lines: int = 15, needle: str = "aiserver") -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    out = [f"{total} samples", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(lines)]
    out.append(f"inclusive ({needle}):")
    picked = [(f, n) for f, n in inclusive.most_common() if needle in f and "<module>" not in f]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in picked[:lines]]
    return "\n".join(out)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    print(summary(Path(args[0]), int(args[1]) if len(args) > 1 else 15, *args[2:3]))

"""Generate (or check) the blocking Python client from the asyncio one.

``src/aiserver/client/_async.py`` is the one hand-written client; this writes
``src/aiserver/client/_sync.py`` from it by dropping ``async``/``await`` and renaming the
asyncio names (httpcore's "unasync" way), then formats it with ruff. ``--check`` fails when
``_sync.py`` differs from what it would write, so ``make test`` catches a hand edit or a
forgotten ``make client-sync``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "aiserver" / "client" / "_async.py"
TARGET = ROOT / "src" / "aiserver" / "client" / "_sync.py"

HEADER = '''\
# Generated from _async.py by tools/gen_sync_client.py (`make client-sync`): do not edit.
"""``Client``: every call of the imagetasks.v1 contract, on a blocking grpc channel.

The blocking twin of :class:`~aiserver.client.AsyncClient`, generated from ``_async.py``
(read that file's docstring for why). Every call has a deadline: its own ``timeout``, the
client's, or 300 s, so no call blocks forever.
"""
'''

# Whole words, in order: the asyncio spelling and the blocking one.
RENAMES = [
    ("AsyncClient", "Client"),
    ("JobStream", "SyncJobStream"),
    ("_io_async", "_io_sync"),
    ("AsyncIterator", "Iterator"),
    ("AsyncIterable", "Iterable"),
    ("StopAsyncIteration", "StopIteration"),
    ("__aenter__", "__enter__"),
    ("__aexit__", "__exit__"),
    ("__aiter__", "__iter__"),
    ("__anext__", "__next__"),
    ("aiter", "iter"),
    ("anext", "next"),
]
# mypy-protobuf's typed stubs: ``FooServiceAsyncStub`` (grpc.aio) -> ``FooServiceStub``.
_ASYNC_STUB = re.compile(r"\b(\w+Service)AsyncStub\b")
_KEYWORDS = [
    (re.compile(r"\basync def\b"), "def"),
    (re.compile(r"\basync for\b"), "for"),
    (re.compile(r"\basync with\b"), "with"),
    (re.compile(r"\bawait "), ""),
    (re.compile(r"\bgrpc\.aio\."), "grpc."),
]
_DOCSTRING = re.compile(r'\A""".*?"""\n', re.S)
# flake8-async's waivers mean nothing in blocking code (ruff would flag them as unused).
_ASYNC_NOQA = re.compile(r"(?m)^# ruff: noqa: ASYNC\d+\n")


def unasync(source: str) -> str:
    """The blocking module for the asyncio module ``source``."""
    body = _ASYNC_NOQA.sub("", _DOCSTRING.sub("", source, count=1))
    for pattern, replacement in _KEYWORDS:
        body = pattern.sub(replacement, body)
    for old, new in RENAMES:
        body = re.sub(rf"\b{re.escape(old)}\b", new, body)
    body = _ASYNC_STUB.sub(r"\1Stub", body)
    return HEADER + body


def formatted(code: str) -> str:
    """``code`` with its imports sorted and formatted, as ``make fmt`` would leave it."""
    ruff = str(Path(sys.executable).parent / "ruff")
    for command in (["check", "--fix", "--select", "I", "--quiet"], ["format"]):
        code = subprocess.run(
            [ruff, *command, "--stdin-filename", str(TARGET), "-"],
            input=code,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    return code


def generate(source: Path = SOURCE) -> str:
    return formatted(unasync(source.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--target", type=Path, default=TARGET)
    args = parser.parse_args(argv)
    code = generate(args.source)
    if not args.check:
        args.target.write_text(code)
        return 0
    current = args.target.read_text() if args.target.exists() else ""
    if current != code:
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            code.splitlines(keepends=True),
            fromfile=str(args.target),
            tofile="generated from " + str(args.source),
        )
        sys.stderr.writelines(diff)
        print(
            f"{args.target} is stale or was edited by hand; run `make client-sync`",
            file=sys.stderr,
        )
        return 1
    print(f"{args.target.name} matches {args.source.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

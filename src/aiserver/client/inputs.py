"""Upload inputs (a path, bytes, or a binary file object) read in 1 MiB chunks, and outputs
written as their bytes arrive. Blocking file I/O: the asyncio client runs it in a thread
(``aiserver.client._io_async``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeAlias, runtime_checkable

__all__ = [
    "CHUNK_SIZE",
    "Destination",
    "Input",
    "InputSource",
    "OutputSink",
    "Readable",
    "Writable",
]

CHUNK_SIZE = 1024 * 1024
"""Bytes per upload message: well under gRPC's 4 MiB default message limit."""


@runtime_checkable
class Readable(Protocol):
    """A binary file object open for reading."""

    def read(self, size: int = -1, /) -> bytes: ...


@runtime_checkable
class Writable(Protocol):
    """A binary file object open for writing (it is given bytes and memoryviews)."""

    def write(self, data: bytes | memoryview, /) -> int: ...


Input: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | Readable
"""An input file: a path (``str`` or ``PathLike``), its bytes, or a binary file object."""

Destination: TypeAlias = str | os.PathLike[str] | Writable
"""Where to write a result: a path (written to ``<path>.part``, then renamed) or a file."""


class InputSource:
    """One input of an upload. Paths are opened at once (so a missing file fails before any
    call is made) and read lazily, one chunk at a time: never whole into memory."""

    def __init__(self, field: str, value: Input, file_name: str | None = None) -> None:
        self.field = field
        self._data: memoryview | None = None
        self._file: Readable | None = None
        self._owned = False
        if isinstance(value, bytes | bytearray | memoryview):
            self._data = memoryview(value).cast("B")
            name = ""
        elif isinstance(value, str | os.PathLike):
            path = Path(value)
            self._file = path.open("rb")
            self._owned = True
            name = path.name
        elif isinstance(value, Readable):
            self._file = value
            raw_name = getattr(value, "name", "")
            name = os.path.basename(raw_name) if isinstance(raw_name, str) else ""
        else:
            raise TypeError(f"{field}: expected a path, bytes or a binary file, not {value!r}")
        self.file_name = file_name if file_name is not None else name

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes | memoryview]:
        """The file's bytes in pieces of at most ``size``; one empty piece for an empty file.
        Bytes in memory come as views of them (the message that carries a piece copies it)."""
        if self._data is not None:
            view = self._data
            for start in range(0, max(len(view), 1), size):
                yield view[start : start + size]
            return
        assert self._file is not None
        first = True
        while True:
            data = self._file.read(size)
            if not isinstance(data, bytes | bytearray):
                raise TypeError(f"{self.field}: the file object must be opened in binary mode")
            if not data:
                if first:
                    yield b""
                return
            first = False
            yield bytes(data)

    def close(self) -> None:
        if self._owned and self._file is not None:
            close = getattr(self._file, "close", None)
            if close is not None:
                close()
        self._file = None


class OutputSink:
    """Writes a result as it arrives. A path is written to ``<name>.part`` and renamed on
    :meth:`commit`; :meth:`abort` removes the partial file."""

    def __init__(self, out: Destination) -> None:
        self._path: Path | None = None
        self._part: Path | None = None
        self._file: Writable | None = None
        self.size = 0
        if isinstance(out, str | os.PathLike):
            self._path = Path(out)
            self._part = self._path.with_name(self._path.name + ".part")
        elif isinstance(out, Writable):
            self._file = out
        else:
            raise TypeError(f"out: expected a path or a binary file, not {out!r}")

    @property
    def path(self) -> Path | None:
        return self._path

    def write(self, data: bytes | memoryview) -> None:
        if self._file is None:
            assert self._part is not None
            self._part.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._part.open("wb")
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> None:
        if self._path is None:
            return
        assert self._part is not None
        if self._file is None:  # an empty result: still make the file
            self._part.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._part.open("wb")
        self._close()
        self._part.replace(self._path)

    def abort(self) -> None:
        if self._path is None:
            return
        self._close()
        assert self._part is not None
        self._part.unlink(missing_ok=True)

    def _close(self) -> None:
        close = getattr(self._file, "close", None)
        if close is not None:
            close()

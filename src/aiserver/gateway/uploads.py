"""Request bodies -> the request stream of an upload RPC (params first, then FileChunks).

``multipart/form-data`` is read part by part with aiohttp's streaming reader; nothing is held
whole in memory but a form of at most 256 KiB, read whole first and then split (by hand when
its shape is plain: ``_plain_parts``). The same rules hold either way:

* Text fields are collected (each at most ``max_field_bytes``, all together at most
  ``max_form_bytes``) until the first file part.
* A file part that comes after at least one text field is *streamed*: the params message is
  built from the fields seen so far and sent, then the file goes to the call chunk by chunk as
  it arrives. A text field after a streamed file is refused (400 ``FIELD_AFTER_FILE``):
  the params have already gone. AI Server's clients (ServiceStack, curl ``-F`` in order) send
  fields first.
* A file part that comes before any text field (a client that sends files first) is spooled
  to an anonymous temporary file, and so is every later file, until the body ends; then the
  params are built from all the fields and the spooled files are replayed into the call.
* One file per input: a second part for the same name is refused (400 ``DUPLICATE_FILE``);
  at most ``max_files`` file parts a form (413 ``TOO_MANY_FILES``, before the part is read or
  spooled: each spooled file holds a descriptor until the body ends).
* Files together may not exceed ``max_upload_bytes`` (413 ``UPLOAD_TOO_LARGE``); the server
  enforces its own limit too and its ``UPLOAD_TOO_LARGE`` status maps to 413 as well.

A part is a file when its ``Content-Disposition`` has a ``filename``; its form name, lower
case, is the ``FileChunk.field`` (``image``, ``mask``). The server decides which inputs a task
takes.

``application/x-ndjson`` (or ``application/json``) bodies are read as grpc-gateway reads
client streams: one JSON request message per line, in protobuf's JSON mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.hdrs import CONTENT_DISPOSITION, CONTENT_ENCODING, CONTENT_TYPE
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.message import Message

from aiserver.gateway.connections import BodyDeadline
from aiserver.gateway.errors import GatewayError, Violation
from aiserver.gateway.routes import Upload, message_class

__all__ = [
    "ClientUploads",
    "FormFields",
    "UploadLimits",
    "check_length",
    "chunk_factory",
    "finish",
    "media_type",
    "send_multipart",
    "send_ndjson",
    "too_large",
    "write",
]

FormFields = list[tuple[str, str]]
OpenCall = Callable[[FormFields], Awaitable[Any]]
"""Builds the params from the fields, opens the call and writes the params message."""
ChunkMessage = Callable[[str, bytes, str], Message]
"""(field, data, file name) -> one request message carrying a FileChunk."""


@dataclass(frozen=True, slots=True)
class UploadLimits:
    max_upload_bytes: int = 64 * 1024 * 1024
    max_field_bytes: int = 64 * 1024
    max_form_bytes: int = 1024 * 1024
    max_fields: int = 256
    max_files: int = 8
    chunk_bytes: int = 1024 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    spool_dir: Path | None = None
    idle_timeout_s: float = 30.0
    total_timeout_s: float = 600.0

    def deadline(self, request: web.BaseRequest | None = None) -> BodyDeadline:
        """The read deadlines of one request body (408 when one passes); ``request``: the
        request whose body is read (reads of a body already in whole take no timer)."""
        body = request.content if request is not None else None
        return BodyDeadline(self.idle_timeout_s, self.total_timeout_s, body)


UPLOADS_RETRY_S = 5


class ClientUploads:
    """Uploads open per client address, at most ``limit`` each (0: no limit): one more is 429
    ``TOO_MANY_UPLOADS`` with ``Retry-After``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, request: web.BaseRequest) -> Iterator[None]:
        host = request.remote or ""
        if not self.limit:
            yield
            return
        if self.open.get(host, 0) >= self.limit:
            raise GatewayError(
                429,
                "TOO_MANY_UPLOADS",
                f"this client address has {self.limit} uploads open already; retry when one"
                " has finished",
                headers={"Retry-After": str(UPLOADS_RETRY_S)},
                meta={"limit": str(self.limit)},
            )
        self.open[host] = self.open.get(host, 0) + 1
        try:
            yield
        finally:
            left = self.open[host] - 1
            if left:
                self.open[host] = left
            else:
                del self.open[host]


_PLAIN_MEDIA_TYPE = re.compile(r"[ \t]*([A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+)[ \t]*(?:;|$)")


def media_type(request: web.BaseRequest) -> str:
    """``request.content_type`` (lower case, without parameters), read without the email
    parser aiohttp uses when the type is plain: that parse costs about 0.5 ms, and a
    multipart body's random boundary defeats aiohttp's cache of it."""
    raw = request.headers.get(CONTENT_TYPE)
    if raw:
        m = _PLAIN_MEDIA_TYPE.match(raw)
        if m is not None:
            return m.group(1).lower()
    return request.content_type


def chunk_factory(upload: Upload, request_cls: Any) -> ChunkMessage:
    """Makes the request messages that carry one FileChunk each."""
    chunk_cls = message_class(upload.chunk)
    name = upload.chunk_field.name

    def make(field: str, data: bytes, file_name: str) -> Message:
        msg: Message = request_cls(**{name: chunk_cls(field=field, data=data, file_name=file_name)})
        return msg

    return make


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "UPLOAD_TOO_LARGE",
        f"the upload is larger than {limit} bytes",
        meta={"limit": str(limit)},
    )


def check_length(request: web.BaseRequest, limits: UploadLimits) -> None:
    """Refuse a declared body that cannot fit, before reading any of it."""
    length = request.content_length
    if length is not None and length > limits.max_upload_bytes + limits.max_form_bytes:
        raise too_large(limits.max_upload_bytes)


def malformed(message: str) -> GatewayError:
    return GatewayError(400, "MALFORMED_MULTIPART", message)


async def write(call: Any, msg: Message) -> bool:
    """Write one request; False when the server has already ended the call."""
    if call.done():
        return False
    try:
        await call.write(msg)
    except Exception:
        if call.done():
            return False
        raise
    return True


async def finish(call: Any) -> None:
    if not call.done():
        try:
            await call.done_writing()
        except Exception:
            if not call.done():
                raise


class _Spooled:
    def __init__(self, field: str, file_name: str, fh: IO[bytes]) -> None:
        self.field = field
        self.file_name = file_name
        self.fh = fh


async def send_multipart(
    request: web.Request,
    *,
    open_call: OpenCall,
    chunk_message: ChunkMessage,
    limits: UploadLimits,
    initial: Sequence[tuple[str, str]] = (),
) -> Any:
    """Read the multipart body into a new call (see the module doc); returns the call, written
    and half-closed, or ended early by the server (its status tells why)."""
    check_length(request, limits)
    deadline = limits.deadline(request)
    whole, reader = await _form_parts(request, deadline)
    fields: FormFields = list(initial)
    files_seen: set[str] = set()
    form_bytes = 0
    file_bytes = 0
    call: Any = None
    spooled: list[_Spooled] = []
    streaming: bool | None = None
    ok = False
    temp_files = contextlib.ExitStack()
    try:
        while True:
            part: BodyPartReader | MultipartReader | _WholePart | None
            if whole is not None:
                part = next(whole, None)
            else:
                assert reader is not None
                try:
                    part = await deadline.read(reader.next())
                except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
                    raise malformed(f"malformed multipart body: {_reason(exc)}") from None
            if part is None:
                break
            if isinstance(part, MultipartReader):
                raise malformed("nested multipart parts are not supported")
            name: str | None
            file_name: str | None
            if isinstance(part, _WholePart):
                name, file_name = part.name, part.file_name
            else:
                name, file_name = _disposition(part)
            if name is None:
                raise malformed("a part has no name")
            if file_name is None:
                if streaming:
                    raise GatewayError(
                        400,
                        "FIELD_AFTER_FILE",
                        f"field {name!r} came after a file; send text fields before files",
                        [Violation(name, "FIELD_AFTER_FILE", "send text fields before files")],
                    )
                if isinstance(part, _WholePart):
                    value = _whole_text(part, name, limits)
                else:
                    value = await _read_text(part, name, limits, deadline)
                form_bytes += len(value)
                if len(fields) >= limits.max_fields or form_bytes > limits.max_form_bytes:
                    raise GatewayError(413, "FORM_TOO_LARGE", "too many or too large text fields")
                fields.append((name, value))
                continue
            field = name.lower()
            if field in files_seen:
                raise GatewayError(
                    400,
                    "DUPLICATE_FILE",
                    f"two files for {name!r}; send one file per input",
                    [Violation(name, "DUPLICATE_FILE", "one file per input")],
                )
            if len(files_seen) >= limits.max_files:
                raise GatewayError(
                    413,
                    "TOO_MANY_FILES",
                    f"file {name!r} is one more than the {limits.max_files} files a form may carry",
                    [Violation(name, "TOO_MANY_FILES", f"at most {limits.max_files} files")],
                    meta={"limit": str(limits.max_files)},
                )
            files_seen.add(field)
            if streaming is None:
                streaming = len(fields) > len(initial)
            if streaming:
                if call is None:
                    call = await open_call(fields)
                first = True
                async for data in _part_chunks(part, limits, deadline):
                    file_bytes += len(data)
                    if file_bytes > limits.max_upload_bytes:
                        raise too_large(limits.max_upload_bytes)
                    if not await write(
                        call, chunk_message(field, data, file_name if first else "")
                    ):
                        return call  # the server ended the call: its status says why
                    first = False
                if first and not await write(call, chunk_message(field, b"", file_name)):
                    return call
            else:
                # Closed (and so deleted) by the exit stack in ``finally``.
                fh = temp_files.enter_context(
                    tempfile.TemporaryFile(dir=limits.spool_dir, prefix="aiserver-gateway-")  # noqa: SIM115
                )
                spooled.append(_Spooled(field, file_name, fh))
                async for data in _part_chunks(part, limits, deadline):
                    file_bytes += len(data)
                    if file_bytes > limits.max_upload_bytes:
                        raise too_large(limits.max_upload_bytes)
                    await asyncio.to_thread(fh.write, data)
        if call is None:
            call = await open_call(fields)
        for item in spooled:
            await asyncio.to_thread(item.fh.seek, 0)
            first = True
            while data := await asyncio.to_thread(item.fh.read, limits.chunk_bytes):
                if not await write(
                    call, chunk_message(item.field, data, item.file_name if first else "")
                ):
                    return call
                first = False
            if first and not await write(call, chunk_message(item.field, b"", item.file_name)):
                return call
        await finish(call)
        ok = True
        return call
    finally:
        temp_files.close()
        if not ok and call is not None and not call.done():
            call.cancel()


_WHOLE_FORM_BYTES = 256 * 1024
"""A form up to this size (the common upload: a few fields and an image of some kB) is read
whole, then split by :func:`_plain_parts` when its shape is plain; any other goes to
aiohttp's reader (a larger one streams into the call as it arrives). aiohttp's reader cost
about 0.2-0.25 ms of CPU per form (its coroutine steps per line and chunk, and its RFC 7578
``_charset_`` check parsing the first part's Content-Disposition again), the split about
10 us."""
_PLAIN_BOUNDARY = re.compile(
    r"[ \t]*multipart/form-data[ \t]*;[ \t]*boundary="
    r"""(?:"([A-Za-z0-9'()+_,./:=?-]{1,70})"|([A-Za-z0-9'+_.-]{1,70}))[ \t]*""",
    re.IGNORECASE,
)
"""A Content-Type with its boundary and nothing else, quoted or a plain token."""
_UTF8_TEXT = re.compile(rb"text/plain(?:[ \t]*;[ \t]*charset=utf-?8)?", re.IGNORECASE)
"""A text field's Content-Type that names UTF-8 (aiohttp's client sends one), or none."""


@dataclass(frozen=True, slots=True)
class _WholePart:
    """A part of a form held in memory (:func:`_plain_parts`)."""

    name: str
    file_name: str | None
    data: memoryview


async def _form_parts(
    request: web.Request, deadline: BodyDeadline
) -> tuple[Iterator[_WholePart] | None, MultipartReader | None]:
    """The parts of a small plain form, read whole first (each read within the deadlines),
    or aiohttp's reader of the body."""
    m = _PLAIN_BOUNDARY.fullmatch(request.headers.get(CONTENT_TYPE, ""))
    length = request.content_length
    if (
        m is None
        or length is None
        or length > _WHOLE_FORM_BYTES
        or CONTENT_ENCODING in request.headers  # its length says nothing of what it holds
    ):
        try:
            return None, await request.multipart()
        except (AssertionError, ValueError, KeyError) as exc:
            raise malformed(f"not a multipart body: {exc}") from None
    pieces = []
    while piece := await deadline.read(request.content.readany()):
        pieces.append(piece)
    data = b"".join(pieces)
    parts = _plain_parts(data, (m.group(1) or m.group(2)).encode())
    if parts is not None:
        return iter(parts), None
    # Another shape: aiohttp reads it, from the bytes already taken off the connection. Its
    # reader must not pause or resume the connection: that body is over, and pausing it now
    # (what a reader over more than twice its limit does) breaks aiohttp's parser (a 500).
    loop = asyncio.get_running_loop()
    again = StreamReader(_InMemory(loop), max(2**16, len(data)), loop=loop)
    again.feed_data(data)
    again.feed_eof()
    try:
        return None, MultipartReader(request.headers, again)
    except (AssertionError, ValueError, KeyError) as exc:
        raise malformed(f"not a multipart body: {exc}") from None


class _InMemory(BaseProtocol):
    """The protocol of a reader over bytes already in memory: no connection to pause."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


_HEAD_BYTES = b"\t" + bytes(range(0x20, 0x7F))
"""The bytes of a plain head line, printable ASCII or a tab: aiohttp's header parser
refuses control bytes (a bare CR or LF too), and reads others otherwise."""
_MAX_HEAD_LINE = 8190
"""aiohttp's longest header line."""


def _plain_parts(body: bytes, boundary: bytes) -> list[_WholePart] | None:
    """The parts of ``body`` when each is plain: delimiters with nothing around them (and
    nothing but white space after the closing one on its line), each part's head a plain
    Content-Disposition (:func:`_plain_disposition`) with a name, other than ``_charset_``,
    and at most a Content-Type (a text field's: ``text/plain`` in UTF-8; a file's: not
    ``multipart/*``), in printable ASCII, lines of at most 8190 bytes, and a part that does
    not start with a delimiter; None for any other shape, which aiohttp's reader then reads
    (and refuses as it does).

    The intent, checked by differential tests rather than proven: for every body split here,
    ``send_multipart`` ends as it does with aiohttp's reader over the same bytes (the same
    fields, file bytes and names, or the same error code); ``tests/gateway/test_plain_forms.py``
    compares the two on the shapes clients send, about 30 shapes the first split got wrong
    or that border them, and 3,000 seeded random forms. Some forms aiohttp would read alike
    are left to it too (a cost, not a difference)."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    separator = b"\r\n" + delimiter
    view = memoryview(body)
    parts: list[_WholePart] = []
    pos = len(delimiter) + 2
    while True:
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return None
        plain: tuple[str | None, str | None] | None = None
        media: bytes | None = None
        for line in body[pos:head_end].split(b"\r\n"):
            key, colon, value = line.partition(b":")
            if not colon or len(line) > _MAX_HEAD_LINE or line.translate(None, _HEAD_BYTES):
                return None
            key = key.lower()
            if key == b"content-disposition" and plain is None:
                plain = _plain_disposition(value.strip(b" \t").decode("ascii"))
                if plain is None:
                    return None
            elif key == b"content-type" and media is None:
                media = value.strip(b" \t")
            else:
                return None
        if plain is None:
            return None
        name, file_name = plain
        if name is None or name == "_charset_":
            return None
        if file_name is None and media is not None and not _UTF8_TEXT.fullmatch(media):
            return None  # a text field in another charset, or of another type
        if (
            media is not None
            and media.split(b";")[0].split(b"/")[0].strip().lower() == b"multipart"
        ):
            return None  # aiohttp reads such a part as a nested form
        start = head_end + 4
        if body.startswith(delimiter, start):
            return None  # an empty part: aiohttp's reader sees the delimiter, not data
        end = body.find(separator, start)
        if end < 0:
            return None
        parts.append(_WholePart(name, file_name, view[start:end]))
        after = end + len(separator)
        if body.startswith(b"\r\n", after):
            pos = after + 2
        elif body.startswith(b"--", after):
            if body[after + 2 :].split(b"\n", 1)[0].strip():
                return None  # aiohttp refuses the rest of the closing delimiter's line
            return parts
        else:
            return None


def _whole_text(part: _WholePart, name: str, limits: UploadLimits) -> str:
    """A text field held in memory, as :func:`_read_text` reads one (UTF-8: a plain part
    names no charset)."""
    if len(part.data) > limits.max_field_bytes:
        raise GatewayError(
            413,
            "FIELD_TOO_LARGE",
            f"field {name!r} is larger than {limits.max_field_bytes} bytes",
            [Violation(name, "FIELD_TOO_LARGE", "too large")],
        )
    try:
        return str(part.data, "utf-8")
    except UnicodeDecodeError:
        raise GatewayError(
            400,
            "INVALID_ENCODING",
            f"field {name!r} is not valid utf-8",
            [Violation(name, "INVALID_ENCODING", "not valid utf-8")],
        ) from None


async def _part_chunks(
    part: BodyPartReader | _WholePart, limits: UploadLimits, deadline: BodyDeadline
) -> AsyncIterator[bytes]:
    if not isinstance(part, _WholePart):
        async for data in _chunks(part, limits, deadline):
            yield data
        return
    size = max(min(limits.chunk_bytes, limits.max_message_bytes // 2), 64 * 1024)
    for at in range(0, len(part.data), size):
        yield bytes(part.data[at : at + size])


def _reason(exc: BaseException) -> str:
    # aiohttp's parser errors quote the offending bytes; say what kind of error it was only.
    if isinstance(exc, HttpProcessingError):
        return type(exc).__name__
    return str(exc)


_PLAIN_PARAM = re.compile(r'[ \t]*;[ \t]*([A-Za-z0-9_.-]+)="([^"\\;/][^"\\;]*|)"[ \t]*')
"""One ``; key="value"`` of a Content-Disposition whose value aiohttp would take as it is:
no escapes, no ``;``, no leading ``/`` (which aiohttp strips), no RFC 2231 ``key*``."""


def _plain_disposition(header: str) -> tuple[str | None, str | None] | None:
    """Name and file name of ``form-data; name="..."; filename="..."`` as aiohttp reads
    them, without its parser (about 0.2 ms a call, twice per part); None for any other
    shape, which aiohttp's parser reads."""
    if header[:9].lower() != "form-data":
        return None
    params: dict[str, str] = {}
    pos, end = 9, len(header)
    while pos < end:
        m = _PLAIN_PARAM.match(header, pos)
        if m is None:
            return None
        key = m.group(1).lower()
        if key in params:  # aiohttp refuses the header: its parser says how
            return None
        params[key] = m.group(2)
        pos = m.end()
    return params.get("name"), params.get("filename")


def _disposition(part: BodyPartReader) -> tuple[str | None, str | None]:
    header = part.headers.get(CONTENT_DISPOSITION)
    plain = _plain_disposition(header) if header else None
    if plain is not None:
        name, file_name = plain
    else:
        # aiohttp warns (RuntimeWarning) about odd Content-Disposition headers; the part's
        # name is what matters, and a missing one is reported to the caller.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name, file_name = part.name, part.filename
    for label, value in (("name", name), ("filename", file_name)):
        # aiohttp keeps undecodable header bytes as lone surrogates, which protobuf cannot
        # encode: refuse them here, as the client's mistake they are.
        if value is not None and not _is_utf8(value):
            raise GatewayError(
                400,
                "INVALID_ENCODING",
                f"a part's {label} is not valid UTF-8",
                [Violation(label, "INVALID_ENCODING", "not valid UTF-8")],
            )
    return name, file_name


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _read_text(
    part: BodyPartReader, name: str, limits: UploadLimits, deadline: BodyDeadline
) -> str:
    data = bytearray()
    while chunk := await _read_chunk(part, 64 * 1024, deadline):
        data += chunk
        if len(data) > limits.max_field_bytes:
            raise GatewayError(
                413,
                "FIELD_TOO_LARGE",
                f"field {name!r} is larger than {limits.max_field_bytes} bytes",
                [Violation(name, "FIELD_TOO_LARGE", "too large")],
            )
    charset = part.get_charset("utf-8")
    try:
        return bytes(data).decode(charset)
    except (LookupError, UnicodeDecodeError):
        raise GatewayError(
            400,
            "INVALID_ENCODING",
            f"field {name!r} is not valid {charset}",
            [Violation(name, "INVALID_ENCODING", f"not valid {charset}")],
        ) from None


async def _read_chunk(part: BodyPartReader, size: int, deadline: BodyDeadline) -> bytes:
    try:
        return await deadline.read(part.read_chunk(size))
    except (ValueError, AssertionError) as exc:
        raise malformed(f"malformed multipart body: {exc}") from None


async def _chunks(
    part: BodyPartReader, limits: UploadLimits, deadline: BodyDeadline
) -> AsyncIterator[bytes]:
    size = max(min(limits.chunk_bytes, limits.max_message_bytes // 2), 64 * 1024)
    while data := await _read_chunk(part, size, deadline):
        yield data


async def send_ndjson(
    request: web.Request,
    *,
    call: Any,
    request_cls: Any,
    limits: UploadLimits,
) -> Any:
    """Write one request message per JSON line of the body into ``call``."""
    check_length(request, limits)
    limit = limits.max_message_bytes * 2 + 1024
    buffer = bytearray()
    total = 0
    ok = False
    deadline = limits.deadline(request)
    try:
        while data := await deadline.read(request.content.readany()):
            total += len(data)
            if total > limits.max_upload_bytes * 2 + limits.max_form_bytes:
                raise too_large(limits.max_upload_bytes)
            buffer += data
            while (cut := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:cut])
                del buffer[: cut + 1]
                if not await _write_line(call, request_cls, line):
                    ok = True
                    return call
            if len(buffer) > limit:
                raise GatewayError(413, "MESSAGE_TOO_LARGE", "a request line is too long")
        if not await _write_line(call, request_cls, bytes(buffer)):
            ok = True
            return call
        await finish(call)
        ok = True
        return call
    finally:
        if not ok and not call.done():
            call.cancel()


async def _write_line(call: Any, request_cls: Any, line: bytes) -> bool:
    if not line.strip():
        return True
    msg = request_cls()
    try:
        json_format.Parse(line, msg)
    except (json_format.ParseError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GatewayError(400, "INVALID_JSON", f"a request line is not valid: {exc}") from None
    return await write(call, msg)

"""HTTP routes derived from the ``google.api.http`` annotations of the gRPC contract.

Nothing here is written per RPC: the routes are read from the service descriptors of the
generated modules at run time, and the path templates (``/v1/{name=jobs/*}:watch``) are parsed
into matchers following the grammar in ``google/api/http.proto``::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message_factory

from aiserver.gateway.fields import msg_type

__all__ = [
    "FILE_CHUNK",
    "JOB_EVENT",
    "PathTemplate",
    "Route",
    "RouteKind",
    "RouteMatch",
    "RouteTable",
    "TemplateError",
    "Upload",
    "contract_files",
    "load_routes",
    "message_class",
    "parse_template",
    "upload_of",
]

JOB_EVENT = "imagetasks.v1.JobEvent"
FILE_CHUNK = "imagetasks.v1.FileChunk"
CONTRACT_PACKAGE = "imagetasks.v1"


class TemplateError(ValueError):
    """A path template that does not follow the grammar."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A parsed path template: a regex over the path (without the verb) plus the verb."""

    template: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]
    """Field paths bound by the variables, in order (``name``, ``parent.id``)."""
    verb: str
    openapi_path: str
    """The template in OpenAPI form: ``/v1/{name=jobs/*}:watch`` -> ``/v1/jobs/{name}:watch``
    (the parameter holds what the wildcard matched)."""
    literal_segments: int
    """How many literal segments the template has (more literals: more specific)."""

    def match(self, path: str) -> dict[str, str] | None:
        """The variables bound by ``path`` (a raw, still percent-encoded path), or None."""
        if self.verb:
            head, sep, verb = path.rpartition(":")
            if not sep or "/" in verb or unquote(verb) != self.verb:
                return None
            path = head
        m = self.regex.fullmatch(path)
        if m is None:
            return None
        return {
            field: _decode(m.group(f"v{i}"), multi="/" in m.group(f"v{i}"))
            for i, field in enumerate(self.variables)
        }


def _decode(value: str, *, multi: bool) -> str:
    # As grpc-gateway does: a multi-segment match keeps its encoded slashes encoded.
    if multi:
        return "/".join(unquote(part) for part in value.split("/"))
    return unquote(value)


def parse_template(template: str) -> PathTemplate:
    if not template.startswith("/"):
        raise TemplateError(f"template must start with '/': {template!r}")
    depth = 0
    verb_at = -1
    for i, c in enumerate(template):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == ":" and depth == 0:
            verb_at = i
        if depth not in (0, 1):
            raise TemplateError(f"unbalanced braces in {template!r}")
    if depth:
        raise TemplateError(f"unbalanced braces in {template!r}")
    path, verb = (template[:verb_at], template[verb_at + 1 :]) if verb_at >= 0 else (template, "")
    if verb_at >= 0 and not verb:
        raise TemplateError(f"empty verb in {template!r}")
    regex: list[str] = []
    openapi: list[str] = []
    variables: list[str] = []
    literals = 0
    for segment in _top_level_split(path[1:]):
        if segment.startswith("{"):
            if not segment.endswith("}"):
                raise TemplateError(f"bad variable {segment!r} in {template!r}")
            field, eq, sub = segment[1:-1].partition("=")
            if eq and not sub:
                raise TemplateError(f"empty pattern for {field!r} in {template!r}")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", field):
                raise TemplateError(f"bad field path {field!r} in {template!r}")
            inner = sub.split("/") if sub else ["*"]
            regex.append(f"(?P<v{len(variables)}>{_segments_regex(inner, template)})")
            # OpenAPI cannot express `{name=jobs/*}`: the literals go into the path and the
            # wildcards become parameters (`/v1/jobs/{name}`), so that paths stay distinct.
            wild = [s for s in inner if s in ("*", "**")]
            n = 0
            for s in inner:
                if s in ("*", "**"):
                    n += 1
                    openapi.append("{" + field + (f"_{n}" if len(wild) > 1 else "") + "}")
                else:
                    openapi.append(s)
            variables.append(field)
        else:
            regex.append(_segments_regex([segment], template))
            openapi.append(segment)
            literals += segment not in ("*", "**")
    return PathTemplate(
        template=template,
        regex=re.compile("/" + "/".join(regex)),
        variables=tuple(variables),
        verb=verb,
        openapi_path="/" + "/".join(openapi) + (f":{verb}" if verb else ""),
        literal_segments=literals,
    )


def _top_level_split(path: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current = ""
    for c in path:
        if c == "/" and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (c == "{") - (c == "}")
        current += c
    parts.append(current)
    if any(not p for p in parts):
        raise TemplateError(f"empty segment in /{path!r}")
    return parts


def _segments_regex(segments: Sequence[str], template: str) -> str:
    out = []
    for s in segments:
        if s == "*":
            out.append("[^/]+")
        elif s == "**":
            out.append(".+")
        elif not s or any(c in s for c in "{}*"):
            raise TemplateError(f"bad segment {s!r} in {template!r}")
        else:
            out.append(re.escape(s))
    return "/".join(out)


class RouteKind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI_STREAM = "bidi_stream"


@dataclass(frozen=True, slots=True)
class Upload:
    """What a request message of an upload RPC looks like: ``oneof {params; FileChunk chunk}``."""

    params_field: descriptor.FieldDescriptor
    chunk_field: descriptor.FieldDescriptor

    @property
    def params(self) -> descriptor.Descriptor:
        return msg_type(self.params_field)

    @property
    def chunk(self) -> descriptor.Descriptor:
        return msg_type(self.chunk_field)


@dataclass(frozen=True, slots=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str
    template: PathTemplate
    body: str
    """``""`` (no body), ``"*"`` (the whole request) or a top-level field name."""
    response_body: str
    method: descriptor.MethodDescriptor

    @property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def kind(self) -> RouteKind:
        m = self.method
        if m.client_streaming and m.server_streaming:
            return RouteKind.BIDI_STREAM
        if m.client_streaming:
            return RouteKind.CLIENT_STREAM
        if m.server_streaming:
            return RouteKind.SERVER_STREAM
        return RouteKind.UNARY

    @property
    def operation_id(self) -> str:
        return f"{self.method.containing_service.name}_{self.method.name}"

    @property
    def upload(self) -> Upload | None:
        return upload_of(self.method) if self.method.client_streaming else None


def upload_of(method: descriptor.MethodDescriptor) -> Upload | None:
    """The params/chunk fields when ``method``'s requests follow the upload contract."""
    fields = method.input_type.fields_by_name
    params, chunk = fields.get("params"), fields.get("chunk")
    if (
        params is None
        or chunk is None
        or params.message_type is None
        or chunk.message_type is None
        or chunk.message_type.full_name != FILE_CHUNK
    ):
        return None
    return Upload(params, chunk)


def message_class(desc: Any) -> Any:
    return message_factory.GetMessageClass(desc)


def contract_files(package: str = CONTRACT_PACKAGE) -> list[descriptor.FileDescriptor]:
    """The file descriptors of every generated ``*_pb2`` module of ``package`` (imported)."""
    pkg = importlib.import_module(package)
    files = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"{package}.{info.name}")
            files.append(module.DESCRIPTOR)
    return files


def _rules(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    yield rule
    for extra in rule.additional_bindings:
        yield from _rules(extra)


def load_routes(files: Iterable[descriptor.FileDescriptor]) -> list[Route]:
    """Every HTTP binding of every annotated RPC in ``files``."""
    routes: list[Route] = []
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                for rule in _rules(options.Extensions[annotations_pb2.http]):
                    pattern = rule.WhichOneof("pattern")
                    if pattern is None:
                        continue
                    if pattern == "custom":
                        http_method, path = rule.custom.kind.upper(), rule.custom.path
                    else:
                        http_method, path = pattern.upper(), getattr(rule, pattern)
                    if rule.body not in ("", "*") and (
                        rule.body not in method.input_type.fields_by_name
                    ):
                        raise TemplateError(f"{method.full_name}: unknown body field {rule.body}")
                    routes.append(
                        Route(
                            http_method=http_method,
                            template=parse_template(path),
                            body=rule.body,
                            response_body=rule.response_body,
                            method=method,
                        )
                    )
    return routes


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    variables: dict[str, str]


class RouteTable:
    """Finds the route for a method and a raw path; verbs and more literal templates first."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = sorted(
            routes,
            key=lambda r: (not r.template.verb, -r.template.literal_segments, r.template.template),
        )

    def find(self, http_method: str, raw_path: str) -> tuple[RouteMatch | None, list[str]]:
        """The match, or None and the methods the path would allow (for a 405)."""
        method = "GET" if http_method == "HEAD" else http_method
        allowed: list[str] = []
        verb_matched = False
        for route in self.routes:  # verbs first
            variables = route.template.match(raw_path)
            if variables is None:
                continue
            if route.template.verb:
                verb_matched = True
            elif verb_matched:
                # ``/v1/jobs/x:cancel`` names the verb of another method: it is not also a
                # resource named ``x:cancel`` (which would make GET GetJob on it).
                continue
            if route.http_method == method:
                return RouteMatch(route, variables), []
            allowed.append(route.http_method)
        return None, sorted(set(allowed))

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)

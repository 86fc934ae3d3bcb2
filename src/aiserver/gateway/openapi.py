"""An OpenAPI 3.0 document built from the same descriptors as the routes.

Paths come from the ``google.api.http`` annotations (a variable such as ``{name=jobs/*}``
becomes ``/v1/jobs/{name}``: the parameter holds what the wildcard matched); schemas come from
the message descriptors, in protobuf's JSON mapping (64-bit integers as strings, enums by name,
``Timestamp`` as date-time, bytes in base64). The AI Server routes are added with their
multipart forms and response shapes. The generated modules carry no source info, so the
descriptions are short ones made here rather than the proto comments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import common_pb2
from imagetasks.v1 import job_service_pb2 as jpb

from aiserver.gateway.compat import CompatTask
from aiserver.gateway.fields import enum_of, is_map, is_repeated, msg_type, short_enum_names
from aiserver.gateway.routes import Route, RouteKind
from aiserver.gateway.schema_rules import (
    INT64_PATTERN,
    UINT64_PATTERN,
    excluded_enum_values,
    field_rules,
    is_required,
    item_keywords,
    pattern_keywords,
    rule_keywords,
    strip_pattern_prefix,
)
from aiserver.gateway.streams import NDJSON, SSE, event_field

__all__ = ["build_openapi", "job_option_schemas"]

FD = descriptor.FieldDescriptor
_REF = "#/components/schemas/"
ARTIFACT_PATH_EXAMPLE = "2026/01/31/" + "0" * 64 + ".png"
_ERROR = "ErrorResponse"

_SCALARS: Mapping[int, dict[str, Any]] = {
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # 64-bit integers are JSON strings of decimal digits, in range.
    FD.TYPE_INT64: {"type": "string", "format": "int64", **pattern_keywords(INT64_PATTERN)},
    FD.TYPE_SINT64: {"type": "string", "format": "int64", **pattern_keywords(INT64_PATTERN)},
    FD.TYPE_SFIXED64: {"type": "string", "format": "int64", **pattern_keywords(INT64_PATTERN)},
    FD.TYPE_UINT64: {"type": "string", "format": "uint64", **pattern_keywords(UINT64_PATTERN)},
    FD.TYPE_FIXED64: {"type": "string", "format": "uint64", **pattern_keywords(UINT64_PATTERN)},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_WELL_KNOWN: Mapping[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, desc: descriptor.Descriptor) -> dict[str, Any]:
        if desc.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[desc.full_name])
        if desc.full_name.startswith("google.protobuf.") and desc.full_name.endswith("Value"):
            return self.field(desc.fields_by_name["value"])  # wrappers: their value
        if desc.full_name not in self.components:
            self.components[desc.full_name] = {}  # placeholder: recursion stops here
            self.components[desc.full_name] = self.message(desc)
        return {"$ref": _REF + desc.full_name}

    def message(self, desc: descriptor.Descriptor) -> dict[str, Any]:
        props = {f.json_name: self.field(f) for f in desc.fields}
        # The server's JSON parser refuses unknown fields: say so.
        schema: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }
        required = [f.json_name for f in desc.fields if is_required(f)]
        if required:
            schema["required"] = required
        real_oneofs = [o for o in desc.oneofs if not _synthetic(o)]
        if real_oneofs:
            schema["description"] = " ".join(
                f"At most one of {', '.join(f.json_name for f in o.fields)} ({o.name})."
                for o in real_oneofs
            )
        return schema

    def field(self, f: FD) -> dict[str, Any]:
        if is_map(f):
            return {
                "type": "object",
                "additionalProperties": self.field(msg_type(f).fields_by_name["value"]),
            }
        if f.type == FD.TYPE_MESSAGE:
            base = self.ref(msg_type(f))
        elif f.type == FD.TYPE_ENUM:
            excluded = excluded_enum_values(f)  # e.g. the zero value of a required enum
            values = [v.name for v in enum_of(f).values if v.number not in excluded]
            base = {"type": "string", "enum": values}
        else:
            base = dict(_SCALARS[f.type])
        if is_repeated(f):
            return {"type": "array", "items": {**base, **item_keywords(f)}}
        return base if "$ref" in base else {**base, **rule_keywords(f)}


def _synthetic(oneof: descriptor.OneofDescriptor) -> bool:
    # proto3 `optional` fields live in synthetic one-field oneofs named `_field`.
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def _error_responses() -> dict[str, Any]:
    return {
        "default": {
            "description": "An error: the gRPC status as AI Server's responseStatus",
            "content": {"application/json": {"schema": {"$ref": _REF + _ERROR}}},
        }
    }


def _path_parameters(path: str, route: Route | None = None) -> list[dict[str, Any]]:
    params = []
    for name in re.findall(r"{([^}]+)}", path):
        schema = _path_schema(name, route)
        param = {"name": name, "in": "path", "required": True, "schema": schema}
        # A `**` variable binds slashes: an example shows it (and lets fuzzers send them).
        if "pattern" in schema and re.search(schema["pattern"], ARTIFACT_PATH_EXAMPLE):
            param["example"] = ARTIFACT_PATH_EXAMPLE
        params.append(param)
    return params


def _path_schema(name: str, route: Route | None) -> dict[str, Any]:
    """A path variable's schema: the bound field's pattern without the template's literal
    prefix (``{name=jobs/*}`` binds the id of ``jobs/{id}``)."""
    if route is None:
        return {"type": "string"}
    f = route.method.input_type.fields_by_name.get(name)
    bound = re.search("{" + re.escape(name) + r"=([^}*]*)", route.template.template)
    rules = field_rules(f) if f is not None else None
    if rules is None or bound is None or not rules.string.HasField("pattern"):
        return {"type": "string"}
    pattern = strip_pattern_prefix(rules.string.pattern, bound.group(1))
    return (
        {"type": "string"} if pattern is None else {"type": "string", **pattern_keywords(pattern)}
    )


def _query_parameters(route: Route, schemas: _Schemas) -> list[dict[str, Any]]:
    bound = {v.split(".")[0] for v in route.template.variables}
    params = []
    for f in route.method.input_type.fields:
        if f.name in bound or f.name == route.body:
            continue
        if f.type == FD.TYPE_MESSAGE and msg_type(f).full_name not in _WELL_KNOWN:
            continue
        params.append(
            {
                "name": f.json_name,
                "in": "query",
                "required": False,
                "schema": schemas.field(f),
                **({"explode": True} if is_repeated(f) else {}),
            }
        )
    return params


def _form_schema(
    params: descriptor.Descriptor, schemas: _Schemas, *, pascal: bool, files: Iterable[str]
) -> dict[str, Any]:
    def name(f: FD) -> str:
        return "".join(w[:1].upper() + w[1:] for w in f.name.split("_")) if pascal else f.json_name

    def value_schema(f: FD) -> dict[str, Any]:
        if f.type == FD.TYPE_ENUM:  # forms take the short names; the zero value is "unset"
            return {"type": "string", "enum": short_enum_names(enum_of(f))}
        return schemas.field(f)

    props: dict[str, Any] = {}
    for f in params.fields:
        if f.type == FD.TYPE_MESSAGE and msg_type(f).full_name not in _WELL_KNOWN:
            for inner in msg_type(f).fields:  # reachable flat, e.g. RefId -> options.ref_id
                if inner.type != FD.TYPE_MESSAGE:
                    props[name(inner)] = value_schema(inner)
            continue
        props[name(f)] = value_schema(f)
    required = [name(f) for f in params.fields if is_required(f)]
    for file in files:
        props[file] = {"type": "string", "format": "binary"}
        required.append(file)  # every input of a task is required (ImageWithMask: both)
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
        "description": "Text fields first, then the files: the form is read as a stream.",
    }


# The job options a form takes beside a task's or a workflow's own parameters.
JOB_OPTIONS = ("RefId", "Tag", "ReplyTo", "OutputFormat", "Quality")


def job_option_schemas(task: CompatTask) -> dict[str, Any]:
    """The job option fields of ``task``'s form (RefId...), with their contract limits: a
    workflow's form takes them as RunWorkflow's params do."""
    props = _form_schema(task.upload.params, _Schemas(), pascal=True, files=())["properties"]
    return {name: props[name] for name in JOB_OPTIONS if name in props}


def _files_of(method: descriptor.MethodDescriptor) -> list[str]:
    return ["image", "mask"] if "mask" in method.name.lower() else ["image"]


def _operation(route: Route, schemas: _Schemas, op_id: str) -> dict[str, Any]:
    method = route.method
    op: dict[str, Any] = {
        "operationId": op_id,
        "tags": [method.containing_service.name],
        "summary": f"{method.containing_service.name}.{method.name} ({route.kind.value})",
        "parameters": _path_parameters(route.template.openapi_path, route),
    }
    if route.kind in (RouteKind.UNARY, RouteKind.SERVER_STREAM):
        op["parameters"] += _query_parameters(route, schemas) if route.body != "*" else []
        if route.body:
            target = (
                schemas.ref(method.input_type)
                if route.body == "*"
                else schemas.field(method.input_type.fields_by_name[route.body])
            )
            op["requestBody"] = {"content": {"application/json": {"schema": target}}}
    else:
        content: dict[str, Any] = {NDJSON: {"schema": schemas.ref(method.input_type)}}
        upload = route.upload
        if upload is not None:
            content = {
                "multipart/form-data": {
                    "schema": _form_schema(
                        upload.params, schemas, pascal=False, files=_files_of(method)
                    )
                },
                **content,
            }
        op["requestBody"] = {
            "required": True,
            "description": "A form with the parameters and files, or (application/x-ndjson) "
            "one request message per line: params first, then file chunks.",
            "content": content,
        }
    out = schemas.ref(method.output_type)
    if route.response_body:
        out = schemas.field(method.output_type.fields_by_name[route.response_body])
    if method.server_streaming:
        stream_content: dict[str, Any] = {
            NDJSON: {"schema": out},
            SSE: {"schema": {"type": "string"}},
        }
        op["responses"] = {
            "200": {"description": "A stream of messages", "content": stream_content},
            **_error_responses(),
        }
    else:
        op["responses"] = {
            "200": {"description": "OK", "content": {"application/json": {"schema": out}}},
            **_error_responses(),
        }
    return op


def _compat_components() -> dict[str, Any]:
    string = {"type": "string"}
    return {
        "ResponseError": {
            "type": "object",
            "properties": {"fieldName": string, "errorCode": string, "message": string},
        },
        "ResponseStatus": {
            "type": "object",
            "properties": {
                "errorCode": string,
                "message": string,
                "errors": {"type": "array", "items": {"$ref": _REF + "ResponseError"}},
                "meta": {"type": "object", "additionalProperties": string},
            },
        },
        _ERROR: {
            "type": "object",
            "properties": {"responseStatus": {"$ref": _REF + "ResponseStatus"}},
        },
        "ArtifactOutput": {
            "type": "object",
            "properties": {"fileName": string, "url": string, "provider": string},
        },
        "TextOutputItem": {"type": "object", "properties": {"text": string}},
        # `results` (sync) and `statusUrl` (queued) are what tell the two answers apart.
        "GenerationResponse": {
            "type": "object",
            "required": ["jobId", "refId", "jobState", "status", "results"],
            "properties": {
                "jobId": string,
                "refId": string,
                "jobState": string,
                "status": string,
                "outputs": {"type": "array", "items": {"$ref": _REF + "ArtifactOutput"}},
                "results": {"type": "array", "items": {"$ref": _REF + "ArtifactOutput"}},
                "textOutputs": {"type": "array", "items": {"$ref": _REF + "TextOutputItem"}},
                "responseStatus": {"$ref": _REF + "ResponseStatus"},
            },
        },
        "QueueGenerationResponse": {
            "type": "object",
            "required": ["jobId", "refId", "jobState", "status", "statusUrl"],
            "properties": {
                "jobId": string,
                "refId": string,
                "jobState": string,
                "status": string,
                "statusUrl": string,
            },
        },
    }


def _bound(f: FD, prefix: str) -> dict[str, Any]:
    """The schema of what a compat route takes in place of ``f``'s value minus ``prefix``
    (the job id of ``jobs/{id}``, the path of ``artifacts/{path}``)."""
    rules = field_rules(f)
    pattern = strip_pattern_prefix(rules.string.pattern, prefix) if rules is not None else None
    return (
        {"type": "string"} if pattern is None else {"type": "string", **pattern_keywords(pattern)}
    )


def _compat_paths(tasks: Mapping[str, CompatTask], schemas: _Schemas) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    # The compat routes' parameters are the contract's fields under other names.
    job_id = _bound(jpb.GetJobRequest.DESCRIPTOR.fields_by_name["name"], "jobs/")
    ref_id = schemas.field(common_pb2.JobOptions.DESCRIPTOR.fields_by_name["ref_id"])
    # An artifact's path has slashes: the example says so (and lets fuzzers send them).
    artifact_path = {
        "schema": _bound(apb.GetArtifactRequest.DESCRIPTOR.fields_by_name["name"], "artifacts/"),
        "example": ARTIFACT_PATH_EXAMPLE,
    }
    spec = schemas.field(apb.GetVariantRequest.DESCRIPTOR.fields_by_name["spec"])
    errors = _error_responses()
    for task in sorted(tasks.values(), key=lambda t: t.name):
        form = _form_schema(task.upload.params, schemas, pascal=True, files=_files_of(task.method))
        if task.generative and not task.queued:
            form["properties"]["Sync"] = {
                "type": "boolean",
                "description": "wait for the job and answer with its outputs",
            }
        if task.generative:
            sync_ref = {"$ref": _REF + "GenerationResponse"}
            queued_ref = {"$ref": _REF + "QueueGenerationResponse"}
            schema = queued_ref if task.queued else {"oneOf": [sync_ref, queued_ref]}
            ok = {"description": "OK", "content": {"application/json": {"schema": schema}}}
        else:
            ok = {
                "description": "The image",
                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
            }
        paths[f"/api/{task.name}"] = {
            "post": {
                "operationId": f"Compat_{task.name}",
                "tags": ["AI Server"],
                "summary": f"AI Server's {task.name} ({task.method.full_name})",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": form}},
                },
                "responses": {"200": ok, **errors},
            }
        }
    for name, text in (("GetArtifactGenerationStatus", False), ("GetTextGenerationStatus", True)):
        paths[f"/api/{name}"] = {
            "get": {
                "operationId": f"Compat_{name}",
                "tags": ["AI Server"],
                "summary": "A job's state and " + ("text outputs" if text else "outputs"),
                "description": "Give jobId or refId (OpenAPI 3.0 cannot require one of two "
                "parameters; without either the answer is 400 INVALID_PARAMETERS).",
                "parameters": [
                    {"name": "jobId", "in": "query", "schema": job_id},
                    {"name": "refId", "in": "query", "schema": ref_id},
                ],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {
                            "application/json": {"schema": {"$ref": _REF + "GenerationResponse"}}
                        },
                    },
                    **errors,
                },
            }
        }
    binary = {"schema": {"type": "string", "format": "binary"}}
    paths["/api/jobs/{id}/events"] = {
        "get": {
            "operationId": "Compat_JobEvents",
            "tags": ["AI Server"],
            "summary": "A job's events as Server-Sent Events (JobService.WatchJob)",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": job_id}],
            "responses": {
                "200": {
                    "description": "event: <kind>, id: <sequence>, data: <JobEvent JSON>",
                    "content": {SSE: {"schema": {"type": "string"}}, NDJSON: {"schema": {}}},
                },
                **errors,
            },
        }
    }
    paths["/artifacts/{path}"] = {
        "get": {
            "operationId": "Compat_Artifact",
            "tags": ["AI Server"],
            "summary": "An artifact's bytes (ETag, Range, ?download=true)",
            "parameters": [
                {"name": "path", "in": "path", "required": True, **artifact_path},
                {"name": "download", "in": "query", "schema": {"type": "boolean"}},
            ],
            "responses": {
                "200": {"description": "The bytes", "content": {"*/*": binary}},
                "206": {"description": "A range of the bytes", "content": {"*/*": binary}},
                "304": {"description": "Not modified"},
                **errors,
            },
        }
    }
    paths["/variants/{spec}/{path}"] = {
        "get": {
            "operationId": "Compat_Variant",
            "tags": ["AI Server"],
            "summary": "A resized copy of an artifact, e.g. /variants/width=256/2025/...",
            "parameters": [
                {"name": "spec", "in": "path", "required": True, "schema": spec},
                {"name": "path", "in": "path", "required": True, **artifact_path},
            ],
            "responses": {
                "200": {"description": "The bytes", "content": {"image/*": binary}},
                "304": {"description": "Not modified"},
                **errors,
            },
        }
    }
    return paths


def build_openapi(
    routes: Iterable[Route],
    tasks: Mapping[str, CompatTask],
    *,
    title: str = "AI Server image tasks (HTTP gateway)",
    version: str = "v1",
) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for route in routes:
        base_id = route.operation_id
        seen[base_id] = seen.get(base_id, 0) + 1
        op_id = base_id if seen[base_id] == 1 else f"{base_id}_{seen[base_id]}"
        item = paths.setdefault(route.template.openapi_path, {})
        item[route.http_method.lower()] = _operation(route, schemas, op_id)
        if route.kind is RouteKind.SERVER_STREAM and event_field(route.method.output_type):
            item[route.http_method.lower()]["description"] = (
                "With Accept: text/event-stream, one SSE event per JobEvent: "
                "event = its kind, id = its sequence, data = the JobEvent."
            )
    paths.update(_compat_paths(tasks, schemas))
    paths["/openapi.json"] = {
        "get": {
            "operationId": "OpenApi",
            "tags": ["Gateway"],
            "responses": {"200": {"description": "This document"}},
        }
    }
    paths["/healthz"] = {
        "get": {
            "operationId": "Health",
            "tags": ["Gateway"],
            "summary": "The backend's gRPC health (SERVING: 200, otherwise 503)",
            "responses": {"200": {"description": "Serving"}, "503": {"description": "Not"}},
        }
    }
    components = dict(sorted(schemas.components.items()))
    components.update(_compat_components())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": version,
            "description": "Every route is a call of the imagetasks.v1 gRPC services; the "
            "/v1 routes come from their google.api.http annotations.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": components},
    }

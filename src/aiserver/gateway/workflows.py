"""Workflows over REST: ``POST /api/workflows/{name}`` and their OpenAPI operations.

``POST /api/workflows/{name}`` is WorkflowService.RunWorkflow as a multipart form, AI Server
style: form fields are the workflow's parameters (matched case-insensitively, ``steps`` or
``Steps``), files are its inputs, and ``Sync``, ``RefId``, ``Tag``, ``ReplyTo`` work as for the
built-in tasks; the answer is the same job JSON. Form values are text: each is converted to the
type the workflow declares (GetWorkflow), and the server checks the result, so a value that is
not a number still gets the server's field violation.

The OpenAPI document lists each workflow as an operation of its own, with its typed parameter
schema, read from ListWorkflows when the document is served: it follows the workflows folder.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from typing import Any, cast

import grpc
from aiohttp import web
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from imagetasks.v1 import workflow_service_pb2 as wpb

from aiserver.gateway.backend import Backend
from aiserver.gateway.compat import Compat, TaskParams, compat_field_name, require_multipart
from aiserver.gateway.errors import GatewayError, from_rpc_error
from aiserver.gateway.fields import field_key
from aiserver.gateway.openapi import job_option_schemas
from aiserver.gateway.uploads import FormFields

__all__ = ["WorkflowRoutes", "workflow_paths"]

logger = logging.getLogger(__name__)

_GET = "imagetasks.v1.WorkflowService.GetWorkflow"
_LIST = "imagetasks.v1.WorkflowService.ListWorkflows"
_REF = "#/components/schemas/"
_OPTION_FIELDS = frozenset({"sync", "refid", "tag", "replyto", "outputformat", "quality"})
_TYPES = {
    wpb.PARAMETER_TYPE_STRING: "string",
    wpb.PARAMETER_TYPE_INTEGER: "integer",
    wpb.PARAMETER_TYPE_NUMBER: "number",
    wpb.PARAMETER_TYPE_BOOLEAN: "boolean",
}


class WorkflowRoutes:
    def __init__(self, backend: Backend, compat: Compat) -> None:
        self._backend = backend
        self._compat = compat
        self._options = job_option_schemas(compat.workflow) if compat.workflow else {}

    async def run(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["workflow"]
        require_multipart(request, f"workflow {name} takes multipart/form-data")
        described = await self._unary(
            request, _GET, wpb.GetWorkflowRequest(name=f"workflows/{name}")
        )
        declared = {field_key(p.name): p for p in described.workflow.parameters}
        task = self._compat.workflow
        assert task is not None, "routed only when the contract has WorkflowService"

        def build(options: TaskParams, items: FormFields) -> Message:
            passed: list[tuple[str, str]] = []
            parameters = struct_pb2.Struct()
            for field, text in items:
                key = field_key(field)
                param = declared.get(key)
                if param is None and key in _OPTION_FIELDS:
                    passed.append((field, text))
                elif param is not None:
                    parameters[param.name] = _typed(param.type, text)
                else:
                    parameters[field] = text  # unknown: the server names it in its error
            msg: Any = options.build(passed)
            msg.workflow = name
            msg.parameters.CopyFrom(parameters)
            return cast(Message, msg)

        # The task routes' upload, cap, cancel and answer: only the params differ.
        return await self._compat.run_task(request, task, build)

    async def openapi(self, request: web.Request, document: dict[str, Any]) -> dict[str, Any]:
        """``document`` plus one operation per workflow (as the server lists them now)."""
        try:
            listed = await self._unary(request, _LIST, wpb.ListWorkflowsRequest())
        except GatewayError as exc:
            logger.info("OpenAPI without workflow operations: %s", exc)
            return document
        fresh = copy.copy(document)
        fresh["paths"] = dict(
            sorted({**document["paths"], **workflow_paths(listed.workflows, self._options)}.items())
        )
        return fresh

    async def _unary(self, request: web.BaseRequest, full_name: str, req: Any) -> Any:
        backend = self._backend
        try:
            return await backend.callable(backend.method(full_name))(
                req, metadata=backend.metadata(request), timeout=backend.settings.unary_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, field_name=compat_field_name) from None


def _typed(kind: int, text: str) -> Any:
    """A form value as the declared type; left as text when it does not parse."""
    if kind in (wpb.PARAMETER_TYPE_INTEGER, wpb.PARAMETER_TYPE_NUMBER):
        try:
            return float(text)
        except ValueError:
            return text
    if kind == wpb.PARAMETER_TYPE_BOOLEAN:
        low = text.strip().lower()
        return {"true": True, "1": True, "false": False, "0": False}.get(low, text)
    return text


def workflow_paths(
    workflows: Iterable[wpb.Workflow], options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``/api/workflows/{name}``, one typed operation per loaded workflow; ``options``: the
    schemas of the job option fields (``RefId``...)."""
    paths: dict[str, Any] = {}
    for wf in workflows:
        if not wf.version:  # a broken file: nothing to call
            continue
        name = wf.name.removeprefix("workflows/")
        props: dict[str, Any] = {}
        required: list[str] = []
        for p in wf.parameters:
            schema: dict[str, Any] = {"type": _TYPES.get(p.type, "string")}
            if p.description:
                schema["description"] = p.description
            if p.HasField("minimum"):
                schema["minimum"] = p.minimum
            if p.HasField("maximum"):
                schema["maximum"] = p.maximum
            if p.max_length:
                schema["maxLength"] = p.max_length
            if p.type == wpb.PARAMETER_TYPE_STRING:
                schema["not"] = {"pattern": "\\u0000"}  # no NUL character
            if p.choices:
                schema["enum"] = [_plain(c) for c in p.choices]
            if p.HasField("default_value"):
                schema["default"] = _plain(p.default_value)
            props[p.name] = schema
            if p.required:
                required.append(p.name)
        for i in wf.inputs:
            props[i.name] = {"type": "string", "format": "binary", "description": i.description}
            if i.required:
                required.append(i.name)
        props["Sync"] = {"type": "boolean", "description": "wait for the job and its outputs"}
        # A parameter named like an option is the workflow's (as POST takes it).
        taken = {field_key(n) for n in props}
        props.update((k, v) for k, v in (options or {}).items() if field_key(k) not in taken)
        form: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }
        if required:
            form["required"] = required
        sync_ref = {"$ref": _REF + "GenerationResponse"}
        queued_ref = {"$ref": _REF + "QueueGenerationResponse"}
        ok = {
            "description": "The job (Sync=true: with its outputs)",
            "content": {"application/json": {"schema": {"oneOf": [sync_ref, queued_ref]}}},
        }
        paths[f"/api/workflows/{name}"] = {
            "post": {
                "operationId": "Workflow_" + "".join(w.title() for w in re.split(r"[_-]", name)),
                "tags": ["Workflows"],
                "summary": wf.title or name,
                "description": f"{wf.description}\n\nVersion {wf.version}.".strip(),
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": form}},
                },
                "responses": {
                    "200": ok,
                    "default": {
                        "description": "An error",
                        "content": {
                            "application/json": {"schema": {"$ref": _REF + "ErrorResponse"}}
                        },
                    },
                },
            }
        }
    return paths


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number
    if kind == "bool_value":
        return value.bool_value
    return value.string_value

"""ComfyUI's refusals and failures as :class:`ServiceError`.

Shapes: ``errors.json`` (``POST /prompt`` 400 bodies), ``ws_trace_exec_error.json``
(``execution_error``) and ``ws_trace_interrupt.json`` (``execution_interrupted``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiserver.errors import ErrorKind, FieldViolation, ServiceError

if TYPE_CHECKING:
    from aiserver.providers.comfy.workflows import Workflow

__all__ = ["execution_failure", "interrupted", "prompt_rejection"]


def prompt_rejection(
    body: Any, workflow: Workflow | None, graph: Mapping[str, Any], agent: str
) -> ServiceError:
    """A ``POST /prompt`` refusal as a ServiceError (errors.json shapes).

    A ``value_not_in_list`` on a model input is FAILED_PRECONDITION ``COMFYUI_MODEL_MISSING``;
    an unknown node type FAILED_PRECONDITION ``COMFYUI_NODE_MISSING``; anything else
    INVALID_ARGUMENT ``COMFYUI_PROMPT_INVALID``.
    """
    body = body if isinstance(body, dict) else {}
    error = body.get("error")
    error = error if isinstance(error, dict) else {"type": "", "message": str(error or "")}
    node_errors = body.get("node_errors")
    problems: list[tuple[str, str, dict[str, Any]]] = []
    if isinstance(node_errors, dict):
        for node_id, entry in node_errors.items():
            if not isinstance(entry, dict):
                continue
            class_type = str(
                entry.get("class_type") or graph.get(node_id, {}).get("class_type", "")
            )
            for problem in entry.get("errors") or []:
                if isinstance(problem, dict):
                    problems.append((str(node_id), class_type, problem))
    metadata = {"agent": agent, "comfy_error": str(error.get("type", ""))}
    if not problems:
        message = f"{error.get('message', '')} {error.get('details', '')}".strip()
        if error.get("type") == "invalid_prompt" and "does not exist" in message:
            return ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "COMFYUI_NODE_MISSING",
                f"ComfyUI agent {agent} lacks a node type: {message}",
                metadata={**metadata, "comfy_message": message},
            )
        return ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            "COMFYUI_PROMPT_INVALID",
            f"ComfyUI agent {agent} refused the workflow: {message or 'no reason given'}",
            metadata={**metadata, "comfy_message": message},
        )

    def is_model(node: str, input_name: str) -> bool:
        return workflow.is_model_input(node, input_name) if workflow is not None else False

    def input_of(problem: dict[str, Any]) -> str:
        extra = problem.get("extra_info")
        return str(extra.get("input_name", "")) if isinstance(extra, dict) else ""

    missing_models = [
        p
        for p in problems
        if p[2].get("type") == "value_not_in_list" and is_model(p[0], input_of(p[2]))
    ]
    first = (missing_models or problems)[0]
    node_id, class_type, problem = first
    input_name = input_of(problem)
    extra = problem.get("extra_info") if isinstance(problem.get("extra_info"), dict) else {}
    comfy_message = f"{problem.get('message', '')}: {problem.get('details', '')}".strip(": ")
    violations = tuple(
        FieldViolation(
            (workflow.field_for(n, input_of(p)) if workflow is not None else None)
            or f"workflow.{n}.{input_of(p) or 'inputs'}",
            f"{c}: {p.get('message', '')}: {p.get('details', '')}",
        )
        for n, c, p in problems
    )
    metadata.update(
        node_id=node_id,
        class_type=class_type,
        input_name=input_name,
        comfy_error_type=str(problem.get("type", "")),
        comfy_message=comfy_message,
        errors=str(len(problems)),
    )
    if isinstance(extra, dict) and "received_value" in extra:
        metadata["received_value"] = str(extra["received_value"])
    if missing_models:
        value = metadata.get("received_value", "")
        return ServiceError(
            ErrorKind.FAILED_PRECONDITION,
            "COMFYUI_MODEL_MISSING",
            f"ComfyUI agent {agent} does not have model {value!r} "
            f"({class_type}.{input_name}, node {node_id}): {comfy_message}",
            violations=violations,
            metadata=metadata,
        )
    return ServiceError(
        ErrorKind.INVALID_ARGUMENT,
        "COMFYUI_PROMPT_INVALID",
        f"ComfyUI agent {agent} refused the workflow at node {node_id} ({class_type}"
        f"{'.' + input_name if input_name else ''}): {comfy_message}",
        violations=violations,
        metadata=metadata,
    )


def execution_failure(data: Mapping[str, Any], agent: str) -> ServiceError:
    """An ``execution_error`` message (ws_trace_exec_error.json) as a ServiceError.

    Loader failures and missing files are FAILED_PRECONDITION (the agent's setup), the rest
    INTERNAL; the reason is ``COMFYUI_EXECUTION_ERROR`` either way.
    """
    node_type = str(data.get("node_type", ""))
    exception_type = str(data.get("exception_type", ""))
    exception_message = str(data.get("exception_message", "")).strip()
    setup = "Loader" in node_type or exception_type.endswith("FileNotFoundError")
    traceback = data.get("traceback")
    last_frame = str(traceback[-1]).strip() if isinstance(traceback, list) and traceback else ""
    return ServiceError(
        ErrorKind.FAILED_PRECONDITION if setup else ErrorKind.INTERNAL,
        "COMFYUI_EXECUTION_ERROR",
        f"ComfyUI agent {agent}: node {data.get('node_id')} ({node_type}) failed: "
        f"{exception_type}: {exception_message}",
        metadata={
            "agent": agent,
            "prompt_id": str(data.get("prompt_id", "")),
            "node_id": str(data.get("node_id", "")),
            "node_type": node_type,
            "exception_type": exception_type,
            "exception_message": exception_message,
            "traceback_last": last_frame[-500:],
        },
    )


def interrupted(data: Mapping[str, Any], agent: str) -> ServiceError:
    return ServiceError(
        ErrorKind.CANCELLED,
        "COMFYUI_INTERRUPTED",
        f"ComfyUI agent {agent}: prompt interrupted at node {data.get('node_id')} "
        f"({data.get('node_type')})",
        metadata={
            "agent": agent,
            "prompt_id": str(data.get("prompt_id", "")),
            "node_id": str(data.get("node_id", "")),
            "node_type": str(data.get("node_type", "")),
        },
    )

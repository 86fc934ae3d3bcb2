"""ComfyUI's refusals and failures as typed :class:`ProviderFailure`.

Shapes: ``errors.json`` (``POST /prompt`` 400 bodies), ``ws_trace_exec_error.json``
(``execution_error``) and ``ws_trace_interrupt.json`` (``execution_interrupted``). Each error
names its :class:`~aiserver.providers.failures.Cause`, which the pool and the scheduler decide on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiserver.errors import ErrorKind, FieldViolation
from aiserver.providers.comfy.messages import ExecutionError, ExecutionInterrupted
from aiserver.providers.failures import Cause, ProviderFailure, ProviderUnavailable

if TYPE_CHECKING:
    from aiserver.providers.comfy.workflows import Workflow

__all__ = ["agent_unavailable", "execution_failure", "interrupted", "prompt_rejection"]


def agent_unavailable(
    agent: str, url: str, message: str, *, cause: Cause, **extra: str
) -> ProviderUnavailable:
    """A retryable failure naming the agent (``metadata``: agent, url, cause, ``extra``)."""
    return ProviderUnavailable(
        f"ComfyUI agent {agent}: {message}",
        cause=cause,
        agent=agent,
        metadata={"url": url, **extra},
    )


def prompt_rejection(
    body: Any, workflow: Workflow | None, graph: Mapping[str, Any], agent: str
) -> ProviderFailure:
    """A ``POST /prompt`` refusal (errors.json shapes).

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
            return ProviderFailure(
                ErrorKind.FAILED_PRECONDITION,
                "COMFYUI_NODE_MISSING",
                f"ComfyUI agent {agent} lacks a node type: {message}",
                cause=Cause.AGENT_LACKS,
                agent=agent,
                metadata={**metadata, "comfy_message": message},
            )
        return ProviderFailure(
            ErrorKind.INVALID_ARGUMENT,
            "COMFYUI_PROMPT_INVALID",
            f"ComfyUI agent {agent} refused the workflow: {message or 'no reason given'}",
            cause=Cause.PROMPT_REJECTED,
            agent=agent,
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
        return ProviderFailure(
            ErrorKind.FAILED_PRECONDITION,
            "COMFYUI_MODEL_MISSING",
            f"ComfyUI agent {agent} does not have model {value!r} "
            f"({class_type}.{input_name}, node {node_id}): {comfy_message}",
            cause=Cause.AGENT_LACKS,
            agent=agent,
            violations=violations,
            metadata=metadata,
        )
    return ProviderFailure(
        ErrorKind.INVALID_ARGUMENT,
        "COMFYUI_PROMPT_INVALID",
        f"ComfyUI agent {agent} refused the workflow at node {node_id} ({class_type}"
        f"{'.' + input_name if input_name else ''}): {comfy_message}",
        cause=Cause.PROMPT_REJECTED,
        agent=agent,
        violations=violations,
        metadata=metadata,
    )


def execution_failure(error: ExecutionError, agent: str) -> ProviderFailure:
    """An ``execution_error`` message (ws_trace_exec_error.json) as a failure.

    Loader failures and missing files are FAILED_PRECONDITION (the agent's setup), the rest
    INTERNAL; the reason is ``COMFYUI_EXECUTION_ERROR`` either way.
    """
    message = error.exception_message.strip()
    setup = "Loader" in error.node_type or error.exception_type.endswith("FileNotFoundError")
    last_frame = error.traceback[-1].strip() if error.traceback else ""
    return ProviderFailure(
        ErrorKind.FAILED_PRECONDITION if setup else ErrorKind.INTERNAL,
        "COMFYUI_EXECUTION_ERROR",
        f"ComfyUI agent {agent}: node {error.node_id} ({error.node_type}) failed: "
        f"{error.exception_type}: {message}",
        cause=Cause.EXECUTION_ERROR,
        agent=agent,
        metadata={
            "agent": agent,
            "prompt_id": error.prompt_id,
            "node_id": error.node_id,
            "node_type": error.node_type,
            "exception_type": error.exception_type,
            "exception_message": message,
            "traceback_last": last_frame[-500:],
        },
    )


def interrupted(event: ExecutionInterrupted, agent: str) -> ProviderFailure:
    return ProviderFailure(
        ErrorKind.CANCELLED,
        "COMFYUI_INTERRUPTED",
        f"ComfyUI agent {agent}: prompt interrupted at node {event.node_id} ({event.node_type})",
        cause=Cause.INTERRUPTED,
        agent=agent,
        metadata={
            "agent": agent,
            "prompt_id": event.prompt_id,
            "node_id": event.node_id,
            "node_type": event.node_type,
        },
    )

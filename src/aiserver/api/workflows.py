"""WorkflowService: the workflows folder as API (list, describe, run as jobs)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

from google.protobuf import struct_pb2
from imagetasks.v1 import common_pb2, workflow_service_pb2_grpc
from imagetasks.v1 import workflow_service_pb2 as wpb

from aiserver.api.convert import output_encoding, struct_to_dict, task_to_proto
from aiserver.api.job_calls import JobCalls
from aiserver.api.status import rpc
from aiserver.api.uploads import read_upload
from aiserver.errors import ErrorKind, ServiceError
from aiserver.providers.comfy.workflow_params import ParamSpec, check_values
from aiserver.providers.comfy.workflows import (
    AgentCapabilities,
    BrokenWorkflow,
    Workflow,
    WorkflowCatalog,
)
from aiserver.spool import UploadBudget
from aiserver.tasks import TaskKind, WorkflowSpec

__all__ = ["WorkflowServicer", "workflow_availability"]

AgentsNow = Callable[[], Mapping[str, AgentCapabilities]]
"""What each online agent has now, by agent name."""

_TYPES = {
    "string": wpb.PARAMETER_TYPE_STRING,
    "integer": wpb.PARAMETER_TYPE_INTEGER,
    "number": wpb.PARAMETER_TYPE_NUMBER,
    "boolean": wpb.PARAMETER_TYPE_BOOLEAN,
}
_INPUT_KINDS = {"image": wpb.INPUT_KIND_IMAGE, "mask": wpb.INPUT_KIND_MASK}
_OUTPUT_KINDS = {
    "images": wpb.WorkflowOutput.KIND_IMAGES,
    "text": wpb.WorkflowOutput.KIND_TEXT,
}


class WorkflowServicer(workflow_service_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, calls: JobCalls, catalog: WorkflowCatalog, agents: AgentsNow) -> None:
        self._calls = calls
        self._catalog = catalog
        self._agents = agents

    @rpc
    async def ListWorkflows(
        self, request: wpb.ListWorkflowsRequest, context: Any
    ) -> wpb.ListWorkflowsResponse:
        agents = self._agents()
        text = self._calls.limits.max_prompt_chars
        found = {w.name: workflow_to_proto(w, agents, text) for w in self._catalog.workflows()}
        for broken in self._catalog.broken:
            found.setdefault(broken.name, broken_to_proto(broken))
        return wpb.ListWorkflowsResponse(workflows=[found[n] for n in sorted(found)])

    @rpc
    async def GetWorkflow(
        self, request: wpb.GetWorkflowRequest, context: Any
    ) -> wpb.GetWorkflowResponse:
        name = request.name.removeprefix("workflows/")
        workflow = self._catalog.named(name)
        if workflow is not None:
            return wpb.GetWorkflowResponse(
                workflow=workflow_to_proto(
                    workflow, self._agents(), self._calls.limits.max_prompt_chars
                )
            )
        broken = next((b for b in self._catalog.broken if b.name == name), None)
        if broken is not None:
            return wpb.GetWorkflowResponse(workflow=broken_to_proto(broken))
        raise _not_found(name)

    @rpc
    async def RunWorkflow(
        self, request_iterator: AsyncIterator[wpb.RunWorkflowRequest], context: Any
    ) -> AsyncIterator[wpb.RunWorkflowResponse]:
        accepted: list[tuple[Workflow, dict[str, Any]]] = []

        def inputs_of(params: wpb.RunWorkflowParams) -> tuple[Collection[str], Collection[str]]:
            # The workflow is pinned when the params arrive: a reload during the upload does
            # not change what this call runs.
            workflow = self._find(params.workflow)
            values = check_values(
                workflow.params,
                struct_to_dict(params.parameters),
                max_text=self._calls.limits.max_prompt_chars,
            )
            self._refuse_if_no_agent_can(workflow, values)
            accepted.append((workflow, values))
            return workflow.input_names, workflow.required_inputs

        upload = await read_upload(
            request_iterator,
            spool=self._calls.spool,
            budget=UploadBudget(self._calls.limits.max_upload_bytes),
            inputs=(),
            inputs_of=inputs_of,
        )
        workflow, values = accepted[0]
        options = upload.params.options
        try:
            encoding = output_encoding(options)
        except BaseException:
            upload.discard()
            raise
        spec = WorkflowSpec(workflow.name, workflow.version, values, workflow.documents, **encoding)
        async for response in self._calls.run(
            TaskKind.WORKFLOW, spec, options, upload, context, wpb.RunWorkflowResponse
        ):
            yield response

    def _refuse_if_no_agent_can(self, workflow: Workflow, values: dict[str, Any]) -> None:
        """FAILED_PRECONDITION when agents are online and none has what this run needs;
        with none online the job waits for one, as any job does."""
        agents = self._agents()
        spec = WorkflowSpec(workflow.name, workflow.version, values)
        reasons = {name: workflow.can_serve(caps, spec) for name, caps in agents.items()}
        if not agents or not all(reasons.values()):
            return
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
        models = all(why.startswith("missing models") for why in reasons.values())
        raise ServiceError(
            ErrorKind.FAILED_PRECONDITION,
            "COMFYUI_MODEL_MISSING" if models else "COMFYUI_NODE_MISSING",
            f"no ComfyUI agent can run workflow {workflow.name}: {detail}",
            metadata={"workflow": workflow.name, "agents": detail[:1000]},
        )

    def _find(self, name: str) -> Workflow:
        name = name.removeprefix("workflows/")
        workflow = self._catalog.named(name)
        if workflow is not None:
            return workflow
        broken = next((b for b in self._catalog.broken if b.name == name), None)
        if broken is not None:
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "WORKFLOW_BROKEN",
                f"workflow {name} did not load: {broken.reason}",
                metadata={"workflow": name},
            )
        raise _not_found(name)


def _not_found(name: str) -> ServiceError:
    return ServiceError(
        ErrorKind.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
        f"no workflow named {name!r}",
        metadata={"workflow": name[:200]},
    )


def workflow_availability(
    workflow: Workflow, agents: Mapping[str, AgentCapabilities]
) -> tuple[list[str], str]:
    """The agents that can run ``workflow`` with its defaults, and why the others cannot."""
    able, reasons = [], []
    for name, caps in sorted(agents.items()):
        check = workflow.check(caps)
        if check.ok:
            able.append(name)
        else:
            reasons.append(f"{name}: {check.reason}")
    if able:
        return able, ""
    return able, "; ".join(reasons) or "no ComfyUI agent online"


def workflow_to_proto(
    workflow: Workflow, agents: Mapping[str, AgentCapabilities], max_text: int
) -> wpb.Workflow:
    """``max_text``: the longest string of a parameter whose binding names no limit."""
    able, why = workflow_availability(workflow, agents)
    return wpb.Workflow(
        name=f"workflows/{workflow.name}",
        title=workflow.title,
        description=workflow.description,
        version=workflow.version,
        parameters=[param_to_proto(p, max_text) for p in workflow.params],
        inputs=[
            wpb.WorkflowInput(
                name=i.name,
                kind=_INPUT_KINDS.get(i.kind, wpb.INPUT_KIND_IMAGE),
                description=i.description,
                required=i.required,
            )
            for i in workflow.input_specs
        ],
        outputs=[
            wpb.WorkflowOutput(kind=_OUTPUT_KINDS[o.kind], node=o.node) for o in workflow.outputs
        ],
        available=bool(able),
        agents=able,
        unavailable_reason=why,
        task=task_to_proto(workflow.task)
        if workflow.task is not TaskKind.WORKFLOW
        else common_pb2.TASK_UNSPECIFIED,
    )


def broken_to_proto(broken: BrokenWorkflow) -> wpb.Workflow:
    return wpb.Workflow(
        name=f"workflows/{broken.name}",
        available=False,
        unavailable_reason=f"binding not loaded: {broken.reason}",
    )


def param_to_proto(spec: ParamSpec, max_text: int) -> wpb.WorkflowParameter:
    msg = wpb.WorkflowParameter(
        name=spec.name,
        type=_TYPES[spec.type],
        title=spec.title,
        description=spec.description,
        required=spec.required,
        random=spec.random,
        max_length=(spec.max_length or max_text) if spec.type == "string" else 0,
        choices=[_value(c) for c in spec.choices],
    )
    if spec.has_default and spec.default is not None:
        msg.default_value.CopyFrom(_value(spec.default))
    if spec.minimum is not None:
        msg.minimum = spec.minimum
    if spec.maximum is not None:
        msg.maximum = spec.maximum
    return msg


def _value(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int | float):
        out.number_value = float(value)
    else:
        out.string_value = str(value)
    return out

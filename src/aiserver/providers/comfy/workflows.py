"""ComfyUI workflows: one API-format graph plus one declarative binding per workflow.

A binding (``<name>.binding.json``, format and JSON Schema in ``workflows/``) names the workflow,
types its parameters, and says which parameter or input file sets which node input(s), the
defaults, the output node(s), the models and node types the graph needs. :meth:`Workflow.build`
places values as JSON values into a deep copy of the graph, never by text substitution, so any
prompt text arrives exactly as given.

Every binding is a named workflow callable by ``RunWorkflow``; a binding with ``task`` is also
that built-in task's implementation. Workflows load from the built-in ``workflows/`` folder and
an optional user folder whose bindings replace built-in ones by task and by name (and whose
graphs shadow built-in graphs of the same file name).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiserver.errors import ErrorKind, ServiceError
from aiserver.providers.base import WorkItem
from aiserver.providers.comfy.binding_schema import SCHEMA_FILE, check_binding_schema
from aiserver.providers.comfy.json_lines import JsonPath, line_of, locate
from aiserver.providers.comfy.workflow_params import ParamSpec, infer_type
from aiserver.tasks import (
    DEFAULT_NEGATIVE_PROMPT,
    MAX_SEED,
    ImageToImageSpec,
    ImageToTextSpec,
    ImageUpscaleSpec,
    ImageWithMaskSpec,
    TaskKind,
    TaskSpec,
    WorkflowSpec,
)

__all__ = [
    "KNOWN_MODEL_INPUTS",
    "AgentCapabilities",
    "BrokenWorkflow",
    "BuiltPrompt",
    "InputSpec",
    "ModelNeed",
    "OutputBinding",
    "Workflow",
    "WorkflowCatalog",
    "WorkflowCheck",
    "WorkflowFormatError",
    "combo_options",
    "default_workflows_dir",
    "pinned_documents",
    "workflow_from_documents",
]

logger = logging.getLogger(__name__)

#: Loader inputs whose combo options are model files, by ComfyUI model folder (for discovery).
KNOWN_MODEL_INPUTS: Mapping[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("DownloadAndLoadFlorence2Model", "model"): "LLM",
}

_SPEC_TYPES: Mapping[TaskKind, type[TaskSpec]] = {
    TaskKind.IMAGE_TO_IMAGE: ImageToImageSpec,
    TaskKind.IMAGE_WITH_MASK: ImageWithMaskSpec,
    TaskKind.IMAGE_UPSCALE: ImageUpscaleSpec,
    TaskKind.IMAGE_TO_TEXT: ImageToTextSpec,
    TaskKind.WORKFLOW: WorkflowSpec,
}
# Named constants a binding may use as a default (``"default_const"``).
_CONSTANTS: Mapping[str, Any] = {"DEFAULT_NEGATIVE_PROMPT": DEFAULT_NEGATIVE_PROMPT}
_OUTPUT_KINDS = ("images", "text")
_JOB_FIELDS = {"job_id": "J", "task": "T", "attempt": 1, "workflow": "W"}
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def default_workflows_dir() -> Path:
    """The built-in workflows: ``aiserver/builtin_workflows``, which is the repository's
    top-level ``workflows/`` (a link) in a checkout and a copy of it in an installed wheel."""
    return (Path(__file__).resolve().parents[2] / "builtin_workflows").resolve()


class WorkflowFormatError(ValueError):
    """A graph or binding file is malformed; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class _Target:
    node: str
    input: str


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    targets: tuple[_Target, ...]
    default: Any = None
    has_default: bool = False
    random: bool = False
    spec: ParamSpec | None = None


@dataclass(frozen=True, slots=True)
class InputSpec:
    """A file input of a workflow: the node input that gets the uploaded file's name."""

    name: str
    kind: str
    """``image`` or ``mask`` (any image file; a mask is read by the graph's mask loader)."""
    description: str = ""
    required: bool = True


@dataclass(frozen=True, slots=True)
class _Size:
    targets: tuple[_Target, ...]
    field: str
    dimension: str
    multiply: float


@dataclass(frozen=True, slots=True)
class _JobValue:
    targets: tuple[_Target, ...]
    format: str


@dataclass(frozen=True, slots=True)
class OutputBinding:
    """A node whose ``executed`` output is a result: ``images`` or ``text``."""

    node: str
    kind: str


@dataclass(frozen=True, slots=True)
class _ModelRef:
    node: str
    input: str
    folder: str


@dataclass(frozen=True, slots=True)
class ModelNeed:
    """A model file a run needs: the value a loader input will get."""

    node: str
    class_type: str
    input: str
    folder: str
    name: str


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    """A graph ready for ``POST /prompt``, with what the client needs to follow it."""

    graph: dict[str, Any]
    seed: int | None
    outputs: tuple[OutputBinding, ...]
    nodes_to_run: frozenset[str]
    """The output nodes and everything they depend on: what ComfyUI will execute."""
    socket_outputs: frozenset[str] = frozenset()
    """The bound outputs sent over the websocket instead (:mod:`.socket_outputs`)."""

    def class_type(self, node: str) -> str:
        entry = self.graph.get(node)
        return str(entry.get("class_type", "")) if isinstance(entry, dict) else ""


def combo_options(spec: Any) -> tuple[str, ...] | None:
    """Options of a combo input spec in either ``/object_info`` shape, else None.

    Old shape: ``[["a", "b"], {...}]``; new shape: ``["COMBO", {"options": ["a", "b"]}]``.
    """
    if not isinstance(spec, list) or not spec:
        return None
    head = spec[0]
    if isinstance(head, list):
        return tuple(str(o) for o in head)
    if head == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
        if isinstance(options, list):
            return tuple(str(o) for o in options)
    return None


@dataclass(frozen=True, slots=True)
class AgentCapabilities:
    """What one agent's ``/object_info`` says it has: node types and combo options."""

    nodes: frozenset[str]
    combos: Mapping[str, Mapping[str, tuple[str, ...]]]
    output_nodes: frozenset[str] = frozenset()

    @classmethod
    def from_object_info(cls, info: Mapping[str, Any]) -> AgentCapabilities:
        combos: dict[str, dict[str, tuple[str, ...]]] = {}
        outputs: set[str] = set()
        for class_type, entry in info.items():
            if not isinstance(entry, dict):
                continue
            if entry.get("output_node") is True:
                outputs.add(class_type)
            inputs = entry.get("input")
            if not isinstance(inputs, dict):
                continue
            for category in ("required", "optional"):
                group = inputs.get(category)
                if not isinstance(group, dict):
                    continue
                for name, spec in group.items():
                    options = combo_options(spec)
                    if options is not None:
                        combos.setdefault(class_type, {})[name] = options
        return cls(frozenset(info), combos, frozenset(outputs))

    def options(self, class_type: str, input_name: str) -> tuple[str, ...] | None:
        return self.combos.get(class_type, {}).get(input_name)

    def has_model(self, need: ModelNeed) -> bool:
        """False only when the loader's combo is known and lacks the name."""
        options = self.options(need.class_type, need.input)
        return options is None or need.name in options

    def models_by_folder(
        self, extra: Iterable[tuple[str, str, str]] = ()
    ) -> dict[str, tuple[str, ...]]:
        """Model files by ComfyUI folder, from known loaders and ``(class, input, folder)``."""
        found: dict[str, set[str]] = {}
        known = {**KNOWN_MODEL_INPUTS, **{(c, i): f for c, i, f in extra}}
        for (class_type, input_name), folder in known.items():
            options = self.options(class_type, input_name)
            if options is not None:
                found.setdefault(folder, set()).update(options)
        return {folder: tuple(sorted(names)) for folder, names in sorted(found.items())}


@dataclass(frozen=True, slots=True)
class WorkflowCheck:
    """A workflow checked against one agent."""

    task: TaskKind
    missing_nodes: tuple[str, ...] = ()
    missing_models: tuple[ModelNeed, ...] = ()
    """Default models the agent lacks; specs naming a model it has can still run."""

    @property
    def nodes_ok(self) -> bool:
        return not self.missing_nodes

    @property
    def ok(self) -> bool:
        return not self.missing_nodes and not self.missing_models

    @property
    def reason(self) -> str:
        parts = []
        if self.missing_nodes:
            parts.append("missing node types: " + ", ".join(self.missing_nodes))
        if self.missing_models:
            parts.append(
                "missing models: "
                + ", ".join(
                    f"{m.folder}/{m.name} ({m.class_type}.{m.input})" for m in self.missing_models
                )
            )
        return "; ".join(parts)


class Workflow:
    """One graph and its binding, validated at load time."""

    def __init__(
        self,
        *,
        task: TaskKind,
        graph: Mapping[str, Any],
        inputs: Mapping[str, _Target],
        params: Sequence[_Param],
        sizes: Sequence[_Size],
        job: Sequence[_JobValue],
        outputs: Sequence[OutputBinding],
        models: Sequence[_ModelRef],
        source: str,
        description: str = "",
        name: str = "",
        title: str = "",
        input_specs: Sequence[InputSpec] = (),
        documents: Mapping[str, Any] | None = None,
    ) -> None:
        self.task = task
        """The built-in task this binding implements, or WORKFLOW."""
        self._graph = copy.deepcopy(dict(graph))
        self._inputs = dict(inputs)
        self._params = tuple(params)
        self._sizes = tuple(sizes)
        self._job = tuple(job)
        self.outputs = tuple(outputs)
        self._models = tuple(models)
        self.source = source
        self.description = description
        self.name = name or task.value
        self.title = title
        specs = {s.name: s for s in input_specs}
        self.input_specs = tuple(
            specs.get(n, InputSpec(n, "mask" if n == "mask" else "image")) for n in self._inputs
        )
        self.documents: dict[str, Any] = copy.deepcopy(
            dict(documents) if documents is not None else {"binding": {}, "graph": self._graph}
        )
        self.version = _version(self.documents)
        self.documents["version"] = self.version
        self.nodes = frozenset(str(n["class_type"]) for n in self._graph.values())
        self.nodes_to_run = _ancestors(self._graph, [o.node for o in self.outputs])
        self._model_params = tuple(
            (
                ref,
                self._graph[ref.node]["inputs"].get(ref.input),
                tuple(
                    p
                    for p in self._params
                    if any(t.node == ref.node and t.input == ref.input for t in p.targets)
                ),
            )
            for ref in self._models
        )

    @property
    def graph(self) -> dict[str, Any]:
        """A copy of the template graph."""
        return copy.deepcopy(self._graph)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The upload fields the graph reads (optional ones included)."""
        return tuple(self._inputs)

    def input_target(self, name: str) -> tuple[str, str]:
        """``(node, input)`` that gets the uploaded file's name for the upload field ``name``."""
        target = self._inputs[name]
        return target.node, target.input

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.input_specs if s.required)

    @property
    def params(self) -> tuple[ParamSpec, ...]:
        """Every parameter a caller may send, typed."""
        return tuple(p.spec for p in self._params if p.spec is not None)

    @property
    def model_inputs(self) -> tuple[tuple[str, str, str], ...]:
        """``(class_type, input, folder)`` of every model this workflow declares."""
        return tuple((self._class(m.node), m.input, m.folder) for m in self._models)

    def _class(self, node: str) -> str:
        return str(self._graph[node]["class_type"])

    def is_model_input(self, node: str, input_name: str) -> bool:
        if any(m.node == node and m.input == input_name for m in self._models):
            return True
        class_type = str(self._graph.get(node, {}).get("class_type", ""))
        return (class_type, input_name) in KNOWN_MODEL_INPUTS

    def field_for(self, node: str, input_name: str) -> str | None:
        """The request field that sets this node input (``params.model``), if any."""
        for param in self._params:
            if any(t.node == node and t.input == input_name for t in param.targets):
                return f"params.{param.name}"
        for name, target in self._inputs.items():
            if target.node == node and target.input == input_name:
                return name
        return None

    def models_for(self, spec: TaskSpec | None) -> tuple[ModelNeed, ...]:
        """The model files a run of ``spec`` needs (``None``: the defaults)."""
        # Asked for every agent at every placement: the params that set each model are found
        # once, at load.
        needs = []
        for ref, default, params in self._model_params:
            value = default
            for param in params:
                chosen = self._param_value(spec, param, seed=0)
                if chosen is not _UNSET:
                    value = chosen
            needs.append(
                ModelNeed(ref.node, self._class(ref.node), ref.input, ref.folder, str(value))
            )
        return tuple(needs)

    def check(self, caps: AgentCapabilities) -> WorkflowCheck:
        """Missing node types and default models on an agent."""
        return WorkflowCheck(
            self.task,
            missing_nodes=tuple(sorted(self.nodes - caps.nodes)),
            missing_models=tuple(m for m in self.models_for(None) if not caps.has_model(m)),
        )

    def can_serve(self, caps: AgentCapabilities, spec: TaskSpec) -> str:
        """Why ``caps`` cannot run ``spec`` (empty string: it can)."""
        return self.unmet(caps, self.models_for(spec))

    def unmet(self, caps: AgentCapabilities, needs: Iterable[ModelNeed]) -> str:
        """Why ``caps`` cannot run a spec that needs ``needs`` (:meth:`models_for`); empty
        string: it can. Placement asks it of every agent for one spec, whose needs are found
        once."""
        if not self.nodes <= caps.nodes:
            return "missing node types: " + ", ".join(sorted(self.nodes - caps.nodes))
        missing = [m for m in needs if not caps.has_model(m)]
        if missing:
            return "missing models: " + ", ".join(f"{m.folder}/{m.name}" for m in missing)
        return ""

    def build(
        self, work: WorkItem, uploads: Mapping[str, str], *, seed: int | None = None
    ) -> BuiltPrompt:
        """The graph for ``work``; ``uploads`` maps input fields to names ComfyUI returned.

        ``seed`` replaces a random seed (re-queueing a resumed run must reuse its seed).
        """
        if work.task is not self.task and work.task is not TaskKind.WORKFLOW:
            raise ValueError(f"workflow for {self.task.value} cannot build {work.task.value}")
        graph = _copy_nodes(self._graph)
        required = set(self.required_inputs)
        for name, target in self._inputs.items():
            if name not in uploads:
                if name not in required:
                    continue  # an optional input: the graph's own value stays
                raise ServiceError(
                    ErrorKind.INVALID_ARGUMENT,
                    "MISSING_INPUT",
                    f"missing input: {name}",
                    metadata={"field": name},
                )
            _place(graph, (target,), uploads[name])
        chosen_seed: int | None = None
        seed_bound = False
        for param in self._params:
            value = self._param_value(work.spec, param, seed=seed)
            if value is _UNSET:
                continue
            if param.name == "seed":
                chosen_seed, seed_bound = int(value), True
            _place(graph, param.targets, value)
        for size in self._sizes:
            source = work.inputs.get(size.field)
            dimension = getattr(source, size.dimension, 0) if source is not None else 0
            if not dimension or dimension <= 0:
                raise ServiceError(
                    ErrorKind.INVALID_ARGUMENT,
                    "INPUT_SIZE_UNKNOWN",
                    f"input {size.field} has no {size.dimension}",
                    metadata={"field": size.field},
                )
            _place(graph, size.targets, round(dimension * size.multiply))
        for job_value in self._job:
            text = job_value.format.format(
                job_id=_UNSAFE_NAME.sub("_", work.job_id),
                task=self.task.value,
                attempt=work.attempt,
                workflow=_UNSAFE_NAME.sub("_", self.name),
            )
            _place(graph, job_value.targets, text)
        if not seed_bound:
            spec_seed = _spec_value(work.spec, "seed")
            chosen_seed = spec_seed if isinstance(spec_seed, int) else None
        return BuiltPrompt(graph, chosen_seed, self.outputs, self.nodes_to_run)

    def _param_value(self, spec: TaskSpec | None, param: _Param, *, seed: int | None) -> Any:
        value = _spec_value(spec, param.name) if spec is not None else None
        if spec is None or _is_unset(spec, param.name, value):
            if param.random:
                return seed if seed is not None else secrets.randbelow(MAX_SEED + 1)
            return param.default if param.has_default else _UNSET
        return value


def _spec_value(spec: TaskSpec, name: str) -> Any:
    if isinstance(spec, WorkflowSpec):
        return spec.params.get(name)
    return getattr(spec, name, None)


def _version(documents: Mapping[str, Any]) -> str:
    """A hash of the graph and binding: what a job runs, whatever the files say later."""
    text = json.dumps(
        {"binding": documents.get("binding"), "graph": documents.get("graph")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def _is_unset(spec: TaskSpec, name: str, value: Any) -> bool:
    # None is unset; so is "" for string fields whose own default is "" (model, sampler...).
    if value is None:
        return True
    if isinstance(spec, WorkflowSpec):
        return False
    if value == "":
        empty = _EMPTY_DEFAULTS.get(type(spec))
        if empty is None:
            empty = frozenset(f.name for f in dataclasses.fields(spec) if f.default == "")
            _EMPTY_DEFAULTS[type(spec)] = empty
        return name in empty
    return False


_EMPTY_DEFAULTS: dict[type, frozenset[str]] = {}
"""The fields of each spec type whose own default is ``""``: asked per param per placement."""


def _copy_nodes(graph: Mapping[str, Any]) -> dict[str, Any]:
    """A graph whose node and ``inputs`` dicts are new: enough for a build, which only sets
    inputs (values are never changed in place), at a fraction of a deep copy's cost per job.
    Links and other leaves are the template's, shared."""
    return {
        node: {**entry, "inputs": dict(entry.get("inputs") or {})} for node, entry in graph.items()
    }


def _place(graph: dict[str, Any], targets: Iterable[_Target], value: Any) -> None:
    for target in targets:
        copied = copy.deepcopy(value) if isinstance(value, list | dict) else value
        graph[target.node]["inputs"][target.input] = copied


def _ancestors(graph: Mapping[str, Any], roots: Iterable[str]) -> frozenset[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen or node not in graph:
            continue
        seen.add(node)
        for value in graph[node].get("inputs", {}).values():
            if _is_link(value):
                stack.append(str(value[0]))
    return frozenset(seen)


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


@dataclass(frozen=True, slots=True)
class BrokenWorkflow:
    """A binding that did not load: listed as unavailable, with the reason."""

    name: str
    source: str
    reason: str


class WorkflowCatalog:
    """Workflows by name, and the one implementing each built-in task.

    :meth:`replace` swaps the contents in place (a reload), so holders keep one object; a job
    never reads its workflow from here once accepted (see :meth:`resolve`).
    """

    def __init__(
        self, workflows: Iterable[Workflow], broken: Iterable[BrokenWorkflow] = ()
    ) -> None:
        self._by_task: dict[TaskKind, Workflow] = {}
        self._by_name: dict[str, Workflow] = {}
        for workflow in workflows:
            if workflow.task is not TaskKind.WORKFLOW:
                self._by_task[workflow.task] = workflow
            self._by_name[workflow.name] = workflow
        self.broken: tuple[BrokenWorkflow, ...] = tuple(broken)
        self._pinned: dict[str, Workflow] = {}

    @classmethod
    def load(
        cls,
        builtin_dir: Path | None = None,
        user_dir: Path | None = None,
        *,
        strict: bool = True,
    ) -> WorkflowCatalog:
        """Read ``*.binding.json`` from both folders; a user binding replaces the built-in one
        of the same task or name.

        Graphs are looked up in the user folder first, so a user graph named like a built-in
        one shadows it. ``strict``: the first bad file raises :class:`WorkflowFormatError`;
        otherwise bad files are kept in :attr:`broken` and the others load.
        """
        builtin = builtin_dir if builtin_dir is not None else default_workflows_dir()
        if not builtin.is_dir():
            raise WorkflowFormatError(f"{builtin}: workflows folder not found")
        if user_dir is not None and not user_dir.is_dir():
            if strict:
                raise WorkflowFormatError(f"{user_dir}: user workflows folder not found")
            user_dir = None
        search = [user_dir, builtin] if user_dir is not None else [builtin]
        loaded: list[Workflow] = []
        broken: list[BrokenWorkflow] = []
        for folder in search:  # the user's first: what they bind is never read from built-ins
            seen: dict[str, Path] = {}
            for path in sorted(folder.glob("*.binding.json")):
                name = path.name.removesuffix(".binding.json")
                if folder is not search[0] and _taken(path, name, loaded):
                    logger.info("workflow %s: the user folder's binding replaces %s", name, path)
                    continue
                try:
                    workflow = _load_binding(path, search=search)
                    key = workflow.task.value if workflow.task is not TaskKind.WORKFLOW else ""
                    for label in filter(None, (key, workflow.name)):
                        if label in seen:
                            raise WorkflowFormatError(
                                f"{path}: a second binding for {label} (first: {seen[label].name})"
                            )
                        seen[label] = path
                except WorkflowFormatError as exc:
                    if strict:
                        raise
                    logger.error("workflow %s not loaded: %s", path, exc)
                    broken.append(BrokenWorkflow(name, str(path), str(exc)))
                    continue
                loaded.append(workflow)
        shadowed = {w.name for w in loaded}
        return cls(loaded, [b for b in broken if b.name not in shadowed])

    def replace(self, other: WorkflowCatalog) -> None:
        """Take ``other``'s workflows (a reload)."""
        self._by_task = dict(other._by_task)
        self._by_name = dict(other._by_name)
        self.broken = other.broken

    @property
    def tasks(self) -> tuple[TaskKind, ...]:
        return tuple(self._by_task)

    def workflows(self) -> tuple[Workflow, ...]:
        """Every loaded workflow, by name."""
        return tuple(self._by_name[n] for n in sorted(self._by_name))

    def named(self, name: str) -> Workflow | None:
        return self._by_name.get(name)

    def get(self, task: TaskKind) -> Workflow:
        try:
            return self._by_task[task]
        except KeyError:
            raise ServiceError(
                ErrorKind.UNIMPLEMENTED,
                "WORKFLOW_MISSING",
                f"no ComfyUI workflow for {task.value}",
                metadata={"task": task.value},
            ) from None

    def find(self, task: TaskKind) -> Workflow | None:
        return self._by_task.get(task)

    def resolve(self, task: TaskKind, spec: TaskSpec | None) -> Workflow | None:
        """The workflow that runs ``spec``: the version it was accepted with (rebuilt from the
        documents the job carries, whatever the folder says now), else the task's current one
        (a job accepted before versions were pinned)."""
        documents = pinned_documents(spec)
        if not documents:
            return None if isinstance(spec, WorkflowSpec) else self.find(task)
        key = str(documents.get("version") or _version(documents))
        found = self._pinned.get(key)
        if found is None:
            found = workflow_from_documents(documents)
            if len(self._pinned) >= 64:
                self._pinned.pop(next(iter(self._pinned)))
            self._pinned[key] = found
        return found

    def check(self, caps: AgentCapabilities) -> dict[TaskKind, WorkflowCheck]:
        """Every built-in task's workflow checked against one agent."""
        return {task: wf.check(caps) for task, wf in self._by_task.items()}

    def model_inputs(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(m for wf in self._by_name.values() for m in wf.model_inputs)


def _taken(path: Path, name: str, loaded: Sequence[Workflow]) -> bool:
    """Whether a user workflow already has this built-in binding's name or task (then the
    built-in one is not read: it may refer to a graph the user folder shadows)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    name = str(data.get("name") or name)
    task = data.get("task")
    return any(w.name == name or (task and w.task.value == task) for w in loaded)


def pinned_documents(spec: TaskSpec | None) -> dict[str, Any]:
    """The graph and binding a job was accepted with (empty when it carries none)."""
    if isinstance(spec, WorkflowSpec):
        return spec.documents
    documents: dict[str, Any] = getattr(spec, "workflow_documents", None) or {}
    return documents


def workflow_from_documents(documents: Mapping[str, Any]) -> Workflow:
    """A workflow rebuilt from what a job stored (``binding``, ``graph``, ``source``)."""
    binding, graph = documents.get("binding"), documents.get("graph")
    source = str(documents.get("source", "job"))
    _check_graph(graph, source)
    if not isinstance(binding, dict) or not isinstance(graph, dict):
        raise WorkflowFormatError(f"{source}: a binding is a JSON object")
    text = json.dumps(binding, indent=1)
    return _parse_binding(binding, graph, _Context(source, graph, text, locate(text)), source)


# ---- loading ----------------------------------------------------------------------------


def _load_binding(path: Path, *, search: Sequence[Path]) -> Workflow:
    text, data = _read_json(path)
    where = str(path)
    ctx = _Context(where, {}, text, locate(text))
    problem = check_binding_schema(data, default_workflows_dir() / SCHEMA_FILE)
    if problem is not None:
        json_path, message = problem
        raise ctx.error(json_path, message)
    graph_name = data["graph"]
    graph_path = next((d / graph_name for d in search if (d / graph_name).is_file()), None)
    if graph_path is None:
        raise ctx.error(("graph",), f"graph {graph_name} not found")
    _, graph = _read_json(graph_path)
    _check_graph(graph, str(graph_path))
    data.setdefault("name", path.name.removesuffix(".binding.json"))
    return _parse_binding(data, graph, dataclasses.replace(ctx, graph=graph), where)


def _parse_binding(data: dict[str, Any], graph: Any, ctx: _Context, where: str) -> Workflow:
    task = TaskKind(data["task"]) if "task" in data else TaskKind.WORKFLOW
    name = str(data.get("name") or task.value)
    spec_fields = (
        {f.name: f for f in dataclasses.fields(_SPEC_TYPES[task])}
        if task is not TaskKind.WORKFLOW
        else {}
    )
    inputs: dict[str, _Target] = {}
    input_specs: list[InputSpec] = []
    raw_inputs = ctx.mapping(data.get("inputs", {}), "inputs")
    for needed in task.inputs:
        if needed not in raw_inputs:
            raise ctx.error(("inputs",), f"inputs.{needed} is not bound")
    for input_name, raw in raw_inputs.items():
        if task is not TaskKind.WORKFLOW and input_name not in task.inputs:
            raise ctx.error(("inputs", input_name), f"{task.value} has no such input")
        (target,) = ctx.targets(raw, f"inputs.{input_name}", single=True)
        inputs[input_name] = target
        entry = ctx.mapping(raw, f"inputs.{input_name}")
        input_specs.append(
            InputSpec(
                input_name,
                str(entry.get("kind", "mask" if input_name == "mask" else "image")),
                str(entry.get("description", "")),
                entry.get("required", True) is not False or input_name in task.inputs,
            )
        )

    params = []
    for param_name, raw in ctx.mapping(data.get("params", {}), "params").items():
        if spec_fields and param_name not in spec_fields:
            raise ctx.error(("params", param_name), f"not a field of {task.value}")
        entry = ctx.mapping(raw, f"params.{param_name}")
        has_default = "default" in entry or "default_const" in entry
        default = entry.get("default")
        if "default_const" in entry:
            const = entry["default_const"]
            if const not in _CONSTANTS:
                raise ctx.error(
                    ("params", param_name, "default_const"), f"one of {', '.join(_CONSTANTS)}"
                )
            default = _CONSTANTS[const]
        random = entry.get("random", False) is True
        if random and param_name != "seed":
            raise ctx.error(("params", param_name, "random"), "only seed can be random")
        targets = ctx.targets(entry, f"params.{param_name}")
        first = targets[0]
        graph_value = graph[first.node]["inputs"][first.input]
        kind = entry.get("type") or infer_type(default if has_default else graph_value)
        choices = tuple(entry.get("choices", ()))
        if has_default and choices and default not in choices:
            raise ctx.error(("params", param_name, "default"), "not one of the choices")
        spec = ParamSpec(
            name=param_name,
            type=str(kind),
            description=str(entry.get("description", "")),
            title=str(entry.get("title", "")),
            required=entry.get("required", False) is True,
            default=default,
            has_default=has_default,
            random=random,
            minimum=entry.get("minimum"),
            maximum=entry.get("maximum"),
            max_length=entry.get("max_length"),
            choices=choices,
        )
        params.append(_Param(param_name, targets, default, has_default, random, spec))

    sizes = []
    for i, raw in enumerate(ctx.sequence(data.get("sizes", []), "sizes")):
        entry = ctx.mapping(raw, f"sizes[{i}]")
        source, dimension = entry.get("from"), entry.get("dimension")
        multiply = entry.get("multiply", 1)
        if source not in inputs:
            raise ctx.error(("sizes", i, "from"), "must name an input")
        if dimension not in ("width", "height"):
            raise ctx.error(("sizes", i, "dimension"), "width or height")
        if not isinstance(multiply, int | float) or isinstance(multiply, bool) or multiply <= 0:
            raise ctx.error(("sizes", i, "multiply"), "a positive number")
        sizes.append(
            _Size(ctx.targets(entry, f"sizes[{i}]"), str(source), dimension, float(multiply))
        )

    job = []
    for i, raw in enumerate(ctx.sequence(data.get("job", []), "job")):
        entry = ctx.mapping(raw, f"job[{i}]")
        fmt = entry.get("format")
        try:
            if not isinstance(fmt, str):
                raise TypeError
            fmt.format(**_JOB_FIELDS)
        except (KeyError, IndexError, ValueError, TypeError):
            raise ctx.error(
                ("job", i, "format"),
                "a string using only {job_id}, {task}, {workflow}, {attempt}",
            ) from None
        job.append(_JobValue(ctx.targets(entry, f"job[{i}]"), fmt))

    outputs = []
    for i, raw in enumerate(ctx.sequence(data.get("outputs"), "outputs")):
        entry = ctx.mapping(raw, f"outputs[{i}]")
        node, kind = entry.get("node"), entry.get("kind")
        if not isinstance(node, str) or node not in graph:
            raise ctx.error(("outputs", i, "node"), "not a node of the graph")
        if kind not in _OUTPUT_KINDS:
            raise ctx.error(("outputs", i, "kind"), "images or text")
        outputs.append(OutputBinding(node, str(kind)))
    if not outputs:
        raise ctx.error(("outputs",), "at least one output node")

    models = []
    for i, raw in enumerate(ctx.sequence(data.get("models", []), "models")):
        entry = ctx.mapping(raw, f"models[{i}]")
        (target,) = ctx.targets(entry, f"models[{i}]", single=True)
        folder = entry.get("folder")
        if not isinstance(folder, str) or not folder:
            raise ctx.error(("models", i, "folder"), "a ComfyUI model folder")
        models.append(_ModelRef(target.node, target.input, folder))

    in_graph = sorted({str(n["class_type"]) for n in graph.values()})
    declared = data.get("nodes")
    if declared is not None and sorted(set(ctx.sequence(declared, "nodes"))) != in_graph:
        raise ctx.error(
            ("nodes",), f"nodes must list the graph's node types: {', '.join(in_graph)}"
        )
    description = data.get("description", "")
    return Workflow(
        task=task,
        graph=graph,
        inputs=inputs,
        params=params,
        sizes=sizes,
        job=job,
        outputs=outputs,
        models=models,
        source=where,
        description=description if isinstance(description, str) else "",
        name=name,
        title=str(data.get("title", "")),
        input_specs=input_specs,
        documents={"binding": data, "graph": graph, "source": where},
    )


def _read_json(path: Path) -> tuple[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        return text, json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowFormatError(f"{path}:{exc.lineno}: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowFormatError(f"{path}: {exc}") from exc


def _check_graph(graph: Any, where: str) -> None:
    if not isinstance(graph, dict) or not graph:
        raise WorkflowFormatError(f"{where}: an API-format graph is a non-empty JSON object")
    for node_id, node in graph.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.get("inputs"), dict)
        ):
            raise WorkflowFormatError(f"{where}: node {node_id} needs class_type and inputs")
        for name, value in node["inputs"].items():
            if _is_link(value) and value[0] not in graph:
                raise WorkflowFormatError(
                    f"{where}: node {node_id} input {name} links to missing node {value[0]}"
                )


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class _Context:
    where: str
    graph: Mapping[str, Any]
    text: str = ""
    offsets: Mapping[JsonPath, int] = dataclasses.field(default_factory=dict)

    def error(self, path: JsonPath, message: str) -> WorkflowFormatError:
        """An error naming the file, the line of ``path`` and the path."""
        line = line_of(self.text, dict(self.offsets), path)
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        return WorkflowFormatError(f"{self.where}:{line}: {dotted or '(root)'}: {message}")

    def _fail(self, path: str, message: str) -> WorkflowFormatError:
        parts: list[str | int] = [
            int(index) if index else key for key, index in _PATH_PART.findall(path)
        ]
        return self.error(tuple(parts), message)

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self._fail(path, "a JSON object")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self._fail(path, "a JSON array")
        return value

    def targets(self, entry: Any, path: str, *, single: bool = False) -> tuple[_Target, ...]:
        entry = self.mapping(entry, path)
        raw = entry.get("targets") if "targets" in entry else [entry]
        found = []
        for raw_item in self.sequence(raw, f"{path}.targets"):
            item = self.mapping(raw_item, path)
            node, name = item.get("node"), item.get("input")
            if not isinstance(node, str) or node not in self.graph:
                raise self._fail(path, f"node {node!r} not in the graph")
            if not isinstance(name, str) or name not in self.graph[node]["inputs"]:
                raise self._fail(path, f"node {node} has no input {name!r}")
            if _is_link(self.graph[node]["inputs"][name]):
                raise self._fail(path, f"node {node} input {name} is a link, not a value")
            found.append(_Target(node, name))
        if not found or (single and len(found) != 1):
            raise self._fail(path, f"{'one' if single else 'a'} target")
        return tuple(found)

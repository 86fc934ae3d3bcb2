"""ComfyUI workflows: one API-format graph plus one declarative binding per task.

A binding (``<name>.binding.json``, format in ``workflows/README.md``) says which spec field or
input file sets which node input, the defaults, the output node(s), the models and node types
the graph needs. :meth:`Workflow.build` places values as JSON values into a deep copy of the
graph, never by text substitution, so any prompt text arrives exactly as given.

Workflows load from the built-in ``workflows/`` folder and an optional user folder whose bindings
replace built-in ones task by task (and whose graphs shadow built-in graphs of the same name).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiserver.errors import ErrorKind, ServiceError
from aiserver.providers.base import WorkItem
from aiserver.tasks import (
    DEFAULT_NEGATIVE_PROMPT,
    MAX_SEED,
    ImageToImageSpec,
    ImageToTextSpec,
    ImageUpscaleSpec,
    ImageWithMaskSpec,
    TaskKind,
    TaskSpec,
)

__all__ = [
    "KNOWN_MODEL_INPUTS",
    "AgentCapabilities",
    "BuiltPrompt",
    "ModelNeed",
    "OutputBinding",
    "Workflow",
    "WorkflowCatalog",
    "WorkflowCheck",
    "WorkflowFormatError",
    "combo_options",
    "default_workflows_dir",
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
}
# Named constants a binding may use as a default (``"default_const"``).
_CONSTANTS: Mapping[str, Any] = {"DEFAULT_NEGATIVE_PROMPT": DEFAULT_NEGATIVE_PROMPT}
_OUTPUT_KINDS = ("images", "text")
_JOB_FIELDS = {"job_id": "J", "task": "T", "attempt": 1}
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
    socket_outputs: Mapping[str, str] = field(default_factory=dict)
    """``SaveImageWebsocket`` node -> the bound output it also sends (:mod:`.socket_outputs`)."""

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
    """One task's graph and binding, validated at load time."""

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
    ) -> None:
        self.task = task
        self._graph = copy.deepcopy(dict(graph))
        self._inputs = dict(inputs)
        self._params = tuple(params)
        self._sizes = tuple(sizes)
        self._job = tuple(job)
        self.outputs = tuple(outputs)
        self._models = tuple(models)
        self.source = source
        self.description = description
        self.nodes = frozenset(str(n["class_type"]) for n in self._graph.values())
        self.nodes_to_run = _ancestors(self._graph, [o.node for o in self.outputs])

    @property
    def graph(self) -> dict[str, Any]:
        """A copy of the template graph."""
        return copy.deepcopy(self._graph)

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
        needs = []
        for ref in self._models:
            value: Any = self._graph[ref.node]["inputs"].get(ref.input)
            for param in self._params:
                if any(t.node == ref.node and t.input == ref.input for t in param.targets):
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
        missing_nodes = sorted(self.nodes - caps.nodes)
        if missing_nodes:
            return "missing node types: " + ", ".join(missing_nodes)
        missing = [m for m in self.models_for(spec) if not caps.has_model(m)]
        if missing:
            return "missing models: " + ", ".join(f"{m.folder}/{m.name}" for m in missing)
        return ""

    def build(
        self, work: WorkItem, uploads: Mapping[str, str], *, seed: int | None = None
    ) -> BuiltPrompt:
        """The graph for ``work``; ``uploads`` maps input fields to names ComfyUI returned.

        ``seed`` replaces a random seed (re-queueing a resumed run must reuse its seed).
        """
        if work.task is not self.task:
            raise ValueError(f"workflow for {self.task.value} cannot build {work.task.value}")
        graph = copy.deepcopy(self._graph)
        for name, target in self._inputs.items():
            if name not in uploads:
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
            )
            _place(graph, job_value.targets, text)
        if not seed_bound:
            spec_seed = getattr(work.spec, "seed", None)
            chosen_seed = spec_seed if isinstance(spec_seed, int) else None
        return BuiltPrompt(graph, chosen_seed, self.outputs, self.nodes_to_run)

    def _param_value(self, spec: TaskSpec | None, param: _Param, *, seed: int | None) -> Any:
        value = getattr(spec, param.name) if spec is not None else None
        if spec is None or _is_unset(spec, param.name, value):
            if param.random:
                return seed if seed is not None else secrets.randbelow(MAX_SEED + 1)
            return param.default if param.has_default else _UNSET
        return value


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def _is_unset(spec: TaskSpec, name: str, value: Any) -> bool:
    # None is unset; so is "" for string fields whose own default is "" (model, sampler...).
    if value is None:
        return True
    if value == "":
        default = next(f.default for f in dataclasses.fields(spec) if f.name == name)
        return default == ""
    return False


def _place(graph: dict[str, Any], targets: Iterable[_Target], value: Any) -> None:
    for target in targets:
        graph[target.node]["inputs"][target.input] = copy.deepcopy(value)


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


class WorkflowCatalog:
    """The workflow of each task: built-in ones, replaced by a user folder's bindings."""

    def __init__(self, workflows: Iterable[Workflow]) -> None:
        self._by_task: dict[TaskKind, Workflow] = {}
        for workflow in workflows:
            self._by_task[workflow.task] = workflow

    @classmethod
    def load(cls, builtin_dir: Path | None = None, user_dir: Path | None = None) -> WorkflowCatalog:
        """Read ``*.binding.json`` from both folders; a user binding replaces its task's.

        Graphs are looked up in the user folder first, so a user graph named like a built-in
        one shadows it; a built-in binding whose task the user folder binds is not read at all.
        """
        builtin = builtin_dir if builtin_dir is not None else default_workflows_dir()
        if not builtin.is_dir():
            raise WorkflowFormatError(f"{builtin}: workflows folder not found")
        if user_dir is not None and not user_dir.is_dir():
            raise WorkflowFormatError(f"{user_dir}: user workflows folder not found")
        search = [user_dir, builtin] if user_dir is not None else [builtin]
        by_task: dict[TaskKind, Workflow] = {}
        for folder in search:  # the user's first: what they bind is never read from built-ins
            seen: dict[TaskKind, Path] = {}
            for path in sorted(folder.glob("*.binding.json")):
                task = _binding_task(path)
                if task in seen:
                    raise WorkflowFormatError(
                        f"{path}: a second binding for {task.value} (first: {seen[task].name})"
                    )
                seen[task] = path
                if task in by_task:
                    logger.info(
                        "workflow for %s: %s replaces %s", task.value, by_task[task].source, path
                    )
                    continue
                by_task[task] = _load_binding(path, search=search)
        return cls(sorted(by_task.values(), key=lambda w: list(TaskKind).index(w.task)))

    @property
    def tasks(self) -> tuple[TaskKind, ...]:
        return tuple(self._by_task)

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

    def check(self, caps: AgentCapabilities) -> dict[TaskKind, WorkflowCheck]:
        """Every workflow checked against one agent."""
        return {task: wf.check(caps) for task, wf in self._by_task.items()}

    def model_inputs(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(m for wf in self._by_task.values() for m in wf.model_inputs)


# ---- loading ----------------------------------------------------------------------------


def _binding_task(path: Path) -> TaskKind:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise WorkflowFormatError(f"{path}: a binding is a JSON object")
    try:
        return TaskKind(data.get("task"))
    except ValueError:
        names = ", ".join(t.value for t in TaskKind)
        raise WorkflowFormatError(f"{path}: task must be one of {names}") from None


def _load_binding(path: Path, *, search: Sequence[Path]) -> Workflow:
    data = _read_json(path)
    where = str(path)
    task = _binding_task(path)
    graph_name = data.get("graph")
    if not isinstance(graph_name, str) or "/" in graph_name or "\\" in graph_name:
        raise WorkflowFormatError(f"{where}: graph must be a file name next to the binding")
    graph_path = next((d / graph_name for d in search if (d / graph_name).is_file()), None)
    if graph_path is None:
        raise WorkflowFormatError(f"{where}: graph {graph_name} not found")
    graph = _read_json(graph_path)
    _check_graph(graph, str(graph_path))
    ctx = _Context(where, graph)

    spec_fields = {f.name: f for f in dataclasses.fields(_SPEC_TYPES[task])}
    inputs = {}
    raw_inputs = ctx.mapping(data.get("inputs", {}), "inputs")
    for name in task.inputs:
        if name not in raw_inputs:
            raise WorkflowFormatError(f"{where}: inputs.{name} is not bound")
    for name, raw in raw_inputs.items():
        if name not in task.inputs:
            raise WorkflowFormatError(f"{where}: inputs.{name}: {task.value} has no such input")
        (target,) = ctx.targets(raw, f"inputs.{name}", single=True)
        inputs[name] = target

    params = []
    for name, raw in ctx.mapping(data.get("params", {}), "params").items():
        if name not in spec_fields:
            raise WorkflowFormatError(f"{where}: params.{name}: not a field of {task.value}")
        entry = ctx.mapping(raw, f"params.{name}")
        has_default = "default" in entry or "default_const" in entry
        default = entry.get("default")
        if "default_const" in entry:
            const = entry["default_const"]
            if const not in _CONSTANTS:
                raise WorkflowFormatError(
                    f"{where}: params.{name}.default_const: one of {', '.join(_CONSTANTS)}"
                )
            default = _CONSTANTS[const]
        random = entry.get("random", False) is True
        if random and name != "seed":
            raise WorkflowFormatError(f"{where}: params.{name}: only seed can be random")
        params.append(
            _Param(name, ctx.targets(entry, f"params.{name}"), default, has_default, random)
        )

    sizes = []
    for i, raw in enumerate(ctx.sequence(data.get("sizes", []), "sizes")):
        entry = ctx.mapping(raw, f"sizes[{i}]")
        source, dimension = entry.get("from"), entry.get("dimension")
        multiply = entry.get("multiply", 1)
        if source not in task.inputs:
            raise WorkflowFormatError(f"{where}: sizes[{i}].from must name an input")
        if dimension not in ("width", "height"):
            raise WorkflowFormatError(f"{where}: sizes[{i}].dimension: width or height")
        if not isinstance(multiply, int | float) or isinstance(multiply, bool) or multiply <= 0:
            raise WorkflowFormatError(f"{where}: sizes[{i}].multiply: a positive number")
        sizes.append(_Size(ctx.targets(entry, f"sizes[{i}]"), source, dimension, float(multiply)))

    job = []
    for i, raw in enumerate(ctx.sequence(data.get("job", []), "job")):
        entry = ctx.mapping(raw, f"job[{i}]")
        fmt = entry.get("format")
        try:
            if not isinstance(fmt, str):
                raise TypeError
            fmt.format(**_JOB_FIELDS)
        except (KeyError, IndexError, ValueError, TypeError):
            raise WorkflowFormatError(
                f"{where}: job[{i}].format: a string using only {{job_id}}, {{task}}, {{attempt}}"
            ) from None
        job.append(_JobValue(ctx.targets(entry, f"job[{i}]"), fmt))

    outputs = []
    for i, raw in enumerate(ctx.sequence(data.get("outputs"), "outputs")):
        entry = ctx.mapping(raw, f"outputs[{i}]")
        node, kind = entry.get("node"), entry.get("kind")
        if not isinstance(node, str) or node not in graph:
            raise WorkflowFormatError(f"{where}: outputs[{i}].node: not a node of the graph")
        if kind not in _OUTPUT_KINDS:
            raise WorkflowFormatError(f"{where}: outputs[{i}].kind: images or text")
        outputs.append(OutputBinding(node, kind))
    if not outputs:
        raise WorkflowFormatError(f"{where}: outputs: at least one output node")

    models = []
    for i, raw in enumerate(ctx.sequence(data.get("models", []), "models")):
        entry = ctx.mapping(raw, f"models[{i}]")
        (target,) = ctx.targets(entry, f"models[{i}]", single=True)
        folder = entry.get("folder")
        if not isinstance(folder, str) or not folder:
            raise WorkflowFormatError(f"{where}: models[{i}].folder: a ComfyUI model folder")
        models.append(_ModelRef(target.node, target.input, folder))

    in_graph = sorted({str(n["class_type"]) for n in graph.values()})
    declared = data.get("nodes")
    if declared is not None and sorted(set(ctx.sequence(declared, "nodes"))) != in_graph:
        raise WorkflowFormatError(
            f"{where}: nodes must list the graph's node types: {', '.join(in_graph)}"
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
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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


@dataclass(frozen=True, slots=True)
class _Context:
    where: str
    graph: Mapping[str, Any]

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise WorkflowFormatError(f"{self.where}: {path}: a JSON object")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise WorkflowFormatError(f"{self.where}: {path}: a JSON array")
        return value

    def targets(self, entry: Any, path: str, *, single: bool = False) -> tuple[_Target, ...]:
        entry = self.mapping(entry, path)
        raw = entry.get("targets") if "targets" in entry else [entry]
        found = []
        for raw_item in self.sequence(raw, f"{path}.targets"):
            item = self.mapping(raw_item, path)
            node, name = item.get("node"), item.get("input")
            if not isinstance(node, str) or node not in self.graph:
                raise WorkflowFormatError(f"{self.where}: {path}: node {node!r} not in the graph")
            if not isinstance(name, str) or name not in self.graph[node]["inputs"]:
                raise WorkflowFormatError(
                    f"{self.where}: {path}: node {node} has no input {name!r}"
                )
            if _is_link(self.graph[node]["inputs"][name]):
                raise WorkflowFormatError(
                    f"{self.where}: {path}: node {node} input {name} is a link, not a value"
                )
            found.append(_Target(node, name))
        if not found or (single and len(found) != 1):
            raise WorkflowFormatError(f"{self.where}: {path}: {'one' if single else 'a'} target")
        return tuple(found)

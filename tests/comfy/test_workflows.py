"""Workflows: loading and validating bindings, building graphs, checking agents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from aiserver.errors import ServiceError
from aiserver.providers.base import WorkItem
from aiserver.providers.comfy.workflows import (
    AgentCapabilities,
    WorkflowCatalog,
    WorkflowFormatError,
    combo_options,
    default_workflows_dir,
)
from aiserver.tasks import (
    BUILT_IN_TASKS,
    DEFAULT_NEGATIVE_PROMPT,
    MAX_SEED,
    ImageToImageSpec,
    ImageToTextSpec,
    ImageUpscaleSpec,
    ImageWithMaskSpec,
    TaskKind,
)
from tests.comfy.helpers import HOSTILE, png, work_item, write_input

RECORDED_INFO = (
    Path(__file__).parents[1] / "support" / "comfy_standin" / "data" / "object_info.json"
)
UPLOADS = {"image": "in.png", "mask": "mask.png"}


@pytest.fixture
def image_work(inputs_dir: Path) -> WorkItem:
    image = write_input(inputs_dir, "image", png(100, 60))
    return work_item(TaskKind.IMAGE_TO_IMAGE, ImageToImageSpec("a fox"), {"image": image})


def test_builtin_catalog_has_every_task(catalog: WorkflowCatalog) -> None:
    assert set(catalog.tasks) == set(BUILT_IN_TASKS)
    for task in BUILT_IN_TASKS:
        workflow = catalog.get(task)
        assert workflow.nodes_to_run == frozenset(workflow.graph)  # nothing dangles
        assert workflow.outputs
    assert catalog.get(TaskKind.IMAGE_TO_TEXT).outputs[0].kind == "text"


def test_defaults(catalog: WorkflowCatalog, image_work: WorkItem) -> None:
    built = catalog.get(TaskKind.IMAGE_TO_IMAGE).build(image_work, UPLOADS)
    g = built.graph
    sampler = g["7"]["inputs"]
    assert (sampler["denoise"], sampler["steps"], sampler["cfg"]) == (0.5, 25, 7.0)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("euler_ancestral", "normal")
    assert g["4"]["inputs"]["text"] == DEFAULT_NEGATIVE_PROMPT
    assert g["3"]["inputs"]["text"] == "a fox"
    assert g["2"]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert g["6"]["inputs"]["amount"] == 1
    assert g["1"]["inputs"]["image"] == "in.png"
    assert g["9"]["inputs"]["filename_prefix"] == f"aiserver/ImageToImage/{image_work.job_id}"
    assert built.seed is not None and 0 <= built.seed <= MAX_SEED
    assert sampler["seed"] == built.seed
    other = catalog.get(TaskKind.IMAGE_TO_IMAGE).build(image_work, UPLOADS)
    assert other.seed != built.seed  # random per build...
    fixed = catalog.get(TaskKind.IMAGE_TO_IMAGE).build(image_work, UPLOADS, seed=99)
    assert fixed.seed == 99 and fixed.graph["7"]["inputs"]["seed"] == 99  # ...unless resumed


def test_spec_values_win(catalog: WorkflowCatalog, image_work: WorkItem) -> None:
    spec = ImageToImageSpec(
        "x",
        negative_prompt="",
        model="mine.safetensors",
        denoise=0.8,
        batch_size=4,
        seed=0,
        steps=9,
        cfg_scale=3.5,
        sampler="dpmpp_2m",
        scheduler="karras",
    )
    work = WorkItem(image_work.job_id, image_work.task, spec, image_work.inputs)
    built = catalog.get(TaskKind.IMAGE_TO_IMAGE).build(work, UPLOADS)
    sampler = built.graph["7"]["inputs"]
    assert (sampler["denoise"], sampler["steps"], sampler["cfg"], sampler["seed"]) == (
        0.8,
        9,
        3.5,
        0,
    )
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("dpmpp_2m", "karras")
    assert built.graph["4"]["inputs"]["text"] == ""  # an explicit empty negative prompt stays
    assert built.graph["6"]["inputs"]["amount"] == 4
    assert built.graph["2"]["inputs"]["ckpt_name"] == "mine.safetensors"
    assert built.seed == 0


def test_hostile_text_is_placed_as_a_value(catalog: WorkflowCatalog, image_work: WorkItem) -> None:
    spec = ImageToImageSpec(HOSTILE, negative_prompt=HOSTILE * 2)
    work = WorkItem(image_work.job_id, image_work.task, spec, image_work.inputs)
    built = catalog.get(TaskKind.IMAGE_TO_IMAGE).build(work, UPLOADS)
    wire = json.loads(json.dumps(built.graph))
    assert wire["3"]["inputs"]["text"] == HOSTILE
    assert wire["4"]["inputs"]["text"] == HOSTILE * 2
    template = catalog.get(TaskKind.IMAGE_TO_IMAGE).graph
    assert template["3"]["inputs"]["text"] == ""  # the template is never touched
    assert set(wire) == set(template)


def test_sizes_and_mask(catalog: WorkflowCatalog, inputs_dir: Path) -> None:
    image = write_input(inputs_dir, "image", png(100, 60))
    mask = write_input(inputs_dir, "mask", png(10, 6))
    up = work_item(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(seed=5), {"image": image})
    built = catalog.get(TaskKind.IMAGE_UPSCALE).build(up, UPLOADS)
    assert (built.graph["4"]["inputs"]["width"], built.graph["4"]["inputs"]["height"]) == (200, 120)
    assert built.graph["2"]["inputs"]["model_name"] == "RealESRGAN_x2.pth"
    assert built.seed == 5  # unused by the graph, reported as given
    spec = ImageWithMaskSpec("x", mask_channel="green")
    inpaint = work_item(TaskKind.IMAGE_WITH_MASK, spec, {"image": image, "mask": mask})
    built = catalog.get(TaskKind.IMAGE_WITH_MASK).build(inpaint, UPLOADS)
    scale = built.graph["8"]["inputs"]
    assert (scale["width"], scale["height"], scale["image"]) == (100, 60, ["7", 0])
    assert built.graph["6"]["inputs"] == {"image": "mask.png", "channel": "green"}
    text = work_item(TaskKind.IMAGE_TO_TEXT, ImageToTextSpec(), {"image": image})
    built = catalog.get(TaskKind.IMAGE_TO_TEXT).build(text, UPLOADS)
    assert built.graph["3"]["inputs"]["task"] == "caption"
    assert built.graph["2"]["inputs"]["model"] == "microsoft/Florence-2-base"
    assert built.seed is None


def test_missing_upload_is_an_error(catalog: WorkflowCatalog, image_work: WorkItem) -> None:
    with pytest.raises(ServiceError, match="missing input: image"):
        catalog.get(TaskKind.IMAGE_TO_IMAGE).build(image_work, {})


def test_recorded_catalogue_check() -> None:
    info = json.loads(RECORDED_INFO.read_text(encoding="utf-8"))
    caps = AgentCapabilities.from_object_info(info)
    catalog = WorkflowCatalog.load()
    checks = catalog.check(caps)
    # The recorded agent had sd15_random.safetensors, not the default checkpoint.
    assert checks[TaskKind.IMAGE_TO_IMAGE].nodes_ok and not checks[TaskKind.IMAGE_TO_IMAGE].ok
    assert "checkpoints/v1-5-pruned-emaonly.safetensors" in checks[TaskKind.IMAGE_TO_IMAGE].reason
    assert checks[TaskKind.IMAGE_UPSCALE].ok and checks[TaskKind.IMAGE_TO_TEXT].ok
    workflow = catalog.get(TaskKind.IMAGE_TO_IMAGE)
    assert workflow.can_serve(caps, ImageToImageSpec("x", model="sd15_random.safetensors")) == ""
    assert caps.models_by_folder(catalog.model_inputs())["checkpoints"] == (
        "sd15_random.safetensors",
    )
    assert caps.models_by_folder()["upscale_models"] == (
        "RealESRGAN_x2.pth",
        "corrupt_for_probe.pth",
    )
    del info["Florence2Run"]
    check = catalog.check(AgentCapabilities.from_object_info(info))[TaskKind.IMAGE_TO_TEXT]
    assert check.missing_nodes == ("Florence2Run",)
    assert "missing node types: Florence2Run" in check.reason


def test_combo_shapes() -> None:
    assert combo_options([["a", "b"], {"tooltip": "t"}]) == ("a", "b")
    assert combo_options([["a"]]) == ("a",)
    assert combo_options(["COMBO", {"multiselect": False, "options": ["x", "y"]}]) == ("x", "y")
    assert combo_options(["INT", {"min": 0}]) is None
    assert combo_options("STRING") is None


def copy_builtin(tmp_path: Path) -> Path:
    folder = tmp_path / "builtin"
    shutil.copytree(default_workflows_dir(), folder)
    return folder


def edit(path: Path, change: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_user_folder_overrides_and_shadows(tmp_path: Path, inputs_dir: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    builtin = default_workflows_dir()
    shutil.copy(builtin / "image_upscale.binding.json", user / "my_upscale.binding.json")
    graph = json.loads((builtin / "image_upscale.json").read_text(encoding="utf-8"))
    graph["2"]["inputs"]["model_name"] = "4x_custom.pth"
    (user / "my_upscale_graph.json").write_text(json.dumps(graph), encoding="utf-8")

    def point_at_graph(data: dict[str, Any]) -> None:
        data["graph"] = "my_upscale_graph.json"
        del data["params"]["model"]["default"]

    edit(user / "my_upscale.binding.json", point_at_graph)
    # A graph with a built-in graph's name shadows it (binding kept).
    text_graph = json.loads((builtin / "image_to_text.json").read_text(encoding="utf-8"))
    text_graph["3"]["inputs"]["task"] = "more_detailed_caption"
    (user / "image_to_text.json").write_text(json.dumps(text_graph), encoding="utf-8")

    catalog = WorkflowCatalog.load(user_dir=user)
    image = write_input(inputs_dir, "image", png(8, 8))
    up = work_item(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(), {"image": image})
    assert (
        catalog.get(TaskKind.IMAGE_UPSCALE).build(up, UPLOADS).graph["2"]["inputs"]["model_name"]
        == "4x_custom.pth"
    )
    assert catalog.get(TaskKind.IMAGE_UPSCALE).source.endswith("my_upscale.binding.json")
    text = work_item(TaskKind.IMAGE_TO_TEXT, ImageToTextSpec(), {"image": image})
    built = catalog.get(TaskKind.IMAGE_TO_TEXT).build(text, UPLOADS)
    assert built.graph["3"]["inputs"]["task"] == "more_detailed_caption"
    assert catalog.get(TaskKind.IMAGE_TO_IMAGE).source.startswith(str(builtin))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["params"].update(colour={"node": "7", "input": "seed"}), "not a field"),
        (lambda d: d["params"]["steps"].update(node="99"), "not in the graph"),
        (lambda d: d["params"]["steps"].update(input="nope"), "has no input 'nope'"),
        (lambda d: d["params"]["steps"].update(input="model"), "is a link"),
        (lambda d: d["params"]["steps"].update(random=True), "only seed can be random"),
        (lambda d: d["params"]["negative_prompt"].update(default_const="X"), "default_const: 'X'"),
        (lambda d: d["inputs"].clear(), "inputs.image is not bound"),
        (lambda d: d["nodes"].remove("KSampler"), "nodes must list"),
        (lambda d: d.update(outputs=[]), "outputs: [] should be non-empty"),
        (lambda d: d["outputs"][0].update(kind="video"), "outputs[0].kind: 'video' is not one"),
        (lambda d: d["job"][0].update(format="{job_id}{secret}"), "only {job_id}"),
        (lambda d: d.update(task="Nope"), "task: 'Nope' is not one of"),
        (lambda d: d.update(graph="../etc.json"), "graph: '../etc.json' does not match"),
        (lambda d: d.update(graph="absent.json"), "graph absent.json not found"),
    ],
)
def test_bad_bindings_are_refused_with_their_file(
    tmp_path: Path, change: Any, message: str
) -> None:
    folder = copy_builtin(tmp_path)
    edit(folder / "image_to_image.binding.json", change)
    with pytest.raises(WorkflowFormatError, match=r"image_to_image\.binding\.json") as caught:
        WorkflowCatalog.load(folder)
    assert message in str(caught.value)


def test_bad_graphs_and_folders(tmp_path: Path) -> None:
    folder = copy_builtin(tmp_path)
    (folder / "image_to_image.json").write_text('{"1": {"inputs": {}}}', encoding="utf-8")
    with pytest.raises(WorkflowFormatError, match="needs class_type and inputs"):
        WorkflowCatalog.load(folder)
    (folder / "image_to_image.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WorkflowFormatError, match=r"image_to_image\.json"):
        WorkflowCatalog.load(folder)
    with pytest.raises(WorkflowFormatError, match="not found"):
        WorkflowCatalog.load(tmp_path / "nowhere")
    twice = copy_builtin(tmp_path / "b")
    shutil.copy(twice / "image_to_text.binding.json", twice / "again.binding.json")
    with pytest.raises(WorkflowFormatError, match="a second binding for ImageToText"):
        WorkflowCatalog.load(twice)

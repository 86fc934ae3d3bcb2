"""How the stand-in executes a graph: ComfyUI's node order and cache, Pillow emulations of nodes.

Order: :class:`ExecutionList` follows ``comfy_execution/graph.py`` (``add_node`` walks inputs
depth first with a stack; ``ux_friendly_pick_node`` prefers output nodes, then nodes one or two
links before an output, else the first ready node). It reproduces the recorded orders, e.g.
``ws_trace_img2img.json`` 2,1,5,4,3,6,7,8 and ``ws_trace_inpaint.json`` 9,10,1,5,11,6,7,8.

Cache: a node is cached when its input signature (class, ``IS_CHANGED``, every input value
including ones the node does not declare, ancestors' signatures) matches a node of the previous
prompt (``ws_trace_scale_cached.json``, ``ws_trace_img2img_128.json``: ``execution_cached``
lists ["2", "3", "4"]). ``IS_CHANGED`` is the input file's hash for the image loaders and the
time for ``SaveImageWebsocket`` (never cached), as in ComfyUI.

Nodes are emulated cheaply with Pillow: outputs have the sizes ComfyUI would give (VAEEncode
crops to multiples of 8, ImageUpscaleWithModel scales by the model's factor), not its pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, ImageStat

__all__ = [
    "NODES",
    "ExecutionList",
    "Interrupted",
    "NodeContext",
    "NodeResult",
    "Signatures",
    "is_link",
]


class Interrupted(Exception):
    """The running prompt was interrupted (``/interrupt``)."""


@dataclass(slots=True)
class NodeResult:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None = None


ProgressFn = Callable[[int, int, Image.Image | None], Awaitable[None]]
BinaryImageFn = Callable[[Image.Image, int, int], Awaitable[None]]


@dataclass(slots=True)
class NodeContext:
    node_id: str
    class_type: str
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    progress: ProgressFn
    """Report a step: sends progress_state + progress (+ a preview), checks for interrupts."""
    send_image: BinaryImageFn
    """A binary image frame with its progress ``(image, step, of)`` (SaveImageWebsocket)."""
    file_hash: Callable[[str], str] = field(default=lambda name: "")


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


class ExecutionList:
    """Which node runs next, as ComfyUI's ExecutionList decides."""

    def __init__(
        self,
        prompt: Mapping[str, Any],
        is_cached: Callable[[str], bool],
        is_output: Callable[[str], bool],
    ) -> None:
        self._prompt = prompt
        self._is_cached = is_cached
        self._is_output = is_output
        self.pending: dict[str, None] = {}
        self._blocks: dict[str, int] = {}
        self._blocking: dict[str, dict[str, None]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = None
            self._blocks[current] = 0
            self._blocking[current] = {}
            for value in self._prompt[current]["inputs"].values():
                if is_link(value):
                    source = value[0]
                    if not self._is_cached(source):
                        stack.append(source)
                    links.append((source, current))
        for source, target in links:
            if self._is_cached(source):
                continue
            self.add_node(source)
            if target not in self._blocking[source]:
                self._blocking[source][target] = None
                self._blocks[target] += 1

    def is_empty(self) -> bool:
        return not self.pending

    def next(self) -> str:
        ready = [n for n in self.pending if self._blocks[n] == 0]
        for node in ready:
            if self._is_output(node):
                return node
        for node in ready:
            if any(self._is_output(b) for b in self._blocking[node]):
                return node
        for node in ready:
            for blocked in self._blocking[node]:
                if any(self._is_output(b) for b in self._blocking[blocked]):
                    return node
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for blocked in self._blocking.pop(node_id):
            self._blocks[blocked] -= 1


class Signatures:
    """Cache keys of a prompt's nodes: class, widget values, input file hashes, ancestors."""

    def __init__(self, prompt: Mapping[str, Any], file_hash: Callable[[str], str]) -> None:
        self._prompt = prompt
        self._file_hash = file_hash
        self._memo: dict[str, str] = {}

    def __call__(self, node_id: str) -> str:
        if node_id in self._memo:
            return self._memo[node_id]
        node = self._prompt[node_id]
        parts: list[Any] = [node["class_type"]]
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            if is_link(value):
                parts.append([name, "link", self(value[0]), value[1]])
            else:
                parts.append([name, value])
        if node["class_type"] in ("LoadImage", "LoadImageMask"):
            parts.append(self._file_hash(str(node["inputs"].get("image"))))  # IS_CHANGED
        elif node["class_type"] == "SaveImageWebsocket":
            # Its IS_CHANGED returns time.time() (custom_nodes/websocket_image_save.py): it is
            # never served from the cache, and runs (sending its frames) on every prompt.
            parts.append(time.time())
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        self._memo[node_id] = key
        return key


# ---- node emulations ------------------------------------------------------------------------

Node = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).digest()


def _open_input(ctx: NodeContext, name: str) -> Image.Image:
    path = ctx.input_dir / name
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).copy()


async def _load_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    img = _open_input(ctx, i["image"])
    if "A" in img.getbands():
        mask = ImageOps.invert(img.getchannel("A"))  # ComfyUI: mask = 1 - alpha
    else:
        mask = Image.new("L", (64, 64), 0)
    return NodeResult(([img.convert("RGB")], [mask]))


async def _load_image_mask(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    img = _open_input(ctx, i["image"]).convert("RGBA")
    band = i["channel"][0].upper()
    mask = img.getchannel(band)
    if band == "A":
        mask = ImageOps.invert(mask)
    return NodeResult(([mask],))


async def _checkpoint(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    name = i["ckpt_name"]
    return NodeResult(({"model": name}, {"clip": name}, {"vae": name}))


async def _clip_text_encode(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult(({"text": i["text"]},))


async def _vae_encode(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    samples = []
    for img in i["pixels"]:
        # VAE.vae_encode_crop_pixels: a centred crop to multiples of the 8x downscale.
        w, h = (img.width // 8) * 8, (img.height // 8) * 8
        left, top = (img.width % 8) // 2, (img.height % 8) // 2
        samples.append(img.crop((left, top, left + w, top + h)))
    return NodeResult(({"samples": samples, "noise_mask": None},))


async def _empty_latent_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    # torch.zeros([batch, 4, height // 8, width // 8]): decodes to a multiple of 8, grey.
    size = (int(i["width"]) // 8 * 8, int(i["height"]) // 8 * 8)
    samples = [Image.new("RGB", size, (128, 128, 128)) for _ in range(int(i["batch_size"]))]
    return NodeResult(({"samples": samples, "noise_mask": None},))


async def _image_pad_for_outpaint(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    # nodes.ImagePadForOutpaint: new area grey (0.5) and masked 1.0, the original masked 0.0
    # (feathering softens the mask's inner edge; the stand-in keeps it hard).
    left, top, right, bottom = (int(i[k]) for k in ("left", "top", "right", "bottom"))
    images, masks = [], []
    for img in i["image"]:
        size = (img.width + left + right, img.height + top + bottom)
        padded = Image.new("RGB", size, (128, 128, 128))
        padded.paste(img.convert("RGB"), (left, top))
        mask = Image.new("L", size, 255)
        mask.paste(0, (left, top, left + img.width, top + img.height))
        images.append(padded)
        masks.append(mask)
    return NodeResult((images, masks[0]))


async def _vae_encode_for_inpaint(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    # nodes.VAEEncodeForInpaint: pixels cropped to multiples of 8 (centred), masked pixels set
    # to grey before encoding, and the (grown) mask becomes the latent's noise mask.
    samples, masks = [], []
    mask = i["mask"][0] if isinstance(i["mask"], list) else i["mask"]
    for img in i["pixels"]:
        w, h = (img.width // 8) * 8, (img.height // 8) * 8
        left, top = (img.width % 8) // 2, (img.height % 8) // 2
        box = (left, top, left + w, top + h)
        cropped = img.crop(box)
        area = mask.resize(img.size).crop(box)
        samples.append(Image.composite(Image.new("RGB", (w, h), (128, 128, 128)), cropped, area))
        masks.append(area)
    return NodeResult(({"samples": samples, "noise_mask": masks},))


async def _repeat_latent_batch(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    latent, amount = i["samples"], int(i["amount"])
    mask = latent.get("noise_mask")
    return NodeResult(
        (
            {
                "samples": list(latent["samples"]) * amount,
                "noise_mask": list(mask) * amount if mask is not None else None,
            },
        )
    )


async def _set_latent_noise_mask(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult(({**i["samples"], "noise_mask": list(i["mask"])},))


async def _ksampler(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    latent = i["latent_image"]
    steps = int(i["steps"])
    for step in range(1, steps + 1):
        await ctx.progress(step, steps, latent["samples"][0])
    masks = latent.get("noise_mask")
    out = []
    for index, img in enumerate(latent["samples"]):
        d = _digest(i["seed"], index, i["positive"], i["negative"], i["model"])
        tint = Image.new("RGB", img.size, (d[0], d[1], d[2]))
        result = Image.blend(img, tint, min(1.0, 0.2 + 0.6 * float(i["denoise"])))
        if masks:
            mask = masks[index % len(masks)].resize(img.size)
            result = Image.composite(result, img, mask)
        out.append(result)
    return NodeResult(({"samples": out, "noise_mask": masks},))


async def _vae_decode(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult((list(i["samples"]["samples"]),))


def _save(ctx: NodeContext, images: list[Image.Image], prefix: str, kind: str) -> NodeResult:
    root = ctx.output_dir if kind == "output" else ctx.temp_dir
    normalized = os.path.normpath(prefix)
    subfolder, name = os.path.dirname(normalized), os.path.basename(normalized)
    folder = (root / subfolder).resolve()
    if os.path.commonpath((root.resolve(), folder)) != str(root.resolve()):
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(name) + r"_(\d+)_\.png$")
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    counter = max(taken, default=0) + 1
    results = []
    for img in images:
        file_name = f"{name}_{counter:05}_.png"
        img.save(folder / file_name, compress_level=1)
        results.append(
            {"filename": file_name, "subfolder": subfolder.replace(os.sep, "/"), "type": kind}
        )
        counter += 1
    return NodeResult((), {"images": results})


async def _save_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return _save(ctx, i["images"], i["filename_prefix"], "output")


async def _preview_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return _save(ctx, i["images"], "ComfyUI_temp_standin", "temp")


async def _save_image_websocket(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    images = i["images"]
    for step, img in enumerate(images):
        await ctx.send_image(img, step, len(images))
    return NodeResult(())


_CHANNELS = ("red", "green", "blue", "alpha")


async def _image_to_mask(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    index = _CHANNELS.index(i["channel"])
    masks = []
    for img in i["image"]:
        if index >= len(img.getbands()):
            # IMAGE tensors are RGB: image[:, :, :, 3] fails like this in ComfyUI.
            raise IndexError("index 3 is out of bounds for dimension 3 with size 3")
        masks.append(img.getchannel(index))
    return NodeResult((masks,))


async def _mask_to_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult(([m.convert("RGB") for m in i["mask"]],))


async def _image_invert(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult(([ImageOps.invert(img.convert("RGB")) for img in i["image"]],))


async def _image_scale(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    width, height = int(i["width"]), int(i["height"])
    out = []
    for img in i["image"]:
        if width == 0 and height == 0:
            out.append(img)
            continue
        w = width or max(1, round(img.width * height / img.height))
        h = height or max(1, round(img.height * width / img.width))
        source = ImageOps.fit(img, (w, h)) if i["crop"] == "center" else img
        out.append(source.resize((w, h)))
    return NodeResult((out,))


async def _image_scale_by(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    scale = float(i["scale_by"])
    return NodeResult(
        ([img.resize((round(img.width * scale), round(img.height * scale))) for img in i["image"]],)
    )


async def _get_image_size(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    first = i["image"][0]
    return NodeResult((first.width, first.height, len(i["image"])))


async def _upscale_model_loader(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    name = i["model_name"]
    if "corrupt" in name:
        # ws_trace_exec_error.json: a corrupt .pth fails in torch.load like this.
        raise IndexError("pop from empty list")
    match = re.search(r"x(\d+)", name, re.IGNORECASE)
    return NodeResult(({"name": name, "scale": int(match.group(1)) if match else 2},))


def _tiles(size: int, tile: int = 512, overlap: int = 32) -> int:
    # comfy.utils.get_tiled_scale_steps: one row/column unless the side exceeds a tile.
    return 1 if size <= tile else math.ceil((size - overlap) / (tile - overlap))


async def _image_upscale_with_model(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    scale = i["upscale_model"]["scale"]
    images = i["image"]
    total = sum(_tiles(img.width) * _tiles(img.height) for img in images)
    for step in range(1, total + 1):
        await ctx.progress(step, total, None)
    return NodeResult(([img.resize((img.width * scale, img.height * scale)) for img in images],))


async def _florence_loader(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult(({"model": i["model"]},))


_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 70, 200),
    "yellow": (230, 210, 50),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def _caption(img: Image.Image, task: str) -> str:
    # The recorded stand-in node's wording (ws_trace_image_to_text*.json), from size and colour.
    r, g, b = (round(c) for c in ImageStat.Stat(img.convert("RGB")).mean)
    name = min(
        _COLOURS,
        key=lambda c: sum((x - y) ** 2 for x, y in zip(_COLOURS[c], (r, g, b), strict=True)),
    )
    text = f"an image of {img.width}x{img.height} pixels, mostly {name}"
    if task != "caption":
        text += f"; mean colour rgb({r}, {g}, {b})"
    return text


async def _florence_run(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    images = i["image"]
    captions = []
    for step, img in enumerate(images, start=1):
        await ctx.progress(step, len(images), None)
        captions.append(_caption(img, i["task"]))
    caption = captions[0] if len(captions) == 1 else captions
    masks = [Image.new("L", img.size, 0) for img in images]
    return NodeResult((images, masks, caption, {"caption": captions}, 0))


async def _preview_any(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    value = i["source"]
    text = value if isinstance(value, str) else json.dumps(value)
    return NodeResult((), {"text": [text]})


async def _show_text(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    text = i["text"] if isinstance(i["text"], str) else json.dumps(i["text"])
    return NodeResult((text,), {"text": [text]})


NODES: Mapping[str, Node] = {
    "CLIPTextEncode": _clip_text_encode,
    "CheckpointLoaderSimple": _checkpoint,
    "DownloadAndLoadFlorence2Model": _florence_loader,
    "EmptyLatentImage": _empty_latent_image,
    "Florence2Run": _florence_run,
    "GetImageSize": _get_image_size,
    "ImageInvert": _image_invert,
    "ImagePadForOutpaint": _image_pad_for_outpaint,
    "ImageScale": _image_scale,
    "ImageScaleBy": _image_scale_by,
    "ImageToMask": _image_to_mask,
    "ImageUpscaleWithModel": _image_upscale_with_model,
    "KSampler": _ksampler,
    "LoadImage": _load_image,
    "LoadImageMask": _load_image_mask,
    "MaskToImage": _mask_to_image,
    "PreviewAny": _preview_any,
    "PreviewImage": _preview_image,
    "RepeatLatentBatch": _repeat_latent_batch,
    "SaveImage": _save_image,
    "SaveImageWebsocket": _save_image_websocket,
    "SetLatentNoiseMask": _set_latent_noise_mask,
    "ShowText|pysssss": _show_text,
    "UpscaleModelLoader": _upscale_model_loader,
    "VAEDecode": _vae_decode,
    "VAEEncode": _vae_encode,
    "VAEEncodeForInpaint": _vae_encode_for_inpaint,
}

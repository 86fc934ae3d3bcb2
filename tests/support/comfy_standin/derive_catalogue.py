"""Regenerate ``data/object_info.json``: the recorded catalogue, cut to the nodes tests use.

Run from the repository root with the path of the recorded ``object_info.json`` (ComfyUI
v0.8.0 on CPU, see ``/work/shared/reference/comfyui/README.md``). Entries are copied verbatim,
so combo shapes (old ``[[...], {...}]`` and new ``["COMBO", {"options": [...]}]``) stay as
recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["NODES", "main"]

NODES = (
    # used by workflows/ and the recorded traces
    "CLIPTextEncode",
    "CheckpointLoaderSimple",
    "DownloadAndLoadFlorence2Model",
    "EmptyLatentImage",
    "Florence2Run",
    "GetImageSize",
    "ImageInvert",
    "ImagePadForOutpaint",
    "ImageScale",
    "ImageScaleBy",
    "ImageToMask",
    "ImageUpscaleWithModel",
    "KSampler",
    "LoadImage",
    "LoadImageMask",
    "MaskToImage",
    "PreviewAny",
    "PreviewImage",
    "RepeatLatentBatch",
    "SaveImage",
    "SaveImageWebsocket",
    "SetLatentNoiseMask",
    "ShowText|pysssss",
    "UpscaleModelLoader",
    "VAEDecode",
    "VAEEncode",
    "VAEEncodeForInpaint",
    # present but not emulated: running them fails like a broken node would
    "ImageBlur",
    "LoraLoader",
    "VAELoader",
)


def main(source: str, target: str = "tests/support/comfy_standin/data/object_info.json") -> None:
    full = json.loads(Path(source).read_text(encoding="utf-8"))
    subset = {name: full[name] for name in NODES}
    Path(target).write_text(json.dumps(subset, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])

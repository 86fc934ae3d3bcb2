"""AI Server's image tasks as a gRPC service orchestrating ComfyUI."""

__all__ = ["__version__"]

__version__ = "0.1.0"

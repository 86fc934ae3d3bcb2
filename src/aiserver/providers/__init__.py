"""Providers run jobs: ComfyUI agents (``comfy``) and the in-process engine (``local``)."""

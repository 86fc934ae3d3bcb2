from __future__ import annotations

from tests.jobs.helpers import env

__all__ = ["env"]

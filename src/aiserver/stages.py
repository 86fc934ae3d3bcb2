"""Where a running job is: the vocabulary jobs and providers share.

It sits below both :mod:`aiserver.jobs` and :mod:`aiserver.providers`, so a provider reports
stages without importing the job model.
"""

from __future__ import annotations

import enum

__all__ = ["Stage"]


class Stage(enum.Enum):
    QUEUED = "QUEUED"
    UPLOADING = "UPLOADING"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DOWNLOADING = "DOWNLOADING"

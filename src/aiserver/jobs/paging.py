"""Job listings' page size: the one source of its limits in Python.

``ListJobsRequest.page_size`` is documented as 1..1000, 0 meaning 50; the servicer, the
manager and every job store read these constants and refuse, never clamp, a size outside them.
"""

from __future__ import annotations

from aiserver.errors import invalid_argument

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "page_size"]

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


def page_size(requested: int) -> int:
    """The rows of one page: ``requested``, or the default for 0; INVALID_ARGUMENT
    ``INVALID_PAGE_SIZE`` outside 0..MAX_PAGE_SIZE."""
    if not 0 <= requested <= MAX_PAGE_SIZE:
        raise invalid_argument("page_size", "INVALID_PAGE_SIZE", f"must be 0..{MAX_PAGE_SIZE}")
    return requested or DEFAULT_PAGE_SIZE

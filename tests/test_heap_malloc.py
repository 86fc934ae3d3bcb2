"""Freed heap memory is kept for the next upload (``aiserver.heap.keep_freed_memory``):
uploads held in memory keep the bytes grpc received, and with glibc's default thresholds each
one faults its size in fresh pages again once the last was freed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import resource, sys
    from aiserver import heap

    if sys.argv[1] == "keep":
        assert heap.keep_freed_memory(64 << 20)
    faults = []
    for _ in range(3):  # glibc's moving thresholds settle in the first rounds
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        upload = [bytes([i]) * ((1 << 20) + 50) for i in range(48)]  # 48 messages of 1 MiB
        del upload
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(faults[-1])
    """
)


def _faults(mode: str) -> int:
    found = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    return int(found.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_a_freed_upload_is_not_faulted_in_again() -> None:
    pages = (48 << 20) // 4096
    assert _faults("default") > pages // 2  # the mechanism: glibc's default trims it
    assert _faults("keep") < pages // 10


def test_nothing_to_keep_changes_nothing() -> None:
    from aiserver import heap

    assert heap.keep_freed_memory(0) is False  # spool memory 0: uploads are not held

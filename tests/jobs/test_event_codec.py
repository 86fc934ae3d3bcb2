"""Events stored for watchers on other processes come back whole."""

from __future__ import annotations

from aiserver.jobs.event_codec import decode_event, encode_event
from aiserver.jobs.model import Progress, Retrying, Stage, TextProduced


def test_every_field_of_a_stored_event_survives_the_round_trip() -> None:
    for kind in (
        Progress(
            Stage.PENDING,
            fraction=0.25,
            queue_position=3,
            node="9",
            node_type="KSampler",
            step=2,
            max_steps=8,
            provider="comfyui",
            waiting="no agent has the model",
        ),
        Retrying(2, "agent lost", "gpu-1"),
        TextProduced(0, "a caption", "7"),
    ):
        assert decode_event(*encode_event(kind)) == kind


def test_a_progress_row_stored_before_waiting_existed_reads_as_not_waiting() -> None:
    name, payload = encode_event(Progress(Stage.RUNNING, fraction=0.5))
    del payload["waiting"]
    decoded = decode_event(name, payload)
    assert isinstance(decoded, Progress) and decoded.waiting == ""

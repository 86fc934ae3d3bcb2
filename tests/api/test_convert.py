"""Domain events to their wire form, written in place into the response that carries them."""

from __future__ import annotations

from datetime import UTC, datetime

from imagetasks.v1 import generation_service_pb2 as gpb
from imagetasks.v1 import job_pb2

from aiserver.api.convert import event_to_proto, job_to_proto
from aiserver.jobs.events import snapshot
from aiserver.jobs.model import (
    Accepted,
    ArtifactRef,
    EventKind,
    Finished,
    InputRef,
    Job,
    JobEvent,
    JobState,
    OutputStored,
    Progress,
    Retrying,
    Stage,
    TextProduced,
)
from aiserver.tasks import ImageUpscaleSpec, TaskKind

WHEN = datetime(2026, 12, 7, 11, 30, 15, 250_000, tzinfo=UTC)


def finished_job() -> Job:
    job = Job(
        "J1",
        TaskKind.IMAGE_UPSCALE,
        ImageUpscaleSpec(model="4x", seed=7),
        JobState.SUCCEEDED,
        WHEN,
        WHEN,
        ref_id="r",
    )
    job.ended = WHEN
    job.inputs.append(InputRef("image", "in.png", "a" * 64, 10, "image/png", 8, 6))
    job.outputs.append(
        ArtifactRef("a1", "/a1", "o.png", "image/png", 16, 12, 99, "b" * 64, 7, "p", WHEN, "J1")
    )
    return job


def test_every_kind_is_written_into_the_carrier_even_with_default_fields() -> None:
    job = finished_job()
    kinds: list[tuple[EventKind, str]] = [
        (Accepted(TaskKind.IMAGE_UPSCALE, "", 0), "accepted"),
        (Progress(Stage.QUEUED), "progress"),
        (OutputStored(0, job.outputs[0]), "output"),
        (TextProduced(0, ""), "text_output"),  # every field a default: still this kind
        (Retrying(0, ""), "retrying"),
        (Finished(snapshot(job)), "finished"),
    ]
    for sequence, (kind, name) in enumerate(kinds, start=1):
        response = gpb.ImageUpscaleResponse()
        msg = event_to_proto(JobEvent("J1", sequence, WHEN, kind), into=response.event)
        assert msg is response.event
        assert response.event.WhichOneof("kind") == name
        assert (response.event.job, response.event.sequence) == ("jobs/J1", sequence)
        assert response.event.time.ToDatetime(UTC) == WHEN


def test_the_finished_job_carries_what_the_record_holds() -> None:
    job = finished_job()
    response = gpb.ImageUpscaleResponse()
    event_to_proto(JobEvent("J1", 5, WHEN, Finished(snapshot(job))), into=response.event)
    wire = response.event.finished.job
    assert wire == job_to_proto(job)
    assert (wire.name, wire.state, wire.ref_id) == ("jobs/J1", job_pb2.Job.STATE_SUCCEEDED, "r")
    assert wire.end_time.ToDatetime(UTC) == WHEN and not wire.HasField("start_time")
    assert [(i.field, i.width, i.height) for i in wire.inputs] == [("image", 8, 6)]
    (output,) = wire.outputs
    assert (output.name, output.seed, output.job) == ("a1", 7, "jobs/J1")
    assert output.create_time.ToDatetime(UTC) == WHEN
    assert (wire.image_upscale.model, wire.image_upscale.seed) == ("4x", 7)

"""The client commands of the ``aiserver`` console script: ``upscale``, ``img2img``,
``inpaint``, ``caption``, ``crop``, ``convert``, ``variant``, ``jobs``, ``workflows`` and
``run`` (any workflow: ``aiserver run NAME image=@in.png --param steps=20``).

The server address comes from ``--server`` or ``AISERVER_ADDRESS`` (default
``localhost:50051``), the API key from ``--api-key`` or ``AISERVER_API_KEY``. Generative
commands show a live progress line on a terminal (plain lines otherwise) on stderr and write
their outputs to files; ``--json`` prints one JSON document on stdout instead of the human
summary (``jobs watch --json``: one JSON event per line). Errors are one line on stderr:
status, reason and field details.

Exit codes:

* 0 success;
* 1 the job ended FAILED or CANCELLED;
* 2 usage: bad arguments, an input that cannot be read, an output that cannot be written;
* 3 the server refused the request: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
  FAILED_PRECONDITION, OUT_OF_RANGE, RESOURCE_EXHAUSTED, UNIMPLEMENTED;
* 4 the server could not be reached or did not answer in time: UNAVAILABLE,
  DEADLINE_EXCEEDED, ABORTED;
* 5 UNAUTHENTICATED, PERMISSION_DENIED;
* 6 any other server error (INTERNAL, UNKNOWN, DATA_LOSS, CANCELLED);
* 130 interrupted (Ctrl-C); a job that was being waited for is cancelled.

Hook into ``aiserver.cli``: ``add_client_commands(subparsers)`` before parsing, then
``run_client_command(args)`` for any command other than ``serve``. Nothing here imports grpc
until a client command runs.

A command's options are named as the fields of its request dataclass
(``aiserver.client.requests``): :func:`_request` fills the dataclass from the parsed
arguments, so a call's parameters are not listed again here.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiserver.cli_output import (
    EXIT_AUTH,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    PROG,
    Out,
    ProgressLine,
    exit_code_for,
    job_details,
    job_line,
    message_dict,
)

if TYPE_CHECKING:
    from aiserver.client import AsyncClient, JobStream
    from aiserver.client.inputs import OutputSink

    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _Subparsers = Any

__all__ = [
    "CLIENT_COMMANDS",
    "EXIT_AUTH",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_SERVER",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "ProgressLine",
    "add_client_commands",
    "exit_code_for",
    "is_client_command",
    "main",
    "run_client_command",
]


CLIENT_COMMANDS = frozenset(
    {
        "upscale",
        "img2img",
        "inpaint",
        "caption",
        "crop",
        "convert",
        "variant",
        "jobs",
        "workflows",
        "run",
    }
)
ENV_ADDRESS = "AISERVER_ADDRESS"
ENV_API_KEY = "AISERVER_API_KEY"
_FORMATS = ("jpg", "jpeg", "png", "gif", "bmp", "tiff", "webp", "avif")
_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
_TASKS = ("ImageToImage", "ImageWithMask", "ImageUpscale", "ImageToText")

_Handler = Callable[[argparse.Namespace, "AsyncClient"], Coroutine[Any, Any, int]]
_Request = TypeVar("_Request")


class _UsageError(Exception):
    """A local problem with the command line or its files: exit 2."""


# ---- the parser -----------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"gRPC address (env {ENV_ADDRESS}; default localhost:50051)",
    )
    group.add_argument("--api-key", help=f"API key, sent as a Bearer token (env {ENV_API_KEY})")
    group.add_argument("--tls", action="store_true", help="use TLS (system roots)")
    group.add_argument("--root-certs", type=Path, metavar="PEM", help="TLS with these roots")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of the call")
    group.add_argument("--json", action="store_true", help="print machine-readable JSON")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return common


def _job_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("job")
    group.add_argument("--ref-id", default="", help="your reference; idempotent per key")
    group.add_argument("--tag", default="", help="a label to filter jobs by")
    group.add_argument("--reply-to", default="", help="URL that receives the final job (POST)")
    waiting = group.add_mutually_exclusive_group()
    waiting.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once the job is accepted; follow it with 'aiserver jobs watch'",
    )
    waiting.add_argument(
        "--result-only",
        action="store_true",
        help="wait, but receive only the outputs and the final job (no progress line)",
    )
    group.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="output file, or a directory (existing, or ending in /); default: the current "
        "directory with the server's file names. Extra outputs of a batch get -1, -2... "
        "before the suffix",
    )


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--prompt", required=True, help="what the image should show")
    group.add_argument("--negative-prompt", help="what it should not show ('' for none)")
    group.add_argument("--model", default="", help="checkpoint name; default: the server's")
    group.add_argument("--denoise", type=float, help="0 < denoise <= 1")
    group.add_argument("--batch-size", type=int, help="1..10 images")
    group.add_argument("--seed", type=int)
    group.add_argument("--steps", type=int, help="sampler steps, 1..150")
    group.add_argument("--cfg-scale", type=float, help="guidance scale, 0..30")
    group.add_argument("--sampler", default="", help="KSampler sampler name")
    group.add_argument("--scheduler", default="", help="KSampler scheduler name")


def add_client_commands(subparsers: _Subparsers) -> None:
    """Adds the client commands to the ``aiserver`` parser's subparsers."""
    common = _connection_options()

    def command(name: str, handler: _Handler, help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        parser.set_defaults(client_handler=handler)
        return parser

    p = command("upscale", _job_command("ImageUpscale"), "2x upscale of an image (ImageUpscale)")
    p.add_argument("image", type=Path, help="the input image file")
    p.add_argument("--model", default="", help="upscale model; default: the server's")
    _job_options(p)

    p = command(
        "img2img",
        _job_command("ImageToImage"),
        "a new image from an image and a prompt (ImageToImage)",
    )
    p.add_argument("image", type=Path, help="the input image file")
    _sampling_options(p)
    _job_options(p)

    p = command("inpaint", _job_command("ImageWithMask"), "repaint inside a mask (ImageWithMask)")
    p.add_argument("image", type=Path, help="the input image file")
    p.add_argument("--mask", type=Path, required=True, help="the mask image")
    p.add_argument("--mask-channel", choices=("red", "green", "blue", "alpha"), default="red")
    _sampling_options(p)
    _job_options(p)

    p = command(
        "caption", _job_command("ImageToText", texts=True), "describe an image (ImageToText)"
    )
    p.add_argument("image", type=Path, help="the input image file")
    p.add_argument("--model", default="", help="captioning model; default: the server's")
    p.add_argument("--prompt", default="", help="the model's task, e.g. detailed_caption")
    _job_options(p)

    p = command("crop", _transform_command("CropImage"), "crop an image to a rectangle (CropImage)")
    p.add_argument("image", type=Path, help="the input image file")
    for edge in ("x", "y", "width", "height"):
        p.add_argument(f"--{edge}", type=int, required=True)
    p.add_argument("--format", choices=_FORMATS, help="default: the input's")
    p.add_argument("--quality", type=int, help="1..100 for lossy formats")
    p.add_argument(
        "-o", "--output", required=True, metavar="PATH", help="output file, - for stdout"
    )

    p = command(
        "convert",
        _transform_command("ConvertImage"),
        "convert an image to another format (ConvertImage)",
    )
    p.add_argument("image", type=Path, help="the input image file")
    p.add_argument("--format", choices=_FORMATS, required=True)
    p.add_argument("--quality", type=int, help="1..100 for lossy formats")
    p.add_argument(
        "-o", "--output", required=True, metavar="PATH", help="output file, - for stdout"
    )

    p = command("variant", _cmd_variant, "a resized copy of a stored artifact (GetVariant)")
    p.add_argument("artifact", help="artifacts/yyyy/mm/dd/sha.ext (or its /artifacts/ URL path)")
    p.add_argument("--spec", default="", help="e.g. width=256 or width=256,height=128,format=jpg")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--fit", choices=("contain", "cover", "fill"), default="")
    p.add_argument("--format", choices=_FORMATS)
    p.add_argument("--quality", type=int)
    p.add_argument("--preset", default="", help="a preset configured on the server")
    p.add_argument(
        "-o", "--output", required=True, metavar="PATH", help="output file, - for stdout"
    )

    p = command(
        "workflows", _cmd_workflows, "the workflows the server can run, and their parameters"
    )
    p.add_argument("name", nargs="?", help="one workflow, with its parameters in detail")

    p = command(
        "run",
        _cmd_run,
        "run a workflow: aiserver run NAME image=@in.png --param steps=20 --param prompt=...",
    )
    p.add_argument("workflow", help="the workflow's name (aiserver workflows lists them)")
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT=@FILE", help="the workflow's files, e.g. image=@in.png"
    )
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter, converted to the type the workflow declares; repeatable",
    )
    p.add_argument("--format", choices=_FORMATS, help="store the outputs in this format")
    p.add_argument("--quality", type=int, help="1..100 for lossy formats")
    _job_options(p)

    jobs = subparsers.add_parser("jobs", help="list, get, watch and cancel jobs")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="jobs, newest first", parents=[common])
    p.set_defaults(client_handler=_cmd_jobs_list)
    p.add_argument(
        "--state", dest="states", action="append", choices=_STATES, default=[], help="repeatable"
    )
    p.add_argument("--task", choices=_TASKS)
    p.add_argument("--tag", default="")
    p.add_argument("--ref-id", default="")
    p.add_argument("--page-size", type=int, default=0, help="1..1000 (default 50)")
    p.add_argument("--page-token", default="")
    p.add_argument("--all-owners", action="store_true", help="every key's jobs (admin keys)")
    p = actions.add_parser("get", help="one job", parents=[common])
    p.set_defaults(client_handler=_cmd_jobs_get)
    p.add_argument("name", help="jobs/{id} or {id}")
    p = actions.add_parser("watch", help="follow a job until it ends", parents=[common])
    p.set_defaults(client_handler=_cmd_jobs_watch)
    p.add_argument("name", help="jobs/{id} or {id}")
    p.add_argument(
        "-o", "--output", metavar="PATH", help="download the outputs when the job succeeds"
    )
    p = actions.add_parser("cancel", help="cancel a queued or running job", parents=[common])
    p.set_defaults(client_handler=_cmd_jobs_cancel)
    p.add_argument("name", help="jobs/{id} or {id}")


def is_client_command(args: argparse.Namespace) -> bool:
    return getattr(args, "client_handler", None) is not None


def run_client_command(args: argparse.Namespace) -> int:
    """Runs a parsed client command; returns the exit code."""
    handler: _Handler = args.client_handler
    try:
        return asyncio.run(_dispatch(handler, args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """The client commands on their own (``python -m aiserver.cli_client``)."""
    parser = argparse.ArgumentParser(prog=PROG, description="imagetasks.v1 client commands")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return run_client_command(parser.parse_args(argv))


async def _dispatch(handler: _Handler, args: argparse.Namespace) -> int:
    from aiserver.client import AsyncClient, ClientError

    out = Out(args)
    try:
        roots = args.root_certs.read_bytes() if args.root_certs else None
    except OSError as exc:
        return out.usage(f"cannot read {args.root_certs}: {exc.strerror or exc}")
    client = AsyncClient(
        args.server or os.environ.get(ENV_ADDRESS) or "localhost:50051",
        api_key=args.api_key or os.environ.get(ENV_API_KEY) or None,
        tls=args.tls,
        root_certificates=roots,
        timeout=args.timeout,
    )
    try:
        return await handler(args, client)
    except ClientError as err:
        return out.error(err)
    except _UsageError as exc:
        return out.usage(str(exc))
    except (OSError, ValueError) as exc:
        text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
        return out.usage(text or repr(exc))
    finally:
        await client.close()


# ---- generative commands --------------------------------------------------------------------


class _Outputs:
    """Where each output of a job goes, written as its bytes arrive."""

    def __init__(self, output: str | None) -> None:
        self.base = output
        self.sinks: dict[int, OutputSink] = {}
        self.paths: dict[int, Path] = {}

    def path_for(self, index: int, file_name: str) -> Path:
        base = self.base
        if base is None:
            return Path(file_name)
        if base.endswith(("/", os.sep)) or Path(base).is_dir():
            return Path(base) / file_name
        path = Path(base)
        return path if index == 0 else path.with_name(f"{path.stem}-{index}{path.suffix}")

    def open(self, index: int, file_name: str) -> Path:
        from aiserver.client.inputs import OutputSink

        path = self.path_for(index, Path(file_name).name or f"output-{index}")
        self.sinks[index] = OutputSink(path)
        self.paths[index] = path
        return path

    async def write(self, index: int, data: bytes, last: bool) -> None:
        from aiserver.client._io_async import sink_commit, sink_write

        sink = self.sinks.get(index)
        if sink is None:
            return
        await sink_write(sink, data)
        if last:
            await sink_commit(sink)
            del self.sinks[index]

    def abort(self) -> None:
        for sink in self.sinks.values():
            sink.abort()
        self.sinks.clear()


async def _run_job(args: argparse.Namespace, stream: JobStream, *, texts_to_stdout: bool) -> int:
    from aiserver.client import (
        Accepted,
        Finished,
        OutputData,
        OutputReady,
        TextOutput,
    )

    out = Out(args)
    progress = ProgressLine(sys.stderr, enabled=not out.quiet)
    outputs = _Outputs(getattr(args, "output", None))
    accepted: Accepted | None = None
    finished: Finished | None = None
    texts: list[str] = []
    files: list[dict[str, Any]] = []
    try:
        async for event in stream:
            if not isinstance(event, OutputData):
                progress.event(event)
            if isinstance(event, Accepted):
                accepted = event
            elif isinstance(event, OutputReady):
                path = outputs.open(event.index, event.artifact.file_name)
                files.append(
                    {
                        "index": event.index,
                        "path": str(path),
                        "artifact": message_dict(event.artifact),
                    }
                )
            elif isinstance(event, OutputData):
                await outputs.write(event.index, event.data, event.last)
                if event.last:
                    progress.line(f"wrote {outputs.paths[event.index]}")
            elif isinstance(event, TextOutput):
                texts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
    except BaseException:
        outputs.abort()
        raise
    finally:
        progress.close()

    if finished is None:
        if accepted is None:
            raise _UsageError("the server ended the call without accepting a job")
        # --no-wait: the job was accepted and runs on.
        out.result(accepted.job)
        out.document({"job": accepted.job, "accepted": message_dict(accepted.raw.accepted)})
        return EXIT_OK
    job = finished.final
    texts = texts or [t.text for t in job.text_outputs]  # --result-only: no text events
    if texts_to_stdout:
        for text in texts:
            out.result(text)
    err = finished.error
    out.document(
        {
            "job": message_dict(job),
            "state": finished.state,
            "files": files,
            "texts": texts,
            "error": err.to_dict() if err is not None else None,
        }
    )
    if err is not None:
        print(f"{PROG}: job {job.name} {finished.state}: {err}", file=sys.stderr, flush=True)
        return EXIT_JOB_FAILED
    for index in sorted(outputs.paths):
        out.result(str(outputs.paths[index]))
    return EXIT_OK


def _check_input(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise _UsageError(f"cannot read {path}: no such file")


def _request(
    request_type: Callable[..., _Request], args: argparse.Namespace, **given: Any
) -> _Request:
    """``request_type`` filled from the parsed arguments named as its fields (``given`` wins)."""
    names = inspect.signature(request_type).parameters
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return request_type(**{**values, **given})


def _job_command(request_name: str, *, texts: bool = False) -> _Handler:
    """A generative command: ``request_name`` of ``aiserver.client.requests``, run as a job;
    with ``texts`` its text outputs go to stdout."""

    async def handler(args: argparse.Namespace, client: AsyncClient) -> int:
        from aiserver.client import requests

        request = _request(getattr(requests, request_name), args)
        _check_input(*(path for _, path in request.inputs()))
        return await _run_job(args, client.start(request), texts_to_stdout=texts)

    return handler


# ---- workflows --------------------------------------------------------------------------------


def _workflow_line(workflow: Any) -> str:
    name = workflow.name.removeprefix("workflows/")
    state = "ready" if workflow.available else f"unavailable: {workflow.unavailable_reason}"
    title = f" - {workflow.title}" if workflow.title else ""
    return f"{name}{title} ({state})"


def _parameter_line(param: Any) -> str:
    from imagetasks.v1 import workflow_service_pb2 as wpb

    kind = wpb.ParameterType.Name(param.type).removeprefix("PARAMETER_TYPE_").lower()
    facts = [kind, "required" if param.required else ""]
    if param.HasField("minimum") or param.HasField("maximum"):
        low = f"{param.minimum:g}" if param.HasField("minimum") else ""
        high = f"{param.maximum:g}" if param.HasField("maximum") else ""
        facts.append(f"{low}..{high}")
    if param.choices:
        facts.append("one of " + ", ".join(_value_text(c) for c in param.choices))
    if param.HasField("default_value"):
        facts.append(f"default {_value_text(param.default_value)}")
    if param.random:
        facts.append("random when unset")
    text = f"  --param {param.name}=...  ({'; '.join(f for f in facts if f)})"
    return text + (f"  {param.description}" if param.description else "")


def _value_text(value: Any) -> str:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return f"{value.number_value:g}"
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    return str(value.string_value)


async def _cmd_workflows(args: argparse.Namespace, client: AsyncClient) -> int:
    out = Out(args)
    found = [await client.get_workflow(args.name)] if args.name else await client.workflows()
    out.document({"workflows": [message_dict(w) for w in found]})
    for workflow in found:
        out.result(_workflow_line(workflow))
        if args.name:
            if workflow.description:
                out.result(f"  {workflow.description}")
            for item in workflow.inputs:
                out.result(f"  {item.name}=@FILE  ({'required' if item.required else 'optional'})")
            for param in workflow.parameters:
                out.result(_parameter_line(param))
    return EXIT_OK


async def _cmd_run(args: argparse.Namespace, client: AsyncClient) -> int:
    from aiserver.client.workflow_args import parse_assignments, parse_inputs, typed_parameters

    try:
        files = parse_inputs(args.inputs)
        given = parse_assignments(args.param)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    _check_input(*files.values())
    from aiserver.client.requests import RunWorkflow

    workflow = await client.get_workflow(args.workflow)
    request = _request(
        RunWorkflow,
        args,
        parameters=typed_parameters(workflow.parameters, given),
        files=dict(files),
        output_format=args.format,
        quality=args.quality,
    )
    stream = client.start(request)
    texts = any(o.kind == o.KIND_TEXT for o in workflow.outputs)
    return await _run_job(args, stream, texts_to_stdout=texts)


# ---- light commands -------------------------------------------------------------------------


def _destination(args: argparse.Namespace) -> Any:
    if args.output == "-":
        if args.json:
            raise _UsageError("-o - writes the image to stdout: it cannot go with --json")
        return sys.stdout.buffer
    return Path(args.output)


def _image_summary(info: Any, output: str) -> tuple[str, dict[str, Any]]:
    where = "stdout" if output == "-" else output
    text = f"{where}: {info.width}x{info.height} {info.mime_type}, {info.size_bytes} bytes"
    data = {
        "path": None if output == "-" else output,
        "format": info.format,
        "mime_type": info.mime_type,
        "width": info.width,
        "height": info.height,
        "size_bytes": info.size_bytes,
        "file_name": info.file_name,
    }
    return text, data


def _transform_command(request_name: str) -> _Handler:
    """A light command: ``request_name`` of ``aiserver.client.requests``, written to -o."""

    async def handler(args: argparse.Namespace, client: AsyncClient) -> int:
        from aiserver.client import requests

        _check_input(args.image)
        request_type = getattr(requests, request_name)
        result = await client.transform(_request(request_type, args, out=_destination(args)))
        return _light_done(args, result.info)

    return handler


def _light_done(args: argparse.Namespace, info: Any, **extra: Any) -> int:
    out = Out(args)
    text, data = _image_summary(info, args.output)
    if args.output != "-":
        out.result(text)
    out.document({**data, **extra})
    return EXIT_OK


async def _cmd_variant(args: argparse.Namespace, client: AsyncClient) -> int:
    from aiserver.client import GetVariant

    result = await client.get_variant(_request(GetVariant, args, out=_destination(args)))
    info = result.info
    return _light_done(args, info.image, spec=info.spec, etag=info.etag, url=info.url)


async def _cmd_jobs_list(args: argparse.Namespace, client: AsyncClient) -> int:
    from aiserver.client import ListJobs

    page = await client.list_page(_request(ListJobs, args))
    out = Out(args)
    for job in page.jobs:
        out.result(job_line(job))
    if page.next_page_token:
        out.result(f"(more: --page-token {page.next_page_token})")
    out.document(
        {
            "jobs": [message_dict(job) for job in page.jobs],
            "next_page_token": page.next_page_token,
        }
    )
    return EXIT_OK


async def _cmd_jobs_get(args: argparse.Namespace, client: AsyncClient) -> int:
    job = await client.get_job(args.name)
    out = Out(args)
    for line in job_details(job):
        out.result(line)
    out.document(message_dict(job))
    return EXIT_OK


async def _cmd_jobs_cancel(args: argparse.Namespace, client: AsyncClient) -> int:
    from aiserver.client.types import job_state_name

    job = await client.cancel_job(args.name)
    out = Out(args)
    out.result(f"{job.name} {job_state_name(job.state)}")
    out.document(message_dict(job))
    return EXIT_OK


async def _cmd_jobs_watch(args: argparse.Namespace, client: AsyncClient) -> int:
    from aiserver.client import Finished

    out = Out(args)
    progress = ProgressLine(sys.stderr, enabled=not out.quiet)
    finished: Finished | None = None
    try:
        async for event in client.watch_job(args.name):
            if out.json:
                print(json.dumps(message_dict(event.raw), ensure_ascii=False), flush=True)
            progress.event(event)
            if isinstance(event, Finished):
                finished = event
    finally:
        progress.close()
    if finished is None:
        raise _UsageError("the watch ended before the job did")
    err = finished.error
    if err is not None:
        print(f"{PROG}: job {finished.job} {finished.state}: {err}", file=sys.stderr, flush=True)
        return EXIT_JOB_FAILED
    if args.output:
        outputs = _Outputs(args.output)
        for index, artifact in enumerate(finished.final.outputs):
            path = outputs.path_for(index, Path(artifact.file_name).name or f"output-{index}")
            await client.save_artifact(artifact.name, path)
            out.result(str(path))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

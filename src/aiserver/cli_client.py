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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from aiserver.client import AsyncClient, ClientError, Event
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

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNAVAILABLE = 4
EXIT_AUTH = 5
EXIT_SERVER = 6
EXIT_INTERRUPTED = 130

_EXIT_BY_CODE = {
    "INVALID_ARGUMENT": EXIT_REFUSED,
    "NOT_FOUND": EXIT_REFUSED,
    "ALREADY_EXISTS": EXIT_REFUSED,
    "FAILED_PRECONDITION": EXIT_REFUSED,
    "OUT_OF_RANGE": EXIT_REFUSED,
    "RESOURCE_EXHAUSTED": EXIT_REFUSED,
    "UNIMPLEMENTED": EXIT_REFUSED,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "ABORTED": EXIT_UNAVAILABLE,
    "UNAUTHENTICATED": EXIT_AUTH,
    "PERMISSION_DENIED": EXIT_AUTH,
}

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
_PROG = "aiserver"

_Handler = Callable[[argparse.Namespace, "AsyncClient"], Coroutine[Any, Any, int]]


def exit_code_for(code_name: str) -> int:
    """The exit code for a failed call's status code name (``NOT_FOUND`` -> 3)."""
    return _EXIT_BY_CODE.get(code_name, EXIT_SERVER)


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
    group.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the job is accepted; follow it with `jobs watch`",
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

    p = command("upscale", _cmd_upscale, "2x upscale of an image (ImageUpscale)")
    p.add_argument("image", type=Path)
    p.add_argument("--model", default="", help="upscale model; default: the server's")
    _job_options(p)

    p = command("img2img", _cmd_img2img, "a new image from an image and a prompt (ImageToImage)")
    p.add_argument("image", type=Path)
    _sampling_options(p)
    _job_options(p)

    p = command("inpaint", _cmd_inpaint, "repaint inside a mask (ImageWithMask)")
    p.add_argument("image", type=Path)
    p.add_argument("--mask", type=Path, required=True, help="the mask image")
    p.add_argument("--mask-channel", choices=("red", "green", "blue", "alpha"), default="red")
    _sampling_options(p)
    _job_options(p)

    p = command("caption", _cmd_caption, "describe an image (ImageToText)")
    p.add_argument("image", type=Path)
    p.add_argument("--model", default="", help="captioning model; default: the server's")
    p.add_argument("--prompt", default="", help="the model's task, e.g. detailed_caption")
    _job_options(p)

    p = command("crop", _cmd_crop, "crop an image to a rectangle (CropImage)")
    p.add_argument("image", type=Path)
    for edge in ("x", "y", "width", "height"):
        p.add_argument(f"--{edge}", type=int, required=True)
    p.add_argument("--format", choices=_FORMATS, help="default: the input's")
    p.add_argument("--quality", type=int, help="1..100 for lossy formats")
    p.add_argument(
        "-o", "--output", required=True, metavar="PATH", help="output file, - for stdout"
    )

    p = command("convert", _cmd_convert, "convert an image to another format (ConvertImage)")
    p.add_argument("image", type=Path)
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
    p.add_argument("--state", action="append", choices=_STATES, default=[], help="repeatable")
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
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """The client commands on their own (``python -m aiserver.cli_client``)."""
    parser = argparse.ArgumentParser(prog=_PROG, description="imagetasks.v1 client commands")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return run_client_command(parser.parse_args(argv))


async def _dispatch(handler: _Handler, args: argparse.Namespace) -> int:
    from aiserver.client import AsyncClient, ClientError

    out = _Out(args)
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


# ---- printing -------------------------------------------------------------------------------


class _Out:
    """stdout for results (or JSON), stderr for progress and errors."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(args.json)
        self.quiet = bool(args.quiet)

    def result(self, text: str) -> None:
        if not self.json:
            print(text, flush=True)

    def document(self, data: Any) -> None:
        if self.json:
            print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)

    def error(self, err: ClientError) -> int:
        print(f"{_PROG}: error: {err}", file=sys.stderr, flush=True)
        self.document({"error": err.to_dict()})
        return exit_code_for(err.code_name)

    def usage(self, text: str) -> int:
        print(f"{_PROG}: error: {text}", file=sys.stderr, flush=True)
        self.document({"error": {"code": "USAGE", "message": text}})
        return EXIT_USAGE


def _message_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


class ProgressLine:
    """Job progress on ``stream``: one line redrawn in place on a terminal; otherwise plain
    lines, progress only when the stage or node changes or another 10% is done."""

    def __init__(self, stream: TextIO, *, enabled: bool = True, tty: bool | None = None) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty() if tty is None else tty
        self._live = False
        self._last_key: tuple[str, str, int] | None = None
        self._started = time.monotonic()

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((100, 20)).columns - 1)

    def live(self, text: str) -> None:
        """The progress line (a terminal), or a plain line when worth one."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + text[: self._width()])
            self.stream.flush()
            self._live = True

    def line(self, text: str) -> None:
        """A line that stays (above the live line on a terminal)."""
        if not self.enabled:
            return
        if self._live:
            self.stream.write("\r\x1b[2K")
            self._live = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._live = False

    def event(self, event: Event) -> None:
        from aiserver.client import (
            Accepted,
            Finished,
            OutputReady,
            Progress,
            Retrying,
            Stage,
            TextOutput,
        )

        if isinstance(event, Accepted):
            again = " (existing job for this ref id)" if event.existing else ""
            self.line(
                f"accepted {event.job} ({event.task}), queue position {event.queue_position}{again}"
            )
        elif isinstance(event, Progress):
            percent = int(event.fraction * 100)
            if event.stage in (Stage.QUEUED, Stage.PENDING):
                text = f"{event.stage.value}, position {event.queue_position}"
            else:
                text = event.stage.value
                if event.node_type or event.node:
                    text += f" {event.node_type or 'node'}"
                    text += f" (node {event.node})" if event.node else ""
                if event.max_steps:
                    text += f" step {event.step}/{event.max_steps}"
            if self.tty:
                filled = percent // 5
                bar = "#" * filled + "." * (20 - filled)
                self.live(f"[{bar}] {percent:3d}%  {text}  {event.job}")
                return
            key = (event.stage.value, event.node, percent // 10)
            if key != self._last_key or (event.max_steps and event.step == event.max_steps):
                self._last_key = key
                self.line(f"{text}, {percent}%")
        elif isinstance(event, OutputReady):
            a = event.artifact
            self.line(f"output {event.index}: {a.name} ({a.width}x{a.height} {a.mime_type})")
        elif isinstance(event, TextOutput):
            self.line(f"text {event.index}: {event.text}")
        elif isinstance(event, Retrying):
            self.line(f"retrying: attempt {event.attempt} failed ({event.reason})")
        elif isinstance(event, Finished):
            took = time.monotonic() - self._started
            self.line(f"finished: {event.state} after {took:.1f}s")


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
        sink = self.sinks.get(index)
        if sink is None:
            return
        await sink.write(data)
        if last:
            await sink.commit()
            del self.sinks[index]

    def abort(self) -> None:
        for sink in self.sinks.values():
            sink.abort()
        self.sinks.clear()


async def _run_job(args: argparse.Namespace, stream: Any, *, texts_to_stdout: bool) -> int:
    from aiserver.client import (
        Accepted,
        Finished,
        OutputData,
        OutputReady,
        TextOutput,
    )

    out = _Out(args)
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
                        "artifact": _message_dict(event.artifact),
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
        out.document({"job": accepted.job, "accepted": _message_dict(accepted.raw.accepted)})
        return EXIT_OK
    job = finished.final
    if texts_to_stdout:
        for text in texts:
            out.result(text)
    err = finished.error
    out.document(
        {
            "job": _message_dict(job),
            "state": finished.state,
            "files": files,
            "texts": texts,
            "error": err.to_dict() if err is not None else None,
        }
    )
    if err is not None:
        print(f"{_PROG}: job {job.name} {finished.state}: {err}", file=sys.stderr, flush=True)
        return EXIT_JOB_FAILED
    for index in sorted(outputs.paths):
        out.result(str(outputs.paths[index]))
    return EXIT_OK


def _check_input(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise _UsageError(f"cannot read {path}: no such file")


def _job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "ref_id": args.ref_id,
        "tag": args.tag,
        "reply_to": args.reply_to,
        "wait": not args.no_wait,
    }


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "denoise": args.denoise,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "sampler": args.sampler,
        "scheduler": args.scheduler,
    }


async def _cmd_upscale(args: argparse.Namespace, client: AsyncClient) -> int:
    _check_input(args.image)
    stream = client.upscale(args.image, model=args.model, **_job_kwargs(args))
    return await _run_job(args, stream, texts_to_stdout=False)


async def _cmd_img2img(args: argparse.Namespace, client: AsyncClient) -> int:
    _check_input(args.image)
    stream = client.image_to_image(args.image, **_sampling_kwargs(args), **_job_kwargs(args))
    return await _run_job(args, stream, texts_to_stdout=False)


async def _cmd_inpaint(args: argparse.Namespace, client: AsyncClient) -> int:
    _check_input(args.image, args.mask)
    stream = client.image_with_mask(
        args.image,
        args.mask,
        mask_channel=args.mask_channel,
        **_sampling_kwargs(args),
        **_job_kwargs(args),
    )
    return await _run_job(args, stream, texts_to_stdout=False)


async def _cmd_caption(args: argparse.Namespace, client: AsyncClient) -> int:
    _check_input(args.image)
    stream = client.image_to_text(
        args.image, model=args.model, prompt=args.prompt, **_job_kwargs(args)
    )
    return await _run_job(args, stream, texts_to_stdout=True)


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
    out = _Out(args)
    found = [await client.get_workflow(args.name)] if args.name else await client.workflows()
    out.document({"workflows": [_message_dict(w) for w in found]})
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
    workflow = await client.get_workflow(args.workflow)
    stream = client.run_workflow(
        args.workflow,
        typed_parameters(workflow.parameters, given),
        dict(files),
        output_format=args.format,
        quality=args.quality,
        **_job_kwargs(args),
    )
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


async def _cmd_crop(args: argparse.Namespace, client: AsyncClient) -> int:
    _check_input(args.image)
    result = await client.crop(
        args.image,
        x=args.x,
        y=args.y,
        width=args.width,
        height=args.height,
        format=args.format,
        quality=args.quality,
        out=_destination(args),
    )
    return _light_done(args, result.info)


async def _cmd_convert(args: argparse.Namespace, client: AsyncClient) -> int:
    _check_input(args.image)
    result = await client.convert(
        args.image, format=args.format, quality=args.quality, out=_destination(args)
    )
    return _light_done(args, result.info)


def _light_done(args: argparse.Namespace, info: Any, **extra: Any) -> int:
    out = _Out(args)
    text, data = _image_summary(info, args.output)
    if args.output != "-":
        out.result(text)
    out.document({**data, **extra})
    return EXIT_OK


async def _cmd_variant(args: argparse.Namespace, client: AsyncClient) -> int:
    result = await client.variant(
        args.artifact,
        spec=args.spec,
        width=args.width,
        height=args.height,
        fit=args.fit,
        format=args.format,
        quality=args.quality,
        preset=args.preset,
        out=_destination(args),
    )
    info = result.info
    return _light_done(args, info.image, spec=info.spec, etag=info.etag, url=info.url)


# ---- jobs -----------------------------------------------------------------------------------


def _job_line(job: Any) -> str:
    from aiserver.client.types import job_state_name, task_name

    created = ""
    if job.HasField("create_time"):
        created = job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
    return "  ".join(
        [
            job.name,
            f"{task_name(job.task):<13}",
            f"{job_state_name(job.state):<9}",
            f"{int(job.progress * 100):3d}%",
            created,
            job.tag,
        ]
    ).rstrip()


def _job_details(job: Any) -> list[str]:
    from aiserver.client.types import job_error, job_state_name, task_name

    lines = [
        f"name:     {job.name}",
        f"task:     {task_name(job.task)}",
        f"state:    {job_state_name(job.state)}",
        f"progress: {int(job.progress * 100)}%",
    ]
    if job.ref_id:
        lines.append(f"ref id:   {job.ref_id}")
    if job.tag:
        lines.append(f"tag:      {job.tag}")
    if job.provider:
        agent = f" ({job.agent})" if job.agent else ""
        lines.append(f"provider: {job.provider}{agent}")
    if job.state == job.STATE_QUEUED:
        lines.append(f"queue:    position {job.queue_position}")
    for artifact in job.outputs:
        lines.append(f"output:   {artifact.name} ({artifact.width}x{artifact.height})")
    for text in job.text_outputs:
        lines.append(f"text:     {text.text}")
    err = job_error(job)
    if err is not None:
        lines.append(f"error:    {err}")
    return lines


async def _cmd_jobs_list(args: argparse.Namespace, client: AsyncClient) -> int:
    page = await client.list_jobs(
        states=args.state,
        task=args.task,
        tag=args.tag,
        ref_id=args.ref_id,
        page_size=args.page_size,
        page_token=args.page_token,
        all_owners=args.all_owners,
    )
    out = _Out(args)
    for job in page.jobs:
        out.result(_job_line(job))
    if page.next_page_token:
        out.result(f"(more: --page-token {page.next_page_token})")
    out.document(
        {
            "jobs": [_message_dict(job) for job in page.jobs],
            "next_page_token": page.next_page_token,
        }
    )
    return EXIT_OK


async def _cmd_jobs_get(args: argparse.Namespace, client: AsyncClient) -> int:
    job = await client.get_job(args.name)
    out = _Out(args)
    for line in _job_details(job):
        out.result(line)
    out.document(_message_dict(job))
    return EXIT_OK


async def _cmd_jobs_cancel(args: argparse.Namespace, client: AsyncClient) -> int:
    from aiserver.client.types import job_state_name

    job = await client.cancel_job(args.name)
    out = _Out(args)
    out.result(f"{job.name} {job_state_name(job.state)}")
    out.document(_message_dict(job))
    return EXIT_OK


async def _cmd_jobs_watch(args: argparse.Namespace, client: AsyncClient) -> int:
    from aiserver.client import Finished

    out = _Out(args)
    progress = ProgressLine(sys.stderr, enabled=not out.quiet)
    finished: Finished | None = None
    try:
        async for event in client.watch_job(args.name):
            if out.json:
                print(json.dumps(_message_dict(event.raw), ensure_ascii=False), flush=True)
            progress.event(event)
            if isinstance(event, Finished):
                finished = event
    finally:
        progress.close()
    if finished is None:
        raise _UsageError("the watch ended before the job did")
    err = finished.error
    if err is not None:
        print(f"{_PROG}: job {finished.job} {finished.state}: {err}", file=sys.stderr, flush=True)
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

"""The client commands of the ``aiserver`` console script, run as subprocesses."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from imagetasks.v1 import job_pb2
from PIL import Image

from aiserver import cli_client
from aiserver.client import Accepted, Finished, Progress, Stage
from aiserver.server import Service
from tests.client.cli_run import run, run_raw
from tests.client.support import INJECTED_FAILURE, GenServer
from tests.support.images import encode, quadrant_image

PNG = encode(quadrant_image(64, 48), "PNG")
MASK = encode(Image.new("RGB", (64, 48), (255, 0, 0)), "PNG")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "photo.png").write_bytes(PNG)
    (tmp_path / "mask.png").write_bytes(MASK)
    return tmp_path


def target(service: Service) -> str:
    return f"127.0.0.1:{service.grpc_port}"


# ---- light commands -------------------------------------------------------------------------


async def test_convert_writes_the_file(service: Service, work: Path) -> None:
    line = "convert photo.png --format webp -o photo.webp"
    code, out, err = await run(line, cwd=work, server=target(service))
    assert (code, err) == (0, "")
    assert out.startswith("photo.webp: 64x48 image/webp, ") and out.endswith(" bytes\n")
    with Image.open(work / "photo.webp") as im:
        assert im.format == "WEBP" and im.size == (64, 48)


async def test_crop_json_and_the_address_from_the_environment(service: Service, work: Path) -> None:
    line = "crop photo.png --x 8 --y 8 --width 16 --height 12 --format jpg -o crop.jpg --json"
    code, out, _ = await run(line, cwd=work, env={"AISERVER_ADDRESS": target(service)})
    assert code == 0
    doc = json.loads(out)
    assert (doc["width"], doc["height"], doc["format"], doc["path"]) == (16, 12, "jpg", "crop.jpg")
    assert (work / "crop.jpg").stat().st_size == doc["size_bytes"]


async def test_convert_to_stdout(service: Service, work: Path) -> None:
    code, data, err = await run_raw(
        "convert photo.png --format png -o -", cwd=work, server=target(service)
    )
    assert code == 0, err
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (64, 48)


async def test_refused_request_exit_3_with_reason_and_fields(service: Service, work: Path) -> None:
    line = "crop photo.png --x 0 --y 0 --width 999 --height 5 -o c.png"
    code, out, err = await run(line, cwd=work, server=target(service))
    assert code == cli_client.EXIT_REFUSED == 3
    assert out == ""
    (message,) = err.splitlines()
    assert message.startswith("aiserver: error: INVALID_ARGUMENT: ")
    assert "[CROP_OUT_OF_BOUNDS]" in message and "(params.width: " in message
    assert not (work / "c.png").exists() and not (work / "c.png.part").exists()

    code, out, _ = await run(f"{line} --json", cwd=work, server=target(service))
    assert code == 3
    error = json.loads(out)["error"]
    assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "CROP_OUT_OF_BOUNDS")
    assert error["field_violations"][0]["field"] == "params.width"


async def test_usage_errors_exit_2(service: Service, work: Path) -> None:
    code, _, err = await run("convert photo.png -o x.png", cwd=work)
    assert code == cli_client.EXIT_USAGE == 2 and "--format" in err
    line = "convert missing.png --format png -o x.png"
    code, _, err = await run(line, cwd=work, server=target(service))
    assert code == 2 and "missing.png" in err and len(err.splitlines()) == 1


async def test_unreachable_server_exit_4(work: Path) -> None:
    code, _, err = await run("jobs list --timeout 5", cwd=work, server="127.0.0.1:1")
    assert code == cli_client.EXIT_UNAVAILABLE == 4
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


# ---- generative commands --------------------------------------------------------------------


async def test_upscale_progress_lines_and_output(gen: GenServer, work: Path) -> None:
    code, out, err = await run("upscale photo.png -o big.png", cwd=work, server=gen.target)
    assert code == 0, err
    assert out == "big.png\n"
    lines = err.splitlines()
    assert lines[0].startswith("accepted jobs/") and "(ImageUpscale)" in lines[0]
    assert any(line.startswith("output 0: artifacts/") for line in lines)
    assert "wrote big.png" in lines and lines[-1].startswith("finished: SUCCEEDED")
    assert "\r" not in err  # not a terminal: plain lines
    with Image.open(work / "big.png") as im:
        assert im.size == (128, 96)


async def test_result_only_hears_no_progress_and_prints_texts(gen: GenServer, work: Path) -> None:
    line = "upscale photo.png -o big.png --result-only"
    code, out, err = await run(line, cwd=work, server=gen.target)
    assert code == 0, err
    assert out == "big.png\n"
    lines = err.splitlines()
    assert lines[0].startswith("output 0: artifacts/"), lines  # no accepted, no progress
    assert lines[-1].startswith("finished: SUCCEEDED")
    with Image.open(work / "big.png") as im:
        assert im.size == (128, 96)
    # The caption comes from the final job (no text_output event in this mode).
    code, out, err = await run("caption photo.png -q --result-only", cwd=work, server=gen.target)
    assert (code, err) == (0, "") and out.strip()
    code, _, err = await run(
        "upscale photo.png --no-wait --result-only", cwd=work, server=gen.target
    )
    assert code == 2 and "not allowed with argument" in err


async def test_img2img_batch_into_a_directory_with_json(gen: GenServer, work: Path) -> None:
    line = (
        "img2img photo.png --prompt 'a lighthouse' --steps 2 --batch-size 2 --seed 5 "
        "-o out/ --json --tag cli"
    )
    code, out, err = await run(line, cwd=work, server=gen.target)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["state"] == "SUCCEEDED" and doc["error"] is None
    assert doc["job"]["tag"] == "cli" and doc["job"]["state"] == "STATE_SUCCEEDED"
    paths = [work / f["path"] for f in doc["files"]]
    assert len(paths) == 2 and all(p.parent.name == "out" and p.is_file() for p in paths)
    assert paths[0].stat().st_size == int(doc["files"][0]["artifact"]["size_bytes"])


async def test_inpaint_and_caption(gen: GenServer, work: Path) -> None:
    line = "inpaint photo.png --mask mask.png --prompt 'a red door' --steps 2 -o door.png -q"
    code, out, err = await run(line, cwd=work, server=gen.target)
    assert (code, out, err) == (0, "door.png\n", "")
    code, out, err = await run("caption photo.png -q", cwd=work, server=gen.target)
    assert code == 0 and out.strip() and err == ""


async def test_failed_job_exit_1_and_bad_parameters_exit_3(gen: GenServer, work: Path) -> None:
    code, _, err = await run(
        "img2img photo.png --prompt x --denoise 1.5", cwd=work, server=gen.target
    )
    assert code == 3 and "params.denoise" in err

    gen.fail_image_to_image()
    line = "img2img photo.png --prompt x --timeout 20"
    code, _, err = await run(line, cwd=work, server=gen.target)
    assert code == cli_client.EXIT_JOB_FAILED == 1
    last = err.splitlines()[-1]
    assert last.startswith("aiserver: job jobs/") and " FAILED: " in last
    assert INJECTED_FAILURE in last


async def test_no_wait_then_jobs_watch_get_list_and_variant(gen: GenServer, work: Path) -> None:
    server = gen.target
    code, out, _ = await run("upscale photo.png --no-wait --tag bg", cwd=work, server=server)
    assert code == 0
    name = out.strip()
    assert name.startswith("jobs/")

    code, out, err = await run(f"jobs watch {name} -o dl/", cwd=work, server=server)
    assert code == 0, err
    (saved,) = [work / line for line in out.split()]
    with Image.open(saved) as im:
        assert im.size == (128, 96)

    code, out, _ = await run(f"jobs watch {name} --json", cwd=work, server=server)
    events = [json.loads(line) for line in out.splitlines()]
    assert "accepted" in events[0] and "finished" in events[-1]

    job_id = name.removeprefix("jobs/")
    code, out, _ = await run(f"jobs get {job_id} --json", cwd=work, server=server)
    job = json.loads(out)
    assert job["name"] == name and job["state"] == "STATE_SUCCEEDED"
    artifact = job["outputs"][0]["name"]

    code, out, _ = await run(f"jobs get {name}", cwd=work, server=server)
    assert f"name:     {name}" in out and "state:    SUCCEEDED" in out

    code, out, _ = await run("jobs list --tag bg --state succeeded", cwd=work, server=server)
    (line,) = out.splitlines()
    assert line.startswith(name) and "ImageUpscale" in line and "SUCCEEDED" in line

    line = f"variant {artifact} --spec width=32 -o v.webp"
    code, out, err = await run(line, cwd=work, server=server)
    assert code == 0, err
    with Image.open(work / "v.webp") as im:
        assert im.width == 32

    code, _, err = await run("jobs get 01NOSUCHJOB", cwd=work, server=server)
    assert code == 3 and "NOT_FOUND" in err


async def test_jobs_cancel_then_watch_exit_1(gen: GenServer, work: Path) -> None:
    gen.hang_image_to_image()
    code, out, _ = await run("img2img photo.png --prompt x --no-wait", cwd=work, server=gen.target)
    name = out.strip()
    code, out, err = await run(f"jobs cancel {name}", cwd=work, server=gen.target)
    assert (code, out.strip()) == (0, f"{name} CANCELLED"), err
    code, _, err = await run(f"jobs watch {name}", cwd=work, server=gen.target)
    assert code == 1 and "CANCELLED" in err.splitlines()[-1]


# ---- in process -----------------------------------------------------------------------------


async def test_in_process_dispatch(
    service: Service, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "photo.bmp"
    argv = ["convert", str(work / "photo.png"), "--format", "bmp", "-o", str(out)]
    code = await asyncio.to_thread(cli_client.main, [*argv, "--server", target(service)])
    assert code == 0
    assert capsys.readouterr().out.startswith(f"{out}: 64x48 image/bmp")
    with pytest.raises(SystemExit) as caught:
        cli_client.main(["convert"])
    assert caught.value.code == 2


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress(fraction: float, step: int, stage: Stage = Stage.RUNNING) -> Progress:
    return Progress(
        "jobs/1", 3, stage, 2, "7", "KSampler", step, 4, fraction, "gpu-0", raw=job_pb2.JobEvent()
    )


def test_progress_line_on_a_terminal_redraws_one_line() -> None:
    tty = _Tty()
    line = cli_client.ProgressLine(tty)
    line.event(Accepted("jobs/1", 1, "ImageToImage", "r", 0, False, raw=job_pb2.JobEvent()))
    line.event(_progress(0.0, 0, Stage.QUEUED))
    line.event(_progress(0.5, 2))
    final = job_pb2.Job(state=job_pb2.Job.STATE_SUCCEEDED)
    line.event(Finished("jobs/1", 9, final, raw=job_pb2.JobEvent()))
    text = tty.getvalue()
    assert "\r\x1b[2K[##########..........]  50%  running KSampler (node 7) step 2/4" in text
    assert "queued, position 2" in text
    assert "\r\x1b[2Kfinished: SUCCEEDED after " in text
    assert text.count("\n") == 2  # the accepted and finished lines; progress stays in place


def test_plain_progress_lines_are_throttled() -> None:
    plain = io.StringIO()
    line = cli_client.ProgressLine(plain)
    for step in range(1, 5):
        line.event(_progress(step / 4 * 0.02, step))  # four steps within the same 10%
    assert plain.getvalue().splitlines() == [
        "running KSampler (node 7) step 1/4, 0%",
        "running KSampler (node 7) step 4/4, 2%",
    ]


def test_exit_codes() -> None:
    codes = [cli_client.exit_code_for(c) for c in ("NOT_FOUND", "UNAVAILABLE", "INTERNAL")]
    assert codes == [3, 4, 6]
    assert cli_client.exit_code_for("PERMISSION_DENIED") == cli_client.EXIT_AUTH == 5

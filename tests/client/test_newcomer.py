"""A newcomer's first five minutes: the README's set-up, plain ``--help``, a clean tree after
the walkthrough, and a wheel that installs with its built-in workflows."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aiserver import cli
from tests.client.test_readme_walkthrough import walkthrough_blocks

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
WORKFLOWS = sorted(p.name for p in (ROOT / "workflows").glob("*.json"))

COMMANDS = [
    [],
    ["serve"],
    ["upscale"],
    ["img2img"],
    ["inpaint"],
    ["caption"],
    ["crop"],
    ["convert"],
    ["variant"],
    ["jobs"],
    ["jobs", "list"],
    ["jobs", "get"],
    ["jobs", "watch"],
    ["jobs", "cancel"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "aiserver")
def test_help_is_plain_text(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: aiserver")
    assert "`" not in text  # reStructuredText or Markdown markup
    assert ":program:" not in text and ":class:" not in text
    assert "aiserver --help" not in text  # the help pointing at itself


def test_the_readme_puts_the_venv_on_path_before_the_first_bare_grpcurl() -> None:
    text = README.read_text()
    first = re.search(r"(?m)^```sh\n(?:(?!```).*\n)*?(?:.*\| )?grpcurl ", text)
    assert first is not None
    before = text[: first.start()]
    assert 'export PATH="$PWD/.venv/bin:$PATH"' in before
    makefile = (ROOT / "Makefile").read_text()
    run = makefile[makefile.index("\nrun:") : makefile.index("\n\n", makefile.index("\nrun:"))]
    assert "export PATH=" in run  # `make run` says it too


def _walkthrough_outputs() -> set[str]:
    """Files the walkthrough's blocks write in the folder they run in."""
    names: set[str] = set()
    for _, code in walkthrough_blocks():
        names |= set(re.findall(r"(?:>|-o|out=|open\()\s*\"?([\w-]+\.(?:json|png|webp))", code))
        for args in re.findall(r"client\.js \w+ (\S+) (\S+)", code):
            names.add(args[1])
    names.discard("photo.png")  # the input
    names.discard("never.png")  # the crop that fails writes nothing
    return names


def test_what_the_walkthrough_writes_is_ignored_by_git() -> None:
    outputs = _walkthrough_outputs()
    assert {"events.json", "job.json", "photo-2x.png", "photo.webp"} <= outputs
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *sorted(outputs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert sorted(result.stdout.split()) == sorted(outputs), result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A wheel built from the checkout as ``pip install .`` builds it, and the build's log."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = out.glob("aiserver_grpc-*.whl")
    return path, build.stdout + build.stderr


def test_the_wheel_builds_without_setuptools_deprecations(wheel: tuple[Path, str]) -> None:
    _, log = wheel
    assert "project.license" not in log
    assert "deprecat" not in log.lower() and "BuildBackendWarning" not in log


def test_the_wheel_carries_the_workflows_default_workflows_dir_finds(
    wheel: tuple[Path, str], tmp_path: Path
) -> None:
    path, _ = wheel
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    shipped = sorted(
        Path(n).name for n in names if n.startswith("aiserver/builtin_workflows/") and ".json" in n
    )
    assert shipped == WORKFLOWS
    # The installed package (not the checkout) resolves its workflows and loads them.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from aiserver.providers.comfy.workflows import WorkflowCatalog, default_workflows_dir;"
        "import aiserver; print(aiserver.__file__); print(default_workflows_dir());"
        "print(len(WorkflowCatalog.load().workflows()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "site")],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=60,
    )
    package, folder, loaded = run.stdout.split()
    assert Path(package).is_relative_to(tmp_path / "site")
    assert Path(folder) == (tmp_path / "site" / "aiserver" / "builtin_workflows").resolve()
    assert sorted(p.name for p in Path(folder).glob("*.json")) == WORKFLOWS
    # a graph and a binding per workflow, and the bindings' JSON Schema beside them
    assert int(loaded) == len([n for n in WORKFLOWS if n.endswith(".binding.json")])

"""Generate (or check) the Python code for protos/ into generated/.

`--out DIR` writes the code; `--check DIR` generates into a temporary folder and fails when DIR
differs, so CI catches protos edited without regenerating.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEPS = ROOT / "build" / "proto-deps"
WELL_KNOWN = Path(grpc_tools.__path__[0]) / "_proto"
# protovalidate's rules, as a descriptor set (see tools/proto_deps.py); its Python module is
# generated into the output too, since no installed wheel provides `buf.validate.validate_pb2`.
VALIDATE_SET = DEPS / "buf-validate.binpb"
VALIDATE_PROTO = "buf/validate/validate.proto"
PACKAGES = ("imagetasks", "buf")


def generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The mypy plugins live beside this interpreter, which may not be on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"--descriptor_set_in={VALIDATE_SET}",
        f"-I{PROTOS}", f"-I{DEPS}", f"-I{WELL_KNOWN}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        f"--mypy_out={out}", f"--mypy_grpc_out={out}",
        *files, VALIDATE_PROTO,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=PROTOS, env=env)
    # Packages need an __init__.py so setuptools installs them.
    for leaf in {p.parent for p in out.rglob("*_pb2.py")}:
        for pkg in (leaf, *leaf.parents):
            if pkg == out:
                break
            (pkg / "__init__.py").touch()
            (pkg / "py.typed").touch()


def build_image(image: Path) -> None:
    """A Buf image (a FileDescriptorSet with imports and source info) for `buf lint`: buf
    cannot build validate.proto from a descriptor set, so it lints what protoc compiled."""
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    image.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"--descriptor_set_in={VALIDATE_SET}",
        f"-I{PROTOS}", f"-I{DEPS}", f"-I{WELL_KNOWN}",
        "--include_imports", "--include_source_info", f"--descriptor_set_out={image.resolve()}",
        *files,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=PROTOS)


def differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    diffs = [f"only in {cmp.left}: {n}" for n in cmp.left_only]
    diffs += [f"only in {cmp.right}: {n}" for n in cmp.right_only]
    diffs += [f"differs: {Path(cmp.left) / n}" for n in cmp.diff_files]
    for sub in cmp.common_dirs:
        diffs += differences(a / sub, b / sub)
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path)
    group.add_argument("--check", type=Path)
    group.add_argument("--image", type=Path, help="write a Buf image for `buf lint`")
    args = parser.parse_args()
    if args.image:
        build_image(args.image)
        return 0
    if args.out:
        for package in PACKAGES:
            shutil.rmtree(args.out / package, ignore_errors=True)
        generate(args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        diffs = [
            d
            for package in PACKAGES
            for d in differences(args.check / package, Path(tmp) / package)
        ]
    if diffs:
        print("generated/ is stale; run `make proto`:", *diffs, sep="\n  ", file=sys.stderr)
        return 1
    print("generated/ matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

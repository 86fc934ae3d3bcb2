"""Lay out the protos that protos/ imports, from installed wheels (no network, nothing vendored).

- googleapis' `google/api/{annotations,http}.proto` and `google/rpc/status.proto`: copied from
  the googleapis-common-protos wheel.
- `buf/validate/validate.proto` (protovalidate's rules): the protovalidate wheel ships its
  compiled descriptor, not the source, so it is written as a FileDescriptorSet
  (`buf-validate.binpb`, with the well-known files it imports) that protoc reads with
  `--descriptor_set_in`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import google.api
import google.rpc
from google.protobuf import (
    descriptor_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
)
from protovalidate._gen.buf.validate import validate_pb

VALIDATE_SET = "buf-validate.binpb"


def validate_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    fds = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        fds.file.add().ParseFromString(module.DESCRIPTOR.serialized_pb)
    # protovalidate exposes the file's descriptor only on its generated module.
    fds.file.add().ParseFromString(validate_pb._DESC.proto.to_binary())
    return fds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    out: Path = parser.parse_args().out
    shutil.rmtree(out, ignore_errors=True)
    (out / "google" / "api").mkdir(parents=True)
    (out / "google" / "rpc").mkdir(parents=True)
    api = Path(google.api.__path__[0])
    rpc = Path(google.rpc.__path__[0])
    for name in ("annotations.proto", "http.proto"):
        shutil.copy(api / name, out / "google" / "api" / name)
    shutil.copy(rpc / "status.proto", out / "google" / "rpc" / "status.proto")
    (out / VALIDATE_SET).write_bytes(validate_descriptor_set().SerializeToString())


if __name__ == "__main__":
    main()

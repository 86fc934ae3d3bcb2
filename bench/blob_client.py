"""Which S3 client for the blob store: boto3, or a small SigV4-signed httpx client.

Puts and gets 1 MiB and 64 MiB objects against moto's S3 server, started here as a separate
process (its CPU is not counted). Client CPU (``time.process_time``) and wall time per op.

    python -m bench.blob_client [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from urllib.parse import quote

import boto3
import httpx

_KEY, _SECRET, _REGION = "bench-key", "bench-secret", "us-east-1"
Op = Callable[[str, bytes | None], bytes | None]


def _sign(method: str, host: str, path: str, payload_hash: str) -> dict[str, str]:
    """AWS Signature V4 headers for one request (no query string)."""
    now = dt.datetime.now(dt.UTC)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [method, quote(path), "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed]
    )
    canonical += "\n" + payload_hash
    scope = f"{day}/{_REGION}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + _SECRET).encode()
    for part in (day, _REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={_KEY}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers


def _httpx_ops(endpoint: str, bucket: str) -> Op:
    client = httpx.Client(base_url=endpoint, timeout=60)
    host = endpoint.split("://", 1)[1]

    def op(key: str, data: bytes | None) -> bytes | None:
        path = f"/{bucket}/{key}"
        if data is not None:
            # UNSIGNED-PAYLOAD: TLS protects the body; hashing 64 MiB would dominate the cost.
            client.put(path, content=data, headers=_sign("PUT", host, path, "UNSIGNED-PAYLOAD"))
            return None
        got = client.get(path, headers=_sign("GET", host, path, "UNSIGNED-PAYLOAD"))
        got.raise_for_status()
        return got.content

    return op


def _boto3_ops(endpoint: str, bucket: str) -> Op:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=_REGION,
        aws_access_key_id=_KEY,
        aws_secret_access_key=_SECRET,
    )

    def op(key: str, data: bytes | None) -> bytes | None:
        if data is not None:
            client.put_object(Bucket=bucket, Key=key, Body=data)
            return None
        body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    return op


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(endpoint + "/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=_REGION,
            aws_access_key_id=_KEY, aws_secret_access_key=_SECRET,
        ).create_bucket(Bucket=bucket)  # fmt: skip
        clients = {"boto3": _boto3_ops(endpoint, bucket), "httpx": _httpx_ops(endpoint, bucket)}
        results: dict[str, dict[str, float]] = {}
        for size_name, size in (("1MiB", 1 << 20), ("64MiB", 64 << 20)):
            data = os.urandom(size)
            rounds = args.rounds if size < (8 << 20) else max(2, args.rounds // 2)
            samples: dict[str, list[tuple[float, float]]] = {}
            for r in range(rounds):
                for name, op in clients.items():  # alternate clients within each round
                    key = f"{name}/{size_name}/{r}"
                    for verb, payload in (("put", data), ("get", None)):
                        c0, w0 = time.process_time(), time.perf_counter()
                        got = op(key, payload)
                        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                        assert verb == "put" or got == data
                        samples.setdefault(f"{name} {verb} {size_name}", []).append((cpu, wall))
            for label, values in samples.items():
                results[label] = {
                    "cpu_ms": round(statistics.median(v[0] for v in values) * 1000, 2),
                    "wall_ms": round(statistics.median(v[1] for v in values) * 1000, 2),
                }
        print(json.dumps(results, indent=2))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

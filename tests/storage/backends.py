"""Real backends for the conformance suites: each test gets its own database schema or folder."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import asyncpg
import boto3

from aiserver.artifacts.index import PostgresArtifactIndex
from aiserver.artifacts.store import ArtifactStore
from aiserver.blobs.s3 import S3BlobStore
from aiserver.jobs.store import JobStore, SqliteJobStore
from aiserver.jobs.store.postgres import PostgresJobStore, migrate

PG_URL = os.environ.get("AISERVER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


class JobStoreBackend:
    """Opens stores on one backing database (a file, or a fresh schema); drops it at the end."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.db_path = root / "jobs.sqlite3"
        self.schema = f"t_{uuid.uuid4().hex[:16]}"
        self.opened: list[JobStore] = []

    async def open(self) -> JobStore:
        store: JobStore
        if self.kind == "sqlite":
            store = await SqliteJobStore.open(self.db_path)
        else:
            store = await PostgresJobStore.open(PG_URL, schema=self.schema, pool_size=4)
        self.opened.append(store)
        return store

    async def sql(self, statement: str) -> object:
        """Run one statement on the backing database, outside any store."""
        if self.kind == "sqlite":
            import sqlite3

            conn = sqlite3.connect(self.db_path)
            try:
                row = conn.execute(statement).fetchone()
                conn.commit()
                return None if row is None else row[0]
            finally:
                conn.close()
        conn2 = await asyncpg.connect(PG_URL, server_settings={"search_path": self.schema})
        try:
            return await conn2.fetchval(statement)
        finally:
            await conn2.close()

    async def close(self) -> None:
        for store in self.opened:
            await store.close()
        if self.kind == "postgres":
            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
            finally:
                await conn.close()


class S3Server:
    """moto's S3-protocol server, a real HTTP server on 127.0.0.1 (a thread of this process)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self._admin = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", **S3_CREDENTIALS
        )

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:20]}"
        self._admin.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._admin.close()
        self._server.stop()


S3_CREDENTIALS = {"aws_access_key_id": "test-key", "aws_secret_access_key": "test-secret"}


class SharedBackends:
    """PostgreSQL + S3 for the service tests when ``AISERVER_TEST_BACKENDS=postgres+s3``:
    each service gets a fresh schema and bucket; :meth:`close` drops the schemas."""

    def __init__(self) -> None:
        self._s3: S3Server | None = None
        self.schemas: list[str] = []

    def overrides(self) -> dict[str, str]:
        if self._s3 is None:
            self._s3 = S3Server()
            # boto3 reads these in the service under test, as it would in production.
            os.environ["AWS_ENDPOINT_URL"] = self._s3.endpoint
            os.environ["AWS_ACCESS_KEY_ID"] = S3_CREDENTIALS["aws_access_key_id"]
            os.environ["AWS_SECRET_ACCESS_KEY"] = S3_CREDENTIALS["aws_secret_access_key"]
            os.environ["AWS_REGION"] = "us-east-1"
        schema = f"t_{uuid.uuid4().hex[:16]}"
        self.schemas.append(schema)
        return {
            "database_url": PG_URL,
            "database_schema": schema,
            "blob_url": f"s3://{self._s3.new_bucket()}/artifacts",
        }

    async def close(self) -> None:
        if self.schemas:
            conn = await asyncpg.connect(PG_URL)
            try:
                for schema in self.schemas:
                    await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()
        if self._s3 is not None:
            self._s3.stop()


SHARED_BACKENDS = (
    SharedBackends() if os.environ.get("AISERVER_TEST_BACKENDS") == "postgres+s3" else None
)
"""Set when the service tests run on PostgreSQL + S3 instead of SQLite + a folder."""


class ArtifactSchema:
    """One migrated schema for the artifact tests of a run (migrating per test costs ~1 s);
    each test starts from empty tables. Dropped at the end of the run."""

    def __init__(self) -> None:
        self.name = f"t_{uuid.uuid4().hex[:16]}"
        self.ready = False

    async def fresh(self) -> str:
        if not self.ready:
            await migrate(PG_URL, self.name)
            self.ready = True
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": self.name})
        try:
            await conn.execute("TRUNCATE artifact_refs, artifact_blobs")
        finally:
            await conn.close()
        return self.name

    async def drop(self) -> None:
        if self.ready:
            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")
            finally:
                await conn.close()


async def shared_artifact_store(
    root: Path, s3: S3Server, schema: ArtifactSchema, clock: Callable[[], datetime]
) -> ArtifactStore:
    """An ArtifactStore as coordinators share it: index in PostgreSQL, bytes in S3."""
    blobs = S3BlobStore(
        f"s3://{s3.new_bucket()}/artifacts",
        endpoint_url=s3.endpoint,
        access_key=S3_CREDENTIALS["aws_access_key_id"],
        secret_key=S3_CREDENTIALS["aws_secret_access_key"],
    )
    index = await PostgresArtifactIndex.open(PG_URL, schema=await schema.fresh(), pool_size=2)
    return ArtifactStore(root, clock=clock, blobs=blobs, index=index)

"""Settings: one frozen dataclass, read from the environment and an optional TOML file.

Every field can be set as ``AISERVER_<FIELD>`` (upper case), e.g. ``AISERVER_GRPC_PORT=6000``,
or in a TOML file named by ``AISERVER_CONFIG`` (keys are the field names; ComfyUI agents go in
``[[agents]]`` tables). The environment wins over the file; the file wins over the defaults.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from aiserver.providers.comfy.settings import AgentSettings

__all__ = ["AgentSettings", "Settings", "load_settings"]

ENV_PREFIX = "AISERVER_"


@dataclass(frozen=True, slots=True)
class Settings:
    """Service settings, with the embedded defaults: local disk, no GPU, no ComfyUI."""

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds to."""
    grpc_port: int = 50051
    """gRPC port; 0 picks a free one (the bound port is logged)."""
    http_enabled: bool = True
    """Serve the HTTP shim (AI Server's REST surface) beside gRPC, in the same process."""
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    """HTTP shim port; 0 picks a free one."""
    data_dir: Path = Path("data")
    """Where the job database, uploads and artifacts live."""
    database_url: str = ""
    """``postgresql://user@host:5432/db``: jobs, events, leases and the outbox live there,
    shared by every coordinator (docs/scale-out.md). Empty: SQLite under ``data_dir``."""
    database_schema: str = "public"
    """The PostgreSQL schema of this deployment's tables (created and migrated at start)."""
    job_lease_s: float = 30.0
    """On PostgreSQL: how long a coordinator's hold on a job lasts without renewal (renewed
    every third of it); a dead coordinator's jobs are taken over this long after it died."""
    job_steal_after_s: float = 2.0
    """On PostgreSQL: a queued job another live coordinator has not started for this long may
    be taken by an idle one (free slots, nothing queued); see docs/scale-out.md."""
    database_timeout_s: float = 5.0
    """On PostgreSQL: the longest one statement, or one new connection, may take before the
    call fails UNAVAILABLE ``STORE_UNAVAILABLE`` (a database that drops packets never
    answers; without a bound the call would hang). Also how long a session may stay idle
    inside a transaction before the server ends it (what a client cut off mid-transaction
    leaves holding locks)."""
    watch_outage_s: float = 30.0
    """On PostgreSQL: how long a watcher of a job held by another coordinator (WatchJob, a
    SYNC call whose job moved) keeps waiting for an unreachable database before its stream
    ends UNAVAILABLE; within it, the stream goes on where it stopped, nothing lost or doubled."""
    blob_url: str = ""
    """``s3://bucket/prefix``: artifact bytes live there (endpoint and credentials from the
    usual ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``). Empty: the folder ``data_dir/artifacts``."""
    public_base_url: str = ""
    """Absolute base URL for artifact links in webhooks, e.g. ``https://img.example.com``."""
    max_upload_bytes: int = 64 * 1024 * 1024
    """Most bytes one request may upload, all files together."""
    max_pixels: int = 50_000_000
    """Most pixels of an input image (checked from its header, before decoding)."""
    max_prompt_chars: int = 4000
    """Longest prompt accepted."""
    max_batch_size: int = 10
    """Largest batch_size accepted."""
    max_message_bytes: int = 4 * 1024 * 1024 + 64 * 1024
    """Largest gRPC message received (uploads are chunked well under it)."""
    chunk_bytes: int = 1024 * 1024
    """Size of the byte chunks the server streams out."""
    image_workers: int = 0
    """Threads for image work (crop, convert, variants); 0 means the number of CPUs."""
    image_block_cache_mib: int = 128
    """Decoded-image memory kept for reuse between images (Pillow's 16 MiB blocks): a fresh
    48 MB buffer per 12 MP image costs about a third of a crop in page faults; 0: none."""
    spool_memory_mb: int = 256
    """Memory (MiB, the whole process) for crop and conversion inputs held while they are
    used, instead of written to a spool file; one upload holds at most a quarter of it, the
    rest spill to disk. 0: every upload is written to a file."""
    shutdown_grace_s: float = 10.0
    """How long in-flight calls may take to finish after SIGTERM."""
    log_level: str = "INFO"
    log_json: bool = False
    """Log one JSON object per line instead of text."""
    agents: tuple[AgentSettings, ...] = field(default_factory=tuple)
    """ComfyUI agents. Env: ``AISERVER_AGENTS`` as comma-separated URLs or a JSON list."""
    agent_probe_interval_s: float = 10.0
    """How often an online ComfyUI agent is probed; offline ones back off from 1 s up to this
    (never longer: an agent that is back is noticed within it)."""
    agent_probe_timeout_s: float = 10.0
    """How long a probe waits for an agent's ``/system_stats`` before marking it offline (its
    running jobs move elsewhere, new ones go elsewhere). Shorter than the request timeout of
    uploads and downloads: a hung agent keeps its TCP open and answers nothing."""
    agent_catalogue_interval_s: float = 60.0
    """How often an online agent's node catalogue (``/object_info``: its nodes and model files)
    is read again; probes in between ask only ``/system_stats``. Read at once when an agent
    comes back, changes version, drops its websocket or lacks what a job asked for."""
    agent_outputs_over_websocket: bool = True
    """Take output images from the websocket (``SaveImageWebsocket``) on agents that have it:
    nothing is left in the agent's ``output/`` and no ``/view`` follows each job."""
    agent_reuse_input_names: bool = True
    """Upload inputs under names reused once their job has ended: the agent's ``input/`` holds
    only the jobs in flight instead of a file per job ever run."""
    local_upscale: str = "fallback"
    """The embedded CPU upscaler (Real-ESRGAN on ncnn) for ImageUpscale: ``fallback`` (when
    no ComfyUI agent can serve the request), ``always`` (never send upscales to ComfyUI), or
    ``off``."""
    local_upscale_model: str = "realesr-animevideov3-x2"
    """``realesr-animevideov3-x2`` (fast, default), ``realesrgan-x4plus`` (general photos,
    ~40x slower) or ``realesrgan-x4plus-anime``; the result is always exactly 2x."""
    local_upscale_tile: int = 192
    """Tile size in pixels: memory stays bounded, progress is reported per tile."""
    local_upscale_jobs: int = 1
    """Local upscales run at once; more wait in the queue."""
    local_upscale_threads: int = 0
    """ncnn threads per upscale; 0 means the number of CPUs."""
    workflows_dir: Path | None = None
    """A folder of workflows that add to or override the built-in ones."""
    workflows_poll_s: float = 2.0
    """How often the workflow folders are checked for changes (a changed or new binding is
    callable after at most this long, without a restart); 0 turns reloading off."""
    max_attempts: int = 3
    """Runs of one job at most when agents fail (a retry goes to another agent)."""
    queue_timeout_s: float = 600.0
    """A job waiting longer than this for a provider fails with DEADLINE_EXCEEDED."""
    run_timeout_s: float = 900.0
    """One run of a job longer than this fails with DEADLINE_EXCEEDED."""
    webhook_secret: str = field(default="", repr=False)
    """HMAC secret for ReplyTo webhooks (Standard Webhooks signature); empty: unsigned."""
    webhook_allow_hosts: tuple[str, ...] = ()
    """Hosts, IPs or CIDR ranges webhooks may reach even if private or loopback."""
    webhook_allow_private: bool = False
    """Let webhooks reach any private, loopback or link-local address (tests, closed nets)."""
    artifact_max_age_s: float = 0.0
    """Delete artifacts older than this (their variants too); 0 keeps them forever."""
    artifact_max_total_bytes: int = 0
    """Delete the oldest artifacts while the store is larger than this; 0 sets no cap."""
    retention_interval_s: float = 3600.0
    """How often retention runs (when one of the two limits above is set)."""
    variant_max_side: int = 4096
    """Largest width or height of a variant."""
    variant_presets: Mapping[str, str] = field(default_factory=dict)
    """Named variant specs, e.g. ``{"thumb": "width=256"}`` (env: a JSON object)."""
    variant_presets_only: bool = False
    """Serve only the named presets."""
    # --- security ---------------------------------------------------------------------------
    api_keys: str = field(default="", repr=False)
    """API keys as ``id:key[:admin]`` entries, comma-separated (env ``AISERVER_API_KEYS``);
    ``id:sha256=HEX[:admin]`` names a key by its SHA-256 instead. Keys are at least 16
    characters; only their hashes are kept. No keys at all (here and in ``api_keys_file``):
    open mode, every caller is an admin and owns everything."""
    api_keys_file: Path | None = None
    """A TOML (``[[keys]]`` tables) or JSON (a list, or ``{"keys": [...]}``) file of API keys:
    ``id``, ``key`` or ``sha256`` (hex digest of the key), ``admin`` (default false). Adds to
    ``api_keys``. Read at start-up."""
    allow_open: bool = False
    """Start even when bound to a non-loopback address (``grpc_host``, or ``http_host`` with
    the HTTP shim on) without any API key. Without it such a start is refused."""
    artifact_access: str = "private"
    """``private``: artifacts and variants need the owner's API key (or an admin's).
    ``signed``: their URLs (``Artifact.url``, ``VariantInfo.url``, webhooks, the HTTP shim's
    outputs) carry ``?expires=...&signature=...`` and such a URL works without a key until it
    expires; reads without a signature still need the owner's key."""
    url_signing_secrets: tuple[str, ...] = field(default=(), repr=False)
    """Secrets (at least 16 characters each, comma-separated in the environment) for signed
    URLs: the first signs, all verify, so rotate by putting a new one first and dropping the
    old one after ``signed_url_ttl_s``. Required with ``artifact_access = "signed"``."""
    signed_url_ttl_s: float = 3600.0
    """How long a signed URL stays valid (rounded up to the next minute)."""
    # --- limits -----------------------------------------------------------------------------
    max_active_jobs_per_key: int = 100
    """Unfinished (queued or running) jobs one API key may have (in open mode: all callers
    together); one more is RESOURCE_EXHAUSTED ``TOO_MANY_JOBS`` (HTTP 429). 0: no limit."""
    rate_limit_per_s: float = 0.0
    """Requests per second per API key (per client address in open mode, and for keyless
    signed-URL reads; the in-process HTTP shim counts as one address); more are
    RESOURCE_EXHAUSTED ``RATE_LIMITED`` with a retry delay (HTTP 429 + Retry-After). Health
    checks and reflection are not counted. 0: no limit."""
    rate_limit_burst: int = 0
    """Requests a caller may make at once before ``rate_limit_per_s`` applies; 0: twice the
    rate (at least 1)."""
    max_streaming_calls: int = 1000
    """Streaming calls (uploads, job streams, artifact reads, watches) served at once by the
    whole server; one more is RESOURCE_EXHAUSTED ``TOO_MANY_STREAMS``. 0: no limit."""
    upload_idle_timeout_s: float = 30.0
    """An upload (a gRPC client stream, or an HTTP request body) that sends nothing for this
    long ends: DEADLINE_EXCEEDED ``UPLOAD_STALLED`` / HTTP 408, its spooled bytes deleted.
    The HTTP shim also closes an artifact or variant download whose client takes nothing for
    this long (it would hold a streaming call and an open blob). 0: no limit."""
    stream_idle_timeout_s: float | None = None
    """A gRPC server stream whose client leaves one message untaken this long ends
    (:mod:`aiserver.api.stalls`): its handler goes and its connection is shut (UNAVAILABLE),
    unless that connection still serves other calls. None: ``upload_idle_timeout_s``;
    0: no limit."""
    stream_max_spared: int = 256
    """Stalled gRPC server streams left open (handler gone, one unsent message of up to
    ``chunk_bytes`` kept by gRPC's core) because their connection still serves other calls
    (a proxy's), counted process-wide over ten stream idle times; past it, the connection
    holding the most is shut, its other calls with it (logged at WARNING)."""
    upload_timeout_s: float = 600.0
    """Longest an upload may take from its first message (or the request's headers) to its
    last: DEADLINE_EXCEEDED ``UPLOAD_TOO_SLOW`` / HTTP 408. 0: no limit."""
    http_header_timeout_s: float = 15.0
    """An HTTP connection must send a request's whole head (request line and headers) within
    this long of opening (or of its previous response); else it is closed. 0: no limit."""
    max_uploads_per_client: int = 0
    """Uploads (request streams still being sent) one client address may have open at once,
    over gRPC and over HTTP each (the in-process HTTP shim's own calls are not counted against
    its address: it counts each HTTP client); one more is RESOURCE_EXHAUSTED
    ``TOO_MANY_UPLOADS`` (HTTP 429 + Retry-After). 0: no limit, the default: the idle and
    total upload timeouts already end stalled uploads, and one address may be a whole
    network (NAT, a proxy) or a load test. Set it on a public address, e.g. 16."""
    max_concurrent_streams: int = 0
    """``grpc.max_concurrent_streams``: streams one HTTP/2 connection may have open (more wait
    in the client, they do not fail). 0: gRPC's default."""
    # --- observability ----------------------------------------------------------------------
    http_metrics: bool = True
    """Serve Prometheus metrics at ``/metrics`` on the HTTP shim's port; when API keys are
    configured, scrapes need an admin key (``Authorization: Bearer``)."""
    metrics_port: int | None = None
    """Also serve ``/metrics`` on a listener of its own, without authentication (0 picks a
    free port); None: no such listener."""
    metrics_host: str = "127.0.0.1"
    """Address of the ``metrics_port`` listener."""

    @property
    def image_threads(self) -> int:
        return self.image_workers or os.cpu_count() or 2


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Defaults <- TOML file (``AISERVER_CONFIG``) <- environment <- ``overrides``."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path := env.get(f"{ENV_PREFIX}CONFIG"):
        with open(path, "rb") as fh:
            values.update(tomllib.load(fh))
    for f in fields(Settings):
        raw = env.get(f"{ENV_PREFIX}{f.name.upper()}")
        if raw is not None:
            values[f.name] = raw
    values.update(overrides or {})
    hints = get_type_hints(Settings)
    unknown = set(values) - set(hints)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    parsed = {name: _coerce(name, hints[name], value) for name, value in values.items()}
    settings = replace(Settings(), **parsed)
    _check_storage_urls(settings)
    return settings


def _check_storage_urls(settings: Settings) -> None:
    url = settings.database_url
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("setting database_url: expected postgresql://... (or empty: SQLite)")
    if settings.blob_url:
        parts = urlsplit(settings.blob_url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError("setting blob_url: expected s3://bucket/prefix (or empty: a folder)")
    if settings.job_steal_after_s < 0:
        raise ValueError("setting job_steal_after_s: must not be negative")
    if settings.job_lease_s < 1.0:
        raise ValueError("setting job_lease_s: at least 1 second")
    if settings.database_timeout_s <= 0:
        raise ValueError("setting database_timeout_s: must be positive")
    if settings.database_url and settings.database_timeout_s * 3 > settings.job_lease_s:
        # A renewal starts a third into the lease; one that waits out the bound must land
        # with a third left (what a run needs to queue a prompt), else a slow statement
        # alone, no outage, lets the lease lapse and another process take the job.
        raise ValueError(
            f"settings job_lease_s ({settings.job_lease_s:g} s) and database_timeout_s"
            f" ({settings.database_timeout_s:g} s): a statement may outlast what a lease has"
            " left at its renewal; job_lease_s must be at least 3x database_timeout_s"
            " (6x recommended)"
        )
    if settings.watch_outage_s < 0:
        raise ValueError("setting watch_outage_s: must not be negative")
    if settings.stream_max_spared < 0:
        raise ValueError("setting stream_max_spared: must not be negative")
    if settings.agent_probe_timeout_s <= 0:
        raise ValueError("setting agent_probe_timeout_s: must be positive")
    if settings.spool_memory_mb < 0:
        raise ValueError("setting spool_memory_mb: must not be negative")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", settings.database_schema):
        raise ValueError("setting database_schema: lower-case letters, digits and _ only")


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if name == "agents":
        return _agents(value)
    if get_origin(hint) in (Union, types.UnionType):  # ``X | None``
        if value in (None, ""):
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint in (int, float, str):
            return hint(value)
        if hint is Path:
            return Path(value)
        if hint == tuple[str, ...]:
            items = value.split(",") if isinstance(value, str) else value
            return tuple(str(v).strip() for v in items if str(v).strip())
        if get_origin(hint) is Mapping:
            data = json.loads(value) if isinstance(value, str) else value
            if not isinstance(data, Mapping):
                raise ValueError(value)
            return {str(k): str(v) for k, v in data.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {name}: cannot read {value!r} as {hint}") from exc
    raise TypeError(f"setting {name}: unsupported type {hint}")


def _agents(value: Any) -> tuple[AgentSettings, ...]:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        value = json.loads(text) if text.startswith("[") else text.split(",")
    agents: list[AgentSettings] = []
    for item in value:
        if isinstance(item, AgentSettings):
            agents.append(item)
        elif isinstance(item, str):
            agents.append(AgentSettings(url=item.strip()))
        elif isinstance(item, Mapping):
            agents.append(AgentSettings(**item))
        else:
            raise ValueError(f"setting agents: cannot read {item!r}")
    return tuple(agents)

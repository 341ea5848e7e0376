"""Configuration: the spec's YAML keys and defaults, validated once at start-up.

`load_config` is the only way in. Every problem — a missing file, a YAML syntax error, an
unknown key, a wrong type or an out-of-range value — becomes one `ConfigError` whose message
names the file position or the key's dotted path; `main` prints it on one line and exits 2.

Environment variables override keys: `TIDE_VLLM__<SECTION>__<KEY>=value`, e.g.
`TIDE_VLLM__VLLM__PORT=8001` sets `vllm.port`. The value is read as a YAML scalar, so
`true`, `0.5` and `[a, b]` mean what they would in the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tide_vllm.infrastructure.vllm.kv_events import read_endpoints

ENV_PREFIX = "TIDE_VLLM__"
DEFAULT_ENGINE = "default"  # the name of the one engine of a configuration without `engines:`
API_KEYS_ENV = "TIDE_VLLM_API_KEYS"
DEFAULT_SYSTEM_PROMPT = "你是一个有用的AI助手。"


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line meant for the operator."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `max_tokenz` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BindAddress(_Section):
    """Where tide-vllm listens."""

    host: str = Field("0.0.0.0", description='Interface to listen on; "0.0.0.0" = all of IPv4.')
    port: int = Field(10002, ge=1, le=65535, description="tide-vllm's port.")


class WebConfig(_Section):
    bind_address: BindAddress = BindAddress()
    shutdown_grace: float = Field(
        30, ge=0, description="On SIGTERM/SIGINT, how long in-flight requests may finish."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    max_concurrent_requests: int = Field(
        1024, ge=1, description="Chat requests in flight; above it, 429 at once."
    )
    workers: int = Field(
        1, ge=1, le=64, description="Web worker processes; vLLM is still started only once."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description='Origins allowed by CORS; [] = off, ["*"] = any.'
    )
    header_timeout: float = Field(
        30,
        gt=0,
        description="A client that has not sent a request's whole head by then is "
        "disconnected (heads over 64 KiB are refused with 431).",
    )
    body_timeout: float = Field(
        30, gt=0, description="A request body not complete by then is answered 408."
    )
    console: bool = Field(
        True,
        description="The web console at / (a chat playground and the engines' status); "
        "false: / is relayed to vLLM like any other path.",
    )


class VLLMConfig(_Section):
    """The spec's `vllm:` section, plus the supervisor's own knobs (documented in the README)."""

    enabled: bool = Field(True, description="false: no vLLM; every chat request gets 503.")
    auto_start: bool = Field(
        True,
        description="true: tide-vllm starts and supervises vLLM; "
        "false: it connects to a vLLM server already running at host:port.",
    )
    host: str = Field("0.0.0.0", description="vLLM's address: to listen on, or to reach.")
    port: int = Field(8000, ge=1, le=65535, description="vLLM's port.")
    model_name: str = Field(
        "Qwen2.5-7B-Instruct",
        min_length=1,
        description="The model's name in requests (vLLM's --served-model-name).",
    )
    model_path: str = Field(
        "Qwen/Qwen2.5-7B-Instruct",
        min_length=1,
        description="The model vLLM loads: a local folder or a Hugging Face id (org/name).",
    )

    # Generation defaults for requests that do not set them.
    max_tokens: int = Field(2048, ge=1, description="Default for requests that do not set it.")
    temperature: float = Field(
        0.7, ge=0.0, le=2.0, allow_inf_nan=False, description="Default sampling temperature."
    )
    top_p: float = Field(
        0.9, gt=0.0, le=1.0, allow_inf_nan=False, description="Default nucleus sampling top_p."
    )
    timeout: float = Field(
        60, gt=0, allow_inf_nan=False, description="Seconds a request may take in vLLM; then 504."
    )

    # vLLM start-up flags (auto_start only); each maps to the vLLM flag of the same name.
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may use."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is split across.")
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="Stages the model's layers are split into, each on tensor_parallel_size GPUs "
        "(stages may be on other nodes, with Ray); passed to vLLM when above 1.",
    )
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="Copies of the model this one vLLM runs behind its API server, each on "
        "tensor_parallel_size x pipeline_parallel_size GPUs; passed to vLLM when above 1.",
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="How vLLM runs its GPU workers: mp, processes on this machine; ray, on the "
        "nodes of a Ray cluster already running (docs/scale-out.md); null = vLLM chooses "
        "(mp when the GPUs are on this machine).",
    )
    max_num_seqs: int = Field(256, ge=1, description="Sequences vLLM runs at once.")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Tokens vLLM batches per step.")
    max_model_len: int = Field(
        4096, ge=1, description="Context length in tokens, prompt and completion."
    )
    dtype: str = Field(
        "auto", min_length=1, description="Weight type: auto, float16, bfloat16 or float32."
    )
    startup_timeout: float = Field(
        600, gt=0, description="Seconds vLLM may take to serve the model before it is stopped."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of prompts' shared beginnings."
    )
    enable_chunked_prefill: bool = Field(
        True, description="Prefill long prompts in chunks batched with decoding."
    )

    # Beyond the spec.
    command: list[str] | None = Field(
        None,
        description="Launch command before the flags; null = this Python's "
        "`-m vllm.entrypoints.launchers.api_server.entry` (what `vllm serve` runs for one API "
        "server; works with both the CUDA and the CPU wheel).",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More vLLM flags, as they are: [--enforce-eager]."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for vLLM only. An entry of `engines:` that sets "
        "`env` adds its variables to these (merged, the entry's value winning on a name both "
        "set), so vllm.env can hold what every engine needs (VLLM_CPU_KVCACHE_SPACE, "
        "HF_HUB_OFFLINE).",
    )
    stop_timeout: float = Field(15, gt=0, description="Grace after SIGTERM before SIGKILL.")
    health_interval: float = Field(
        5, gt=0, description="Seconds between health checks of a running vLLM."
    )
    health_failures_before_restart: int = Field(
        3, ge=1, description="Consecutive failed health polls of a running vLLM that restart it."
    )
    max_restarts: int = Field(
        5, ge=0, description="Restarts in a row (without a stable minute between) before failed."
    )
    restart_backoff: float = Field(1, gt=0, description="First delay before a restart; doubles.")
    restart_backoff_max: float = Field(60, gt=0, description="Longest delay before a restart.")
    pid_file: str | None = Field(
        None,
        description="Records vLLM's process group, to reclaim one left by an earlier run; "
        "null = ~/.cache/tide-vllm/run/vllm-<port>.pid.",
    )
    api_key: str | None = Field(None, description="Bearer key sent to vLLM (manual mode).")
    kv_events_endpoint: str | None = Field(
        None,
        description="With routing.kv_events: the ZeroMQ endpoint this vLLM publishes its "
        "KV-cache events on. Auto-started: passed to vLLM, which binds tcp://*:PORT (every "
        "interface) or ipc://PATH, null = a socket file of its own (ipc://, under the pid "
        "file's folder). "
        "External: where it publishes (tcp://HOST:PORT; * stands for host), null = none, "
        "and routing follows what the engine was sent.",
    )
    _kv_events: bool = PrivateAttr(False)  # routing.kv_events, set by Config

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, value: str | None) -> str | None:
        # It travels in a header line: a line break would end it there.
        if value is not None and not value.isprintable():
            raise ValueError("must be printable text, without line breaks")
        return value

    @field_validator("model_path")
    @classmethod
    def _expand_user(cls, value: str) -> str:
        # A local folder may be written as ~/...; a Hugging Face id never starts with "~".
        return os.path.expanduser(value)

    @property
    def config_key(self) -> str:
        """Where these settings are in the configuration, for messages naming a key."""
        return "vllm"

    @property
    def pid_path(self) -> Path:
        if self.pid_file:
            return Path(os.path.expanduser(self.pid_file))
        return Path.home() / ".cache" / "tide-vllm" / "run" / f"vllm-{self.port}.pid"

    @field_validator("kv_events_endpoint")
    @classmethod
    def _a_zmq_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parse_kv_endpoint(value)
        return value

    @property
    def kv_events_publish(self) -> str | None:
        """The endpoint vLLM publishes its KV-cache events on (its --kv-events-config), or
        None when routing does not follow them."""
        if not self._kv_events or not self.enabled:
            return None
        if self.kv_events_endpoint is not None:
            return self.kv_events_endpoint
        if not self.auto_start:
            return None
        return f"ipc://{self.pid_path.parent / f'kv-events-{self.port}.sock'}"

    def kv_events_subscribe(self, host: str | None = None) -> tuple[str, ...]:
        """Where the gateway reads the events: the endpoint, `*` (a wildcard bind) read as the
        engine's host (`host`, or connect_host), one port a rank with data parallelism (vLLM
        offsets the port by the rank)."""
        endpoint = self.kv_events_publish
        if endpoint is None:
            return ()
        return read_endpoints(endpoint, host or self.connect_host, self.data_parallel_size)

    @property
    def connect_host(self) -> str:
        """Where to reach vLLM: a wildcard bind address is reached on loopback."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def base_url(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"http://{host}:{self.port}"


_ENGINE_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_WILDCARDS = ("0.0.0.0", "", "::")
_DNS_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
DISCOVER_EXAMPLE = "dns://vllm-headless.default.svc.cluster.local:8000"


def parse_discover(url: str) -> tuple[str, int]:
    """`dns://NAME:PORT` as (NAME, PORT); ValueError saying what is wrong with it."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:  # a port that is no number, a bracket not closed
        raise ValueError(f"must be dns://NAME:PORT, as {DISCOVER_EXAMPLE} ({exc})") from None
    host = parts.hostname or ""
    problem = ""
    if parts.scheme != "dns":
        problem = "the scheme must be dns://"
    elif not host:
        problem = "no NAME"
    elif port is None:
        problem = "no PORT"
    elif not 1 <= port <= 65535:
        problem = "PORT must be from 1 to 65535"
    elif (
        parts.username
        or parts.password
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        problem = "nothing but NAME:PORT"
    elif not _is_host(host):
        problem = f"{host!r} is neither a DNS name nor an IP address"
    if problem or port is None:
        raise ValueError(f"must be dns://NAME:PORT, as {DISCOVER_EXAMPLE} ({problem})")
    return host, port


KV_ENDPOINT_EXAMPLE = "tcp://*:5557"
# The tcp hosts vLLM's publisher binds rather than connects to: every interface. (It binds an
# endpoint holding * or ::, and ipc:// ones; it connects to any other.)
BIND_ALL = ("*", "::")
IPC_PATH_MAX = 100  # a Unix socket's path has 108 bytes, ZeroMQ's ipc:// a few less


def parse_kv_endpoint(endpoint: str) -> tuple[str, str, int]:
    """A ZeroMQ endpoint as (scheme, address, port): tcp://HOST:PORT (HOST may be *) or
    ipc://PATH (address the path, port 0); ValueError saying what is wrong with it."""
    if endpoint.startswith("ipc://"):
        path = endpoint.removeprefix("ipc://")
        if not path:
            raise ValueError("ipc:// needs a path, as ipc:///run/tide-vllm/kv-events.sock")
        if len(path.encode()) > IPC_PATH_MAX:
            raise ValueError(f"the path is longer than {IPC_PATH_MAX} bytes (a socket's limit)")
        return "ipc", path, 0
    address, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not address or not port.isdigit():
        raise ValueError(f"must be tcp://HOST:PORT or ipc://PATH, as {KV_ENDPOINT_EXAMPLE}")
    if not 1 <= int(port) <= 65535:
        raise ValueError("PORT must be from 1 to 65535")
    return "tcp", address.strip("[]"), int(port)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)


class EngineConfig(VLLMConfig):
    """One engine of the fleet: every key of `vllm:`, whose values are its defaults, and a
    name. Without `engines:`, the fleet is the `vllm:` section alone, named `default`."""

    name: str = Field(
        description="The engine's name: 1 to 32 of a-z, 0-9, - and _; unique in the fleet. "
        "Its log lines come from the loggers vllm.<name> and tide_vllm.supervisor.<name>."
    )
    discover: str | None = Field(
        None,
        description="dns://NAME:PORT: the entry is one engine per address NAME resolves to "
        f"(A and AAAA; e.g. a Kubernetes headless Service, {DISCOVER_EXAMPLE}), looked up "
        "again every 10 s, each named <name>-<address> and set up by the entry's other keys "
        "(host and port aside). Needs auto_start: false.",
    )
    _key: str = PrivateAttr("vllm")

    @field_validator("name")
    @classmethod
    def _a_plain_name(cls, value: str) -> str:
        if not _ENGINE_NAME.fullmatch(value):
            raise ValueError("must be 1 to 32 of a-z, 0-9, - and _")
        return value

    @field_validator("discover")
    @classmethod
    def _a_dns_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_discover(value)
        return value

    @property
    def discovered_at(self) -> tuple[str, int] | None:
        """The name to look up and the port of its engines, for an entry that discovers them
        (and is enabled: a disabled entry is one disabled engine, as any other)."""
        if self.discover is None or not self.enabled:
            return None
        return parse_discover(self.discover)

    @property
    def config_key(self) -> str:
        return self._key


class RoutingConfig(_Section):
    """How a request chooses among the engines that serve its model."""

    policy: Literal["prefix", "least_load", "round_robin"] = Field(
        "prefix",
        description="prefix: prefix-cache affinity together with load; least_load: the "
        "engine with the fewest requests in flight; round_robin: each in turn.",
    )
    kv_events: bool = Field(
        False,
        description="prefix only: follow what each engine really caches, from vLLM's KV-cache "
        "events (auto-started engines publish them; an external one where its "
        "kv_events_endpoint says), matched against each request's token ids, asked of an "
        "engine (POST /tokenize) before it is routed. false: routing follows what each "
        "engine was sent.",
    )


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Of tide-vllm's log and of vLLM's lines (each at vLLM's own level)."
    )
    format: Literal["text", "json"] = Field(
        "text", description="text: human-readable lines; json: one JSON object per line."
    )
    log_prompts: bool = Field(False, description="Log prompts and completions (off: privacy).")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class AuthConfig(_Section):
    """API keys clients must send as `Authorization: Bearer <key>`; none = open."""

    api_keys: list[str] = Field(
        default_factory=list,
        description="[] = no key needed; TIDE_VLLM_API_KEYS=key1,key2 adds keys.",
    )

    @field_validator("api_keys")
    @classmethod
    def _not_blank(cls, keys: list[str]) -> list[str]:
        if any(not key.strip() for key in keys):
            raise ValueError("an API key must not be empty")
        return keys


class ChatConfig(_Section):
    system_prompt: str = Field(
        DEFAULT_SYSTEM_PROMPT, description="System prompt of Tide requests that set none."
    )


class Config(_Section):
    web: WebConfig = Field(WebConfig(), description="Web service: tide-vllm's own HTTP API.")
    vllm: VLLMConfig = Field(
        VLLMConfig(), description="vLLM: the server tide-vllm starts, or connects to."
    )
    engines: list[EngineConfig] | None = Field(
        None,
        min_length=1,
        description="Several engines (null: the one engine is `vllm:`, named default). Each "
        "entry takes every key of `vllm:`, whose values are its defaults, plus `name`; an "
        "entry's `env` is merged with vllm.env. Auto-started engines need ports of their own. "
        f"{ENV_PREFIX}VLLM__<KEY> sets a default of every entry; "
        f"{ENV_PREFIX}ENGINES__<index>__<KEY> sets a key of one entry (the first is 0).",
    )
    routing: RoutingConfig = Field(
        RoutingConfig(), description="How requests are routed among the engines of a model."
    )
    log: LogConfig = Field(LogConfig(), description="Logging, to standard error.")
    chat: ChatConfig = Field(ChatConfig(), description="Chat defaults.")
    auth: AuthConfig = Field(
        AuthConfig(), description="API keys clients send as `Authorization: Bearer <key>`."
    )

    @model_validator(mode="before")
    @classmethod
    def _entries_inherit_vllm(cls, data: Any) -> Any:
        """Each entry of `engines:` is the `vllm:` section overlaid with the entry's keys, its
        `env` merged with vllm.env. An invalid `vllm:` section is reported once, as vllm.<key>,
        and not again for every entry that would inherit it."""
        if not isinstance(data, dict) or not isinstance(data.get("engines"), list):
            return data
        base = data.get("vllm") or {}
        if isinstance(base, VLLMConfig):
            base = base.model_dump(exclude_unset=True)
        if not isinstance(base, dict):
            return data
        try:
            VLLMConfig.model_validate(base)
        except ValidationError:
            return data
        entries = []
        for entry in data["engines"]:
            if isinstance(entry, dict):
                merged = {**base, **entry}
                if isinstance(base.get("env"), dict) and isinstance(entry.get("env"), dict):
                    merged["env"] = {**base["env"], **entry["env"]}
                entry = merged
            entries.append(entry)
        return {**data, "engines": entries}

    @model_validator(mode="after")
    def _engines_apart(self) -> Config:
        """Unique names; an entry that discovers its engines does not start them; no two
        auto-started engines, nor one and tide-vllm itself, on one port, and no two of them
        with one pid file."""
        for index, engine in enumerate(self.engines or []):
            engine._key = f"engines[{index}]"
        fleet = self.fleet()
        if self.routing.kv_events and self.routing.policy != "prefix":
            raise _fleet_error(
                "routing.kv_events",
                f"follows the engines' caches for the prefix policy only (policy is "
                f"{self.routing.policy}); set routing.policy: prefix or kv_events: false",
            )
        seen: dict[str, EngineConfig] = {}
        for engine in fleet:
            other = seen.setdefault(engine.name, engine)
            if other is not engine:
                raise _fleet_error(
                    f"{engine.config_key}.name",
                    f"{engine.name!r} is also the name of {other.config_key}; each engine "
                    "needs a name of its own",
                )
            if engine.discover is not None and engine.auto_start:
                raise _fleet_error(
                    f"{engine.config_key}.discover",
                    "tide-vllm starts no engine at an address it finds; set auto_start: false "
                    "on this entry (it takes vllm.auto_start, true by default, unless it says "
                    "otherwise)",
                )
        if self.engines is not None and all(e.model_name != self.vllm.model_name for e in fleet):
            served = ", ".join(sorted({e.model_name for e in fleet}))
            raise _fleet_error(
                "vllm.model_name",
                f"{self.vllm.model_name!r} is served by no engine (they serve {served}); "
                "requests that name no model, Tide requests among them, go to it",
            )
        started = [e for e in fleet if e.enabled and e.auto_start]
        web = self.web.bind_address
        for i, engine in enumerate(started):
            publish = engine.kv_events_publish
            if publish is not None:
                key = f"{engine.config_key}.kv_events_endpoint"
                if engine.kv_events_endpoint is None:
                    try:
                        parse_kv_endpoint(publish)
                    except ValueError:
                        raise _fleet_error(
                            key,
                            f"the socket file of its KV-cache events, {publish}, has a path "
                            f"longer than {IPC_PATH_MAX} bytes; set one (ipc://PATH or "
                            "tcp://*:PORT)",
                        ) from None
                scheme, address, _ = parse_kv_endpoint(publish)
                if scheme == "tcp" and address not in BIND_ALL:
                    raise _fleet_error(
                        key,
                        f"vLLM publishes on an endpoint it binds: tcp://*:PORT (every "
                        f"interface) or ipc://PATH; given {publish}, it would connect to a "
                        "subscriber instead, and tide-vllm would read nothing",
                    )
                if engine.data_parallel_size > 1 and publish.startswith("ipc://"):
                    raise _fleet_error(
                        key,
                        f"with data_parallel_size {engine.data_parallel_size}, vLLM publishes "
                        "the KV-cache events of each rank on a port of its own, counted from "
                        f"this one; set a tcp endpoint, as {KV_ENDPOINT_EXAMPLE}",
                    )
                for other in started[:i]:
                    if other.kv_events_publish == publish:
                        raise _fleet_error(
                            key,
                            f"{publish} is where {other.name!r} ({other.config_key}) publishes "
                            "its KV-cache events too; give each engine its own",
                        )
            if engine.port == web.port and _same_address(engine.host, web.host):
                raise _fleet_error(
                    f"{engine.config_key}.port",
                    f"{engine.port} is web.bind_address.port too; vLLM needs a port of its own",
                )
            for other in started[:i]:
                if engine.port == other.port and _same_address(engine.host, other.host):
                    raise _fleet_error(
                        f"{engine.config_key}.port",
                        f"engines {other.name!r} ({other.config_key}) and {engine.name!r} "
                        f"would both listen on {engine.host}:{engine.port}; give each "
                        "auto-started engine a port of its own (an entry without `port` "
                        "takes vllm.port)",
                    )
                if engine.pid_path == other.pid_path:
                    raise _fleet_error(
                        f"{engine.config_key}.pid_file",
                        f"{str(engine.pid_path)!r} is the pid file of {other.config_key} "
                        f"({other.name!r}) too; give each engine its own, or leave pid_file "
                        "null (a file per port)",
                    )
        return self

    def workers_routing_caveat(self) -> str | None:
        """What a start-up warning says when several web workers route a fleet by prefix on
        what each has sent alone (None when nothing is to be said)."""
        routed = self.engines is not None and (
            len(self.engines) > 1 or any(e.discover for e in self.engines)
        )
        if not routed or self.web.workers < 2 or self.routing.policy != "prefix":
            return None
        if self.routing.kv_events:
            return None
        return (
            f"web.workers is {self.web.workers}: each worker routes on what it has sent itself, "
            "so the turns of a conversation that reach different workers may go to different "
            "engines (and miss their cached prefix); routing.kv_events: true lets every worker "
            "see what each engine caches"
        )

    def fleet(self) -> list[EngineConfig]:
        """The effective settings of every engine: the entries of `engines:`, or the `vllm:`
        section alone, named `default`."""
        if self.engines is not None:
            fleet = list(self.engines)
        else:
            fleet = [EngineConfig(name=DEFAULT_ENGINE, **self.vllm.model_dump())]
        for engine in fleet:  # a fleet of one has nothing to route: its vLLM publishes none
            engine._kv_events = self.routing.kv_events and self.engines is not None
        return fleet


def _same_address(a: str, b: str) -> bool:
    """Whether servers bound to `a` and to `b` would compete for a port."""
    return a == b or a in _WILDCARDS or b in _WILDCARDS


def _fleet_error(path: str, message: str) -> PydanticCustomError:
    # Reported by _describe as "<path>: <message>", like an error of the key itself.
    return PydanticCustomError("fleet", "{message}", {"path": path, "message": message})


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate; raises ConfigError."""
    environ = os.environ if environ is None else environ
    raw = _read_yaml(Path(path))
    _apply_env(raw, environ)
    if environ.get(API_KEYS_ENV):  # TIDE_VLLM_API_KEYS=key1,key2 adds to auth.api_keys
        auth = raw.setdefault("auth", {})
        if isinstance(auth, dict):
            listed = auth.get("api_keys") or []
            extra = [k.strip() for k in environ[API_KEYS_ENV].split(",") if k.strip()]
            auth["api_keys"] = [*listed, *extra] if isinstance(listed, list) else listed
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration file is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (web, vllm, …)")
    return data


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not keys:
            continue
        node: Any = raw  # a mapping, or a list of the file's: ENGINES__1__PORT
        for depth, key in enumerate(keys):
            if isinstance(node, list):
                index = int(key) if key.isdigit() else -1
                if not 0 <= index < len(node):
                    raise ConfigError(
                        f"{name}: {'.'.join(keys[:depth])} has no entry {key} (it has "
                        f"{len(node)}, numbered from 0); an override changes an entry, it "
                        "does not add one"
                    )
                where: Any = index
            else:
                where = key
            if depth == len(keys) - 1:
                try:
                    node[where] = yaml.safe_load(value) if value else value
                except yaml.YAMLError:
                    raise ConfigError(f"{name}: not a valid YAML scalar: {value!r}") from None
                break
            child = node[where] if isinstance(node, list) else node.get(where)
            into_list = isinstance(child, list) and keys[depth + 1].isdigit()
            if not isinstance(child, dict) and not into_list:
                child = node[where] = {}
            node = child


def _describe(exc: ValidationError, path: str | Path) -> str:
    """One line naming each bad key by its dotted path."""
    parts = []
    for error in exc.errors():
        if error["type"] == "fleet":
            parts.append(f"{error['ctx']['path']}: {error['msg']}")
            continue
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        key = key.lstrip(".") or "(top level)"
        if error["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
            continue
        got = error.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        parts.append(f"{key}: {error['msg']}{shown}")
    return f"{path}: " + "; ".join(parts)


# huggingface_hub's rule for a repository id: `name` or `org/name`, letters, digits and -_.
_HF_REPO_ID = re.compile(r"[\w.-]{1,96}(?:/[\w.-]{1,96})?")


def is_local_model_path(path: str) -> bool:
    """True if `vllm.model_path` can only mean a file or folder on this machine: it starts
    with /, ./, ../ or ~, or it cannot be a Hugging Face id (`org/name`: one slash at most,
    letters, digits, `-_.`, no `..` or `--`). `org/name` may be either; vLLM decides."""
    if path.startswith(("/", "./", "../", "~")) or path in (".", ".."):
        return True
    return not _HF_REPO_ID.fullmatch(path) or ".." in path or "--" in path


def check_model_path(config: VLLMConfig, source: str | Path) -> None:
    """Before vLLM is launched (auto-start mode): a local model path that does not exist is a
    configuration error. vLLM would take it for a Hugging Face id after half a minute of
    start-up and fail with a misleading HFValidationError."""
    path, key = config.model_path, config.config_key
    if not is_local_model_path(path) or Path(path).exists():
        return
    raise ConfigError(
        f"{source}: {key}.model_path: {path!r} does not exist (a local path, not a Hugging Face "
        "id such as Qwen/Qwen2.5-7B-Instruct); give the model's folder (`make model` prepares "
        f"the demo model's), or set {key}.auto_start: false to use a vLLM server already running"
    )


def annotated_defaults() -> str:
    """Every key with its default and, above it, a comment from its description: a YAML
    configuration file to start from (`tide-vllm --print-config > tide-vllm.yaml`)."""
    lines = [
        "# tide-vllm configuration: every key, with its default. Every key is optional.",
        f"# Environment variables override keys: {ENV_PREFIX}<SECTION>__<KEY>=value,",
        f"# e.g. {ENV_PREFIX}VLLM__PORT=8001.",
    ]
    _annotate(Config(), 0, lines)
    return "\n".join(lines) + "\n"


ENGINES_EXAMPLE = """\
For example, two engines started on two GPUs and one already running elsewhere:
  - name: gpu0
    port: 8001
    env: {CUDA_VISIBLE_DEVICES: "0"}
  - name: gpu1
    port: 8002
    env: {CUDA_VISIBLE_DEVICES: "1"}
  - name: remote
    auto_start: false
    host: 10.0.0.5
    port: 8000
    model_name: Qwen2.5-72B-Instruct
and, for one engine per pod behind a Kubernetes headless Service:
  - name: pool
    auto_start: false
    discover: dns://vllm-headless.default.svc.cluster.local:8000"""


def _annotate(section: BaseModel, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        about = field.description or (
            (type(value).__doc__ or "").strip() if isinstance(value, BaseModel) else ""
        )
        if depth == 0:
            lines.append("")
        width = 98 - len(indent)
        lines.extend(f"{indent}# {line}" for line in textwrap.wrap(about, width))
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            _annotate(value, depth + 1, lines)
        elif name == "engines" and value is None:  # a list of sections: an example, commented
            lines.extend(f"{indent}# {line}".rstrip() for line in ENGINES_EXAMPLE.splitlines())
            lines.append(f"{indent}{name}:")
        else:
            lines.append(f"{indent}{name}: {_yaml_value(value)}")


def _yaml_value(value: Any) -> str:
    # A one-item flow list gives the value as YAML writes it inline, quoted where needed.
    text: str = yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=1 << 16)
    return text.strip()[1:-1]

"""Server settings: defaults < config file < environment (`NUMBALM_*`) < command line."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.backends import BACKENDS, DEFAULT_BACKEND

ENV_PREFIX = "NUMBALM_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    models: list[str] = field(default_factory=list)       # "REF" or "NAME=REF" (REF: id or path)
    aliases: dict[str, str] = field(default_factory=dict)  # request name -> served model name
    backend: str = DEFAULT_BACKEND                         # engine backend: fast | reference
    threads: int = 0                     # waitress worker threads; 0: max_concurrent + queue + 4
    compute_threads: int = 0             # threads of a forward pass; 0: every core Numba has
    max_concurrent: int = 8              # requests generating at once, batched together
    kv_cache_mb: float = 1024.0          # KV cache per model, shared by its generations
    step_tokens: int = 128               # prompt tokens one batched step may prefill
    queue_size: int = 8                  # requests waiting for a slot; beyond it: 429
    queue_timeout: float = 30.0          # seconds a request may wait for a slot; then 503
    request_timeout: float = 600.0       # seconds one generation may run; then it is cancelled
    max_body_size: int = 4 * 1024 * 1024  # bytes; larger bodies: 413
    max_tokens_cap: int = 4096           # largest max_tokens accepted (and the default)
    max_n: int = 8                       # largest n accepted
    embeddings_max_batch: int = 256      # inputs per /v1/embeddings request
    embeddings_cache_bytes: int = 64 * 1024 * 1024  # LRU of recent embeddings; 0 turns it off
    responses_store: str = ""            # SQLite file of stored responses; "": in the cache dir
    responses_max_age_days: float = 30.0  # stored responses older than this are deleted
    responses_max_mb: float = 256.0      # beyond this the oldest stored responses go
    api_keys: list[str] = field(default_factory=list)      # empty: no authentication
    cors_origins: list[str] = field(default_factory=list)  # "*" or exact origins
    metrics_auth: bool = False           # /metrics needs an API key too (when keys are set)
    rate_limit_rpm: int = 0              # requests per minute per API key (no keys: per address)
    rate_limit_tpm: int = 0              # tokens per minute per API key (no keys: per address)
    rate_limit_ip_rpm: int = 0           # requests per minute per client address
    rate_limit_ip_tpm: int = 0           # tokens per minute per client address
    log_level: str = "info"
    log_format: str = "text"             # text | json
    shutdown_grace: float = 30.0         # seconds in-flight work may finish after SIGTERM
    warmup: bool = True                  # run one token per model before /readyz says ready
    chat_template: str = ""              # a Jinja file or built-in name for every served model

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        positive = ("max_concurrent", "max_body_size", "max_tokens_cap", "max_n",
                    "embeddings_max_batch", "kv_cache_mb", "step_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("queue_size", "threads", "compute_threads", "port",
                     "embeddings_cache_bytes", "rate_limit_rpm", "rate_limit_tpm",
                     "rate_limit_ip_rpm", "rate_limit_ip_tpm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("queue_timeout", "request_timeout", "shutdown_grace",
                     "responses_max_age_days", "responses_max_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, "
                              f"got {self.backend!r}")

    @property
    def worker_threads(self) -> int:
        return self.threads or self.max_concurrent + self.queue_size + 4


FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _convert(name: str, value, kind: str):
    """One setting from a string (env) or a parsed file value, to the field's type."""
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind in ("int", "float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value) if kind == "int" else float(value)
        if kind.startswith("list"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if kind.startswith("dict"):
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError(value)
                return {k.strip(): v.strip() for k, v in pairs}
            return {str(k): str(v) for k, v in dict(value).items()}
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value for {name}: {value!r}") from None


def read_config_file(path: str | os.PathLike) -> dict:
    """Settings from a TOML (Python ≥ 3.11) or JSON file; keys are field names."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except ImportError:
        raise ConfigError("TOML config files need Python 3.11+; use a .json file") from None
    except ValueError as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def env_settings(environ) -> dict:
    """`NUMBALM_PORT=9000` -> {"port": "9000"}; unknown NUMBALM_ variables are ignored."""
    out = {}
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = environ[key]
    return out


def build_config(cli: dict | None = None, environ=None, config_file=None) -> ServerConfig:
    """Merge the sources; later ones win. `None` values in `cli` mean "not given"."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    merged: dict = {}
    if config_file:
        merged.update(read_config_file(config_file))
    merged.update(env_settings(environ))
    merged.update({k: v for k, v in (cli or {}).items() if v is not None})
    unknown = sorted(set(merged) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values = {k: _convert(k, v, str(FIELDS[k].type)) for k, v in merged.items()}
    return ServerConfig(**values)

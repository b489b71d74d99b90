"""The YAML configuration: schema, validation and loading.

Every error names the file, the key path and what was expected; nothing starts on an invalid
configuration. API keys are stored as SHA-256 hashes, never in clear.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class ConfigError(ValueError):
    """An invalid configuration file; the message names file, key path and expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    address: str = "127.0.0.1:50051"
    max_text_chars: int = Field(2000, gt=0, le=1_000_000)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_batch: int = Field(512, gt=0)
    max_concurrent_rpcs: int | None = Field(None, gt=0)
    grace_seconds: float = Field(5.0, ge=0)
    model_dir: Path = Path("models")
    top_k: int = Field(3, ge=1, le=50)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:50051 (port 0 picks a free one)")
        return value


class ApiKeyConfig(_Strict):
    name: Name
    sha256: str = Field(description="hex SHA-256 of the key")
    admin: bool = False
    apps: list[Name] | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("expected 64 lowercase hex digits (sha256 of the key)")
        return value


class AppConfig(_Strict):
    description: str = ""
    routes: list[Name] | None = None


class RouteConfig(_Strict):
    name: Name
    description: str = ""
    target: Name
    examples: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)


class ModelConfig(_Strict):
    family: Literal["fast", "accurate"] = "fast"
    version: str = "active"
    threshold: float | Literal["calibrated"] = "calibrated"
    fallback_route: Name
    swap_margin: float = Field(0.02, ge=0, le=1)
    seed: int = 0
    buckets_log2: int = Field(18, ge=8, le=24)
    heldout_fraction: float = Field(0.2, gt=0, lt=0.9)
    regularization: float = Field(10.0, gt=0)
    inscope_tolerance: float = Field(0.03, ge=0, le=1)
    data: Path | None = None

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError("expected a number in [0, 1] or 'calibrated'")
        return value


class TenantConfig(_Strict):
    api_keys: list[ApiKeyConfig] = Field(min_length=1)
    apps: dict[Name, AppConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=2)
    model: ModelConfig

    @model_validator(mode="after")
    def _references(self) -> TenantConfig:
        names = [r.name for r in self.routes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"routes: duplicate route names {duplicates}")
        known = set(names)
        if self.model.fallback_route not in known:
            raise ValueError(
                f"model.fallback_route: {self.model.fallback_route!r} is not one of the routes "
                f"{sorted(known)}"
            )
        for app_name, app in self.apps.items():
            unknown = sorted(set(app.routes or ()) - known)
            if unknown:
                raise ValueError(f"apps.{app_name}.routes: unknown routes {unknown}")
        for i, key in enumerate(self.api_keys):
            unknown = sorted(set(key.apps or ()) - set(self.apps))
            if unknown:
                raise ValueError(f"api_keys.{i}.apps: unknown apps {unknown}")
        return self

    def route(self, name: str) -> RouteConfig:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


class PlexusConfig(_Strict):
    server: ServerConfig = ServerConfig()
    tenants: dict[Name, TenantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_keys(self) -> PlexusConfig:
        seen: dict[str, str] = {}
        for tenant_name, tenant in self.tenants.items():
            for key in tenant.api_keys:
                if key.sha256 in seen:
                    raise ValueError(
                        f"tenants.{tenant_name}.api_keys: the key {key.name!r} is also a key of "
                        f"tenant {seen[key.sha256]!r}; every key belongs to one tenant"
                    )
                seen[key.sha256] = tenant_name
        return self


class LoadedConfig:
    """A validated configuration plus where it came from (relative paths resolve against it)."""

    def __init__(self, config: PlexusConfig, path: Path):
        self.config = config
        self.path = path
        self.base_dir = path.parent

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def model_dir(self) -> Path:
        return self.resolve(self.config.server.model_dir)

    def tenant(self, name: str) -> TenantConfig:
        try:
            return self.config.tenants[name]
        except KeyError:
            raise ConfigError(
                f"{self.path}: tenants: no tenant {name!r} (have {sorted(self.config.tenants)})"
            ) from None


def hash_api_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _format_error(path: Path, error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = error.get("input")
    shown = (
        "" if isinstance(given, dict | list) or error["type"] == "missing" else f" (got {given!r})"
    )
    return f"{path}: {location}: {message}{shown}"


def parse_config(data: Any, path: Path) -> LoadedConfig:
    """Validate already-parsed YAML; ``path`` is used in messages and to resolve paths."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping, got {type(data).__name__}")
    try:
        config = PlexusConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(path, err) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    return LoadedConfig(config, path.resolve())


def load_config(path: str | Path) -> LoadedConfig:
    """Read, parse and validate a YAML configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, path)

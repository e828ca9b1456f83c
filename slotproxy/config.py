"""TOML configuration into frozen dataclasses, validated whole at load.

Each section is a dataclass; each of its fields is one key of the table, with
its default, its parser, whether it may change on reload, and its doc line.
Unknown sections and keys are errors, and every error names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import tomllib
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# Parsers take the value as TOML gives it and return it checked, or raise
# ValueError with the problem in words.

def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_type_name(value)} ({value!r})")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"must be {bound}, got {value}")
        return value
    return parse


AUTO = "auto"


def slots(value: Any) -> int | str:
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer or \"auto\", got {_type_name(value)} ({value!r})")
    return integer(1)(value)


def dsn(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a connection URI string, got {_type_name(value)}")
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a URI such as \"postgresql://slotproxy_monitor@127.0.0.1:5432/postgres\"")
    return value


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number of seconds, got {_type_name(value)} ({value!r})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return float(value)


def hostname(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a host name or address, got {_type_name(value)}")
    host = value.strip()
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"not a valid host name or address: {value!r}")
    if ":" in host:  # only an IPv6 literal has colons
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not a valid host name or address: {value!r}") from None
    return host


def port(value: Any) -> int:
    return integer(1, 65535)(value)


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """'host:port' or '[v6]:port' into an Address."""
    if not isinstance(text, str):
        raise ValueError(f"expected \"HOST:PORT\", got {_type_name(text)}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected \"[IPv6]:PORT\", got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected \"HOST:PORT\" (IPv6 as \"[::1]:PORT\"), got {text!r}")
    host = hostname(host)
    if not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r} in {text!r}")
    number = int(port_text)
    if not (0 if allow_port_zero else 1) <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return Address(host, number)


def listen_address(value: Any) -> Address:
    # Port 0 binds a free port: useful for tests and for the demo.
    return parse_address(value, allow_port_zero=True)


def key(default: Any, parse: Callable[[Any], Any], doc: str, *, reload: bool = True) -> Any:
    return field(default=default, metadata={"parse": parse, "reload": reload, "doc": doc})


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: Address = key(Address("127.0.0.1", 6432), listen_address,
                          "address clients connect to, \"HOST:PORT\" or \"[IPv6]:PORT\"",
                          reload=False)
    startup_timeout: float = key(10.0, seconds,
                                 "seconds a new client has to send its startup packet")
    shutdown_timeout: float = key(25.0, seconds,
                                  "seconds live sessions may go on after SIGTERM before they are closed")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    host: str = key("127.0.0.1", hostname, "PostgreSQL server host")
    port: int = key(5432, port, "PostgreSQL server port")
    connect_timeout: float = key(5.0, seconds,
                                 "seconds for one connection attempt, up to the server's first answer")

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_backend_slots: int | str = key(20, slots,
                                       "server sessions open at once through this proxy, "
                                       "or \"auto\": as many as the monitor finds free")
    max_queue: int = key(1000, integer(0),
                         "clients that may wait for a slot; the next one is refused with 53300")
    queue_timeout: float = key(30.0, seconds,
                               "seconds a client may wait, queued or retrying, before 53300")
    headroom: int = key(0, integer(0),
                        "slots always left to everyone else (with a monitor)")
    max_connecting: int = key(8, integer(1),
                              "server connection startups in flight at once")

    @property
    def fixed_slots(self) -> int | None:
        """The fixed cap, or None for "auto"."""
        return None if self.max_backend_slots == AUTO else self.max_backend_slots  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    dsn: str = key("", dsn,
                   "connection URI of the monitor's role; empty: no monitor, "
                   "admission by max_backend_slots alone")
    interval: float = key(1.0, seconds, "seconds between polls of the server")


@dataclass(frozen=True, slots=True)
class Config:
    proxy: ProxyConfig = ProxyConfig()
    backend: BackendConfig = BackendConfig()
    admission: AdmissionConfig = AdmissionConfig()
    monitor: MonitorConfig = MonitorConfig()
    source: str = "built-in defaults"


SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if name != "source"
}


@dataclass(frozen=True, slots=True)
class KeyInfo:
    section: str
    name: str
    default: Any
    reload: bool
    doc: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


def keys() -> Iterator[KeyInfo]:
    """Every configuration key, in table order (for docs and check-config)."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield KeyInfo(section, f.name, f.default, f.metadata["reload"], f.metadata["doc"])


def format_value(value: Any) -> str:
    """A value as it would be written in TOML."""
    if isinstance(value, (str, Address)):
        return f'"{value}"'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


Override = tuple[str, str, Any]  # (where it came from, dotted key, value)


def load(path: str | None, overrides: Iterable[Override] = ()) -> Config:
    """Read and validate the file at `path` (or start from defaults), then apply overrides."""
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        source = path
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(path, None, f"invalid TOML: {e}") from None
    return from_mapping(data, source, overrides)


def from_mapping(data: Mapping[str, Any], source: str, overrides: Iterable[Override] = ()) -> Config:
    sections: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(source, name, "unknown section" + _suggest(name, SECTIONS))
        if not isinstance(table, dict):
            raise ConfigError(source, name, f"expected a table [{name}], got {_type_name(table)}")
        sections[name] = {k: (source, v) for k, v in table.items()}
    for origin, dotted, value in overrides:
        section, _, name = dotted.partition(".")
        sections.setdefault(section, {})[name] = (origin, value)

    built: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        given = sections.get(name, {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for keyname, (origin, value) in given.items():
            f = known.get(keyname)
            if f is None:
                raise ConfigError(origin, f"{name}.{keyname}",
                                  "unknown key" + _suggest(keyname, known, prefix=f"{name}."))
            try:
                values[keyname] = f.metadata["parse"](value)
            except ValueError as e:
                raise ConfigError(origin, f"{name}.{keyname}", str(e)) from None
            origins[f"{name}.{keyname}"] = origin
        built[name] = cls(**values)
    config = Config(**built, source=source)
    if config.admission.max_backend_slots == AUTO and not config.monitor.dsn:
        raise ConfigError(origins["admission.max_backend_slots"], "admission.max_backend_slots",
                          "\"auto\" needs a monitor to find the free slots: set [monitor] dsn")
    return config


def _suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def warnings(config: Config) -> list[str]:
    """Valid but worth a second look; check-config prints these."""
    found = []
    if config.admission.max_backend_slots == AUTO:
        found.append(
            "admission.max_backend_slots = \"auto\" has no number to fall back on while the monitor "
            "is blind: the proxy then keeps the last capacity it saw, or admits without a limit "
            "if it never saw one. Set a number for a fixed fallback.")
    if _dsn_password(config.monitor.dsn):
        found.append("monitor.dsn holds a password in clear: prefer a passfile (~/.pgpass or "
                     "PGPASSFILE) or PGPASSWORD in the proxy's environment.")
    return found


def _dsn_password(uri: str) -> bool:
    if not uri:
        return False
    parts = urlsplit(uri)
    return bool(parts.password) or "password" in parse_qs(parts.query)


def describe(config: Config) -> Iterator[tuple[str, str, bool]]:
    """(dotted key, value as TOML, differs from default) for every key."""
    for info in keys():
        value = getattr(getattr(config, info.section), info.name)
        yield info.dotted, format_value(value), value != info.default

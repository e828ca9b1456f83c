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
import os
import socket
import tomllib
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit, urlunsplit

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        if self.socket_path is not None:
            return self.socket_path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def socket_path(self) -> str | None:
        """The Unix-domain socket, as libpq finds it, when the host is a directory."""
        return f"{self.host.rstrip('/')}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address in one form: IPv4-mapped IPv6 as IPv4, no scope; None for a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


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


def off_or_seconds(value: Any) -> float:
    """A timeout where 0 means off."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    try:
        return seconds(value)
    except ValueError as e:
        off = str(e).replace("must be a positive number", "must be 0 (off) or a positive number")
        raise ValueError(off) from None


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
    elif all(c.isdigit() or c == "." for c in host):  # meant as an IPv4 address
        try:
            socket.inet_aton(host)  # as the resolver reads addresses: 127.1 is 127.0.0.1
        except OSError:  # digits and dots that make no address: a typo, not a host name
            raise ValueError(f"not a valid IPv4 address: {value!r}") from None
    return host


# sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


def server_host(value: Any) -> str:
    """A host name or address, or (as in libpq) the directory of the server's Unix socket."""
    if isinstance(value, str) and value.strip().startswith("/"):
        # One spelling per directory: "/run/pg/" and "/run//pg" are one server, with one budget.
        return "/" + os.path.normpath(value.strip()).lstrip("/")
    return hostname(value)


def port(value: Any) -> int:
    return integer(1, 65535)(value)


def parse_server_address(text: str) -> Address:
    """As parse_address, and also '/socket/directory:port' (as libpq's host)."""
    if isinstance(text, str) and text.startswith("/"):
        directory, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"expected \"/SOCKET/DIRECTORY:PORT\", got {text!r}")
        return Address(server_host(directory), int(port_text))
    return parse_address(text)


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


def admin_address(value: Any) -> Address | None:
    """"" (off), "HOST:PORT", or a bare port, which means loopback."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"expected \"HOST:PORT\" or a port, got {_type_name(value)}")
    if not value:
        return None
    if value.lstrip(":").isdigit():
        value = "127.0.0.1:" + value.lstrip(":")
    return parse_address(value, allow_port_zero=True)


SCRAM_PREFIX = "SCRAM-SHA-256$"


def verifiers(value: Any) -> tuple[tuple[str, str], ...]:
    """[admin] users: user name -> SCRAM-SHA-256 verifier (never a password in clear)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of user = \"SCRAM-SHA-256$...\", got {_type_name(value)}")
    found = []
    for user, verifier in value.items():
        if not isinstance(verifier, str) or not _is_verifier(verifier):
            raise ValueError(f"user {user!r}: expected a SCRAM-SHA-256 verifier "
                             "(make one with `slotproxy hash-password`), not a password")
        found.append((user, verifier))
    return tuple(found)


def _is_verifier(text: str) -> bool:
    # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as PostgreSQL stores it
    if not text.startswith(SCRAM_PREFIX):
        return False
    parts = text[len(SCRAM_PREFIX):].split("$")
    if len(parts) != 2 or parts[0].count(":") != 1 or parts[1].count(":") != 1:
        return False
    return parts[0].split(":")[0].isdigit()


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value
    return parse


def file_path(value: Any) -> str:
    """A readable file, or "" for none."""
    if not isinstance(value, str):
        raise ValueError(f"expected a file path, got {_type_name(value)}")
    if value and not os.access(value, os.R_OK):
        raise ValueError(f"cannot read {value!r}")
    return value


def root_cert(value: Any) -> str:
    return value if value == "system" else file_path(value)


SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)} ({value!r})")
    return value


def key(default: Any, parse: Callable[[Any], Any], doc: str, *, reload: bool = True,
        show: Callable[[Any], str] | None = None) -> Any:
    """A configuration key; `show` renders a value that holds secrets without them."""
    return field(default=default, metadata={"parse": parse, "reload": reload, "doc": doc, "show": show})


def _show_dsn(uri: str) -> str:
    """The monitor's DSN with any password masked."""
    if not _dsn_password(uri):
        return format_value(uri)
    parts = urlsplit(uri)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = "&".join(f"{k}=***" if k == "password" else f"{k}={v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return format_value(urlunsplit(parts._replace(query=query)))


def _show_users(users: tuple[tuple[str, str], ...]) -> str:
    """Console user names only: a verifier can be attacked offline."""
    return format_value(tuple((name, "***") for name, _ in users))


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: Address = key(Address("127.0.0.1", 6432), listen_address,
                          "address clients connect to, \"HOST:PORT\" or \"[IPv6]:PORT\"",
                          reload=False)
    startup_timeout: float = key(10.0, seconds,
                                 "seconds a new client has to send its startup packet")
    shutdown_timeout: float = key(25.0, seconds,
                                  "seconds live sessions may go on after SIGTERM before they are closed")
    workers: int = key(1, integer(1, 64), "processes sharing the listen port (SO_REUSEPORT)",
                       reload=False)
    max_clients: int = key(5000, integer(1),
                           "client connections at once, waiting ones included; the next gets 53300")
    max_clients_per_address: int = key(0, integer(0),
                                       "client connections at once from one address (0: no cap)")
    cancel_rate: int = key(100, integer(1), "cancel requests forwarded per second; the rest dropped")
    log_connections: bool = key(True, flag, "log a line for each client admitted to a server "
                                "(refusals are logged either way)")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    host: str = key("127.0.0.1", server_host,
                    "PostgreSQL server host, or the directory of its Unix-domain socket (as libpq)")
    port: int = key(5432, port, "PostgreSQL server port")
    connect_timeout: float = key(5.0, seconds,
                                 "seconds for one connection attempt, up to the server's first answer")
    sslmode: str = key("prefer", choice(*SSLMODES),
                       "TLS towards the server, as libpq's sslmode: disable, prefer, require, "
                       "verify-ca, verify-full")
    sslrootcert: str = key("", root_cert,
                           "CA file (PEM) to verify the server's certificate, or \"system\"")

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ClassMatch:
    """Who belongs to a class: every field given must match (globs, CIDR); empty matches all."""

    user: tuple[str, ...] = ()
    database: tuple[str, ...] = ()
    application_name: tuple[str, ...] = ()
    address: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class ClassConfig:
    name: str
    match: ClassMatch = ClassMatch()
    weight: float = 1.0
    min_slots: int = 0
    max_slots: int | None = None
    max_queue: int = 1000
    queue_timeout: float = 30.0
    bypass: bool = False
    implicit: bool = False  # the default class nobody configured: its keys are [admission]'s

    def key(self, name: str) -> str:
        """The configuration key behind this class's `name` setting, for messages."""
        return f"admission.{name}" if self.implicit else f"admission.class.{self.name}.{name}"


DEFAULT_CLASS = "default"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """[databases.NAME]: where clients asking for database NAME ("*": any other) go."""

    name: str
    host: str
    port: int
    dbname: str = ""  # the database to ask the server for; empty: the name the client gave

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
    idle_timeout: float = key(0.0, off_or_seconds,
                              "while clients wait, end sessions idle longer than this (0: off)")
    idle_in_transaction_timeout: float = key(
        0.0, off_or_seconds,
        "while clients wait, end sessions idle in a transaction longer than this (0: off)")
    classes: tuple[ClassConfig, ...] = field(default=(), metadata={"nested": "class"})

    @property
    def fixed_slots(self) -> int | None:
        """The fixed cap, or None for "auto"."""
        return None if self.max_backend_slots == AUTO else self.max_backend_slots  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    dsn: str = key("", dsn,
                   "connection URI of the monitor's role; empty: no monitor, "
                   "admission by max_backend_slots alone", show=_show_dsn)
    interval: float = key(1.0, seconds, "seconds between polls of the server")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    client_tls: str = key("disable", choice("disable", "allow", "require", "passthrough"),
                          "TLS towards clients: disable, allow, require, or passthrough "
                          "(relayed unchanged to the server)")
    cert_file: str = key("", file_path, "certificate chain (PEM) the proxy shows TLS clients")
    key_file: str = key("", file_path, "its private key (PEM)")
    ca_file: str = key("", file_path,
                       "CA (PEM) that client certificates must chain to, when a client presents one")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address | None = key(None, admin_address,
                                 "address of /metrics, /status, /health, /ready: \"HOST:PORT\" "
                                 "or a port (loopback); empty: off", reload=False)
    users: tuple[tuple[str, str], ...] = key((), verifiers,
                                             "console users: name = SCRAM-SHA-256 verifier",
                                             show=_show_users)
    trust_loopback: bool = key(False, flag, "let console clients from loopback in without a password")


@dataclass(frozen=True, slots=True)
class Config:
    proxy: ProxyConfig = ProxyConfig()
    backend: BackendConfig = BackendConfig()
    admission: AdmissionConfig = AdmissionConfig()
    monitor: MonitorConfig = MonitorConfig()
    tls: TLSConfig = TLSConfig()
    admin: AdminConfig = AdminConfig()
    databases: tuple[RouteConfig, ...] = ()
    backend_given: bool = False  # [backend] or --backend was set, not only defaulted
    source: str = "built-in defaults"
    _classes: tuple[ClassConfig, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_classes", self._class_list())  # read on every connection

    @property
    def fallback(self) -> Address | None:
        """Where a database without its own [databases] entry goes (None: nowhere, 3D000)."""
        for route in self.databases:
            if route.name == "*":
                return route.address
        if not self.databases or self.backend_given:
            return self.backend.address
        return None

    @property
    def class_list(self) -> tuple[ClassConfig, ...]:
        """The configured classes, then the default class that takes everyone else."""
        return self._classes

    def _class_list(self) -> tuple[ClassConfig, ...]:
        configured = self.admission.classes
        if any(c.name == DEFAULT_CLASS for c in configured):
            return tuple(c for c in configured if c.name != DEFAULT_CLASS) + tuple(
                c for c in configured if c.name == DEFAULT_CLASS)
        return (*configured, ClassConfig(DEFAULT_CLASS, max_queue=self.admission.max_queue,
                                         queue_timeout=self.admission.queue_timeout, implicit=True))


SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items()
    if name in ("proxy", "backend", "admission", "monitor", "tls", "admin")
}
KNOWN_SECTIONS = (*SECTIONS, "databases")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    section: str
    name: str
    default: Any
    reload: bool
    doc: str
    show: Callable[[Any], str] | None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    def value(self, config: Config) -> Any:
        return getattr(getattr(config, self.section), self.name)

    def shown(self, value: Any) -> str:
        """`value` as TOML, with any secret in it masked."""
        return self.show(value) if self.show is not None else format_value(value)


def keys() -> Iterator[KeyInfo]:
    """Every configuration key, in table order (for docs and check-config)."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "nested" in f.metadata:
                continue
            yield KeyInfo(section, f.name, f.default, f.metadata["reload"], f.metadata["doc"],
                          f.metadata["show"])


def format_value(value: Any) -> str:
    """A value as it would be written in TOML."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "{ " + ", ".join(f'{k} = "{v}"' for k, v in value) + " }" if value else "{}"
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
        if name not in KNOWN_SECTIONS:
            raise ConfigError(source, name, "unknown section" + _suggest(name, KNOWN_SECTIONS))
        if not isinstance(table, dict):
            raise ConfigError(source, name, f"expected a table [{name}], got {_type_name(table)}")
        sections[name] = {k: (source, v) for k, v in table.items()}
    for origin, dotted, value in overrides:
        section, _, name = dotted.partition(".")
        sections.setdefault(section, {})[name] = (origin, value)

    built: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        given = dict(sections.get(name, {}))
        known = {f.name: f for f in dataclasses.fields(cls) if "nested" not in f.metadata}
        nested = {f.metadata["nested"]: f.name for f in dataclasses.fields(cls) if "nested" in f.metadata}
        values: dict[str, Any] = {}
        raw_nested = {keyname: given.pop(keyname) for keyname in list(given) if keyname in nested}
        for keyname, (origin, value) in given.items():
            f = known.get(keyname)
            if f is None:
                raise ConfigError(origin, f"{name}.{keyname}",
                                  "unknown key" + _suggest(keyname, [*known, *nested], prefix=f"{name}."))
            try:
                values[keyname] = f.metadata["parse"](value)
            except ValueError as e:
                raise ConfigError(origin, f"{name}.{keyname}", str(e)) from None
            origins[f"{name}.{keyname}"] = origin
        built[name] = cls(**values)
        if "class" in raw_nested:
            origin, value = raw_nested["class"]
            built[name] = dataclasses.replace(
                built[name], classes=_parse_classes(value, origin, built[name]))
    backend = built["backend"]
    routes: tuple[RouteConfig, ...] = ()
    if "databases" in sections:
        routes = tuple(_parse_route(name, value, origin, backend)
                       for name, (origin, value) in sections["databases"].items())
    config = Config(**built, databases=routes, backend_given="backend" in sections, source=source)
    tls = config.tls
    if tls.client_tls in ("allow", "require"):
        for name in ("cert_file", "key_file"):
            if not getattr(tls, name):
                raise ConfigError(origins.get("tls.client_tls", source), f"tls.{name}",
                                  f"client_tls = \"{tls.client_tls}\" needs a certificate and its key")
    if config.backend.sslmode in ("verify-ca", "verify-full") and not config.backend.sslrootcert:
        raise ConfigError(origins.get("backend.sslmode", source), "backend.sslrootcert",
                          f"sslmode = \"{config.backend.sslmode}\" needs a CA file to verify "
                          "the server with (or \"system\")")
    if config.backend.sslrootcert == "system" and config.backend.sslmode != "verify-full":
        # As libpq: the system's CAs vouch for any name, so only a name check makes them safe.
        raise ConfigError(origins.get("backend.sslrootcert", source), "backend.sslrootcert",
                          f"\"system\" needs sslmode = \"verify-full\" (not \"{config.backend.sslmode}\")")
    _check_sockets(config, origins, source)
    _check_admin_port(config, origins, source)
    check_shares(config, config.proxy.workers, origins.get("proxy.workers", source))
    if config.admission.max_backend_slots == AUTO and not config.monitor.dsn:
        raise ConfigError(origins["admission.max_backend_slots"], "admission.max_backend_slots",
                          "\"auto\" needs a monitor to find the free slots: set [monitor] dsn")
    return config


def _check_admin_port(config: Config, origins: Mapping[str, str], source: str) -> None:
    """The admin endpoints and the proxy cannot share a port (each worker's admin port is
    admin.listen's plus the worker's index)."""
    admin, proxy, workers = config.admin.listen, config.proxy.listen, config.proxy.workers
    if admin is None or not admin.port or not proxy.port:
        return
    # A wildcard takes the port on every address of its family (both bind IPv6 only on "::").
    family = ":" in admin.host, ":" in proxy.host
    wildcard = admin.host in ("0.0.0.0", "::") or proxy.host in ("0.0.0.0", "::")
    same_host = admin.host == proxy.host or (wildcard and family[0] == family[1])
    if same_host and admin.port <= proxy.port < admin.port + workers:
        ports = f"ports {admin.port}-{admin.port + workers - 1}, one per worker," if workers > 1 \
            else f"port {admin.port}"
        raise ConfigError(origins.get("admin.listen", source), "admin.listen",
                          f"{ports} would take proxy.listen's ({proxy}): choose another port")


def _check_sockets(config: Config, origins: Mapping[str, str], source: str) -> None:
    """Unix-domain sockets: a path that fits, and no TLS asked for (PostgreSQL offers none there)."""
    unix = [(f"databases.{r.name}.host" if r.name.isidentifier() else f'databases."{r.name}".host',
             r.address) for r in config.databases if r.address.socket_path]
    if config.backend.address.socket_path and (config.backend_given or not config.databases):
        unix.insert(0, ("backend.host", config.backend.address))
    if not unix:
        return
    for dotted, address in unix:
        length = len(os.fsencode(address.socket_path))  # type: ignore[arg-type]
        if length > MAX_SOCKET_PATH:
            raise ConfigError(origins.get(dotted, source), dotted,
                              f"the socket path {address.socket_path!r} takes {length} bytes, "
                              f"and at most {MAX_SOCKET_PATH} fit: use a shorter directory")
    dotted, host = unix[0][0], unix[0][1].host
    if config.backend.sslmode in ("require", "verify-ca", "verify-full"):
        raise ConfigError(origins.get("backend.sslmode", source), "backend.sslmode",
                          f"\"{config.backend.sslmode}\" cannot be met over the Unix-domain socket "
                          f"of {dotted} = \"{host}\": PostgreSQL offers no TLS there "
                          "(use \"disable\" or \"prefer\", or a TCP host)")
    if config.tls.client_tls == "passthrough":
        raise ConfigError(origins.get("tls.client_tls", source), "tls.client_tls",
                          f"\"passthrough\" needs TLS from the server, and the Unix-domain socket "
                          f"of {dotted} = \"{host}\" offers none (end the clients' TLS here: "
                          "\"allow\" or \"require\")")


def check_shares(config: Config, workers: int, origin: str, running: bool = False) -> None:
    """Each of `workers` processes takes a share of the limits meant for the whole
    proxy (workers.worker_config): a limit that is not 0 must leave each at least 1."""
    if workers <= 1:
        return
    admission = config.admission
    shared = [("admission.max_queue", admission.max_queue, "")]
    if not config.monitor.dsn and admission.fixed_slots is not None:
        shared.insert(0, ("admission.max_backend_slots", admission.fixed_slots, " (or set [monitor] dsn)"))
    for c in admission.classes:
        shared.append((c.key("max_queue"), c.max_queue, ""))
        if c.max_slots is not None:
            shared.append((c.key("max_slots"), c.max_slots, ""))
    who = f"the {workers} running workers" if running else f"{workers} workers"
    for dotted, total, hint in shared:
        if 0 < total < workers:
            raise ConfigError(origin, "proxy.workers",
                              f"{who} cannot share {dotted} = {total}: each needs at least 1{hint}")


def _parse_keys(table: Mapping[str, Any], parsers: Mapping[str, Callable[[Any], Any]],
                values: dict[str, Any], where: str, origin: str) -> None:
    """Each key of a table through its parser into `values`; an unknown key or bad value is an error."""
    for keyname, value in table.items():
        parse = parsers.get(keyname)
        if parse is None:
            raise ConfigError(origin, f"{where}.{keyname}",
                              "unknown key" + _suggest(keyname, parsers, prefix=f"{where}."))
        try:
            values[keyname] = parse(value)
        except ValueError as e:
            raise ConfigError(origin, f"{where}.{keyname}", str(e)) from None


def _parse_route(name: str, table: Any, origin: str, backend: BackendConfig) -> RouteConfig:
    where = f"databases.{name}" if name.isidentifier() else f'databases."{name}"'
    if not isinstance(table, dict):
        raise ConfigError(origin, where, f"expected a table, got {_type_name(table)}")
    parsers = {"host": server_host, "port": port, "dbname": _dbname}
    values: dict[str, Any] = {"host": backend.host, "port": backend.port}
    _parse_keys(table, parsers, values, where, origin)
    return RouteConfig(name=name, **values)


def _dbname(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"expected a database name, got {value!r}")
    return value


_CLASS_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _parse_classes(value: Any, origin: str, admission: AdmissionConfig) -> tuple[ClassConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(origin, "admission.class",
                          "expected [[admission.class]] entries (an array of tables)")
    classes: list[ClassConfig] = []
    for index, table in enumerate(value):
        where = f"admission.class[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(origin, where, f"expected a table, got {_type_name(table)}")
        name = table.get("name")
        if not isinstance(name, str) or not name or not set(name) <= _CLASS_NAME_CHARS:
            raise ConfigError(origin, f"{where}.name",
                              "expected a name of letters, digits, '_' or '-'")
        where = f"admission.class.{name}"
        if any(c.name == name for c in classes):
            raise ConfigError(origin, where, "a second class with this name")
        classes.append(_parse_class(table, name, where, origin, admission))
    return tuple(classes)


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"expected a number, got {_type_name(value)} ({value!r})")
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return float(value)


def _parse_class(table: dict[str, Any], name: str, where: str, origin: str,
                 admission: AdmissionConfig) -> ClassConfig:
    parsers: dict[str, Callable[[Any], Any]] = {
        "name": str, "match": _parse_match, "weight": _positive_number, "min_slots": integer(0),
        "max_slots": integer(1), "max_queue": integer(0), "queue_timeout": seconds, "bypass": flag,
    }
    values: dict[str, Any] = {"max_queue": admission.max_queue,
                              "queue_timeout": admission.queue_timeout}
    _parse_keys(table, parsers, values, where, origin)
    cls = ClassConfig(**values)
    if cls.max_slots is not None and cls.min_slots > cls.max_slots:
        raise ConfigError(origin, f"{where}.min_slots",
                          f"{cls.min_slots} is more than max_slots = {cls.max_slots}")
    if name == DEFAULT_CLASS and "match" in table:
        raise ConfigError(origin, f"{where}.match",
                          "the default class takes everyone no other class matches: no match here")
    if cls.bypass:
        budget_keys = [k for k in ("weight", "min_slots", "max_slots", "max_queue", "queue_timeout")
                       if k in table]
        if budget_keys:
            raise ConfigError(origin, f"{where}.{budget_keys[0]}",
                              "a bypass class is never queued and takes nothing from the budget")
    return cls


def _parse_match(value: Any) -> ClassMatch:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table such as {{ user = \"web*\" }}, got {_type_name(value)}")
    fields: dict[str, Any] = {}
    for keyname, item in value.items():
        if keyname not in ("user", "database", "application_name", "address"):
            raise ValueError(f"unknown match key {keyname!r}: expected user, database, "
                             "application_name or address")
        items = item if isinstance(item, list) else [item]
        if not items or not all(isinstance(x, str) and x for x in items):
            raise ValueError(f"match.{keyname}: expected a string or a list of strings")
        if keyname == "address":
            try:
                fields[keyname] = tuple(ipaddress.ip_network(x, strict=False) for x in items)
            except ValueError as e:
                raise ValueError(f"match.address: {e}") from None
        else:
            fields[keyname] = tuple(items)
    return ClassMatch(**fields)


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
    """(dotted key, value as TOML with secrets masked, differs from default) for every key."""
    for info in keys():
        value = info.value(config)
        yield info.dotted, info.shown(value), value != info.default

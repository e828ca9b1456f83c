"""Configuration: the table of keys, validation, and the docs that must match it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from slotproxy import config
from slotproxy.config import Address
from slotproxy.errors import ConfigError

ROOT = Path(__file__).parent.parent


def test_defaults_need_no_file() -> None:
    cfg = config.load(None)
    assert cfg.proxy.listen == Address("127.0.0.1", 6432)
    assert cfg.backend.address == Address("127.0.0.1", 5432)
    assert cfg.admission.max_backend_slots == 20


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[admission]\nmax_queue = 5\nqueue_timeout = 2\n")
    cfg = config.load(str(path), [("--max-queue", "admission.max_queue", 9)])
    assert (cfg.admission.max_queue, cfg.admission.queue_timeout) == (9, 2.0)


@pytest.mark.parametrize(("text", "where", "problem"), [
    ("[admission]\nmax_queue = true", "admission.max_queue", "expected an integer, got a boolean"),
    ("[admission]\nqueue_timeout = \"30s\"", "admission.queue_timeout", "expected a number of seconds"),
    ("[admission]\nqueue_timeout = 0", "admission.queue_timeout", "must be a positive number"),
    ("[admission]\nqueue_timeout = inf", "admission.queue_timeout", "must be a positive number"),
    ("[proxy]\nlisten = \"[::1:6432\"", "proxy.listen", "expected \"[IPv6]:PORT\""),
    ("[proxy]\nlisten = \"::1:6432\"", "proxy.listen", "IPv6 as \"[::1]:PORT\""),
    ("[proxy]\nlisten = \"host:http\"", "proxy.listen", "port must be a number"),
    ("[backend]\nhost = \"fe80::zz\"", "backend.host", "not a valid host name or address"),
    ("[backend]\nport = 0", "backend.port", "must be between 1 and 65535"),
    ("proxy = 3", "proxy", "expected a table [proxy]"),
    ("[admission]\nmax_backend_slot = 3", "admission.max_backend_slot",
     "did you mean admission.max_backend_slots?"),
    ("[backend]\nhost = \"/run/postgresql\"\nsslmode = \"require\"", "backend.sslmode",
     "\"require\" cannot be met over the Unix-domain socket of backend.host = \"/run/postgresql\""),
    ("[backend]\nhost = \"/run/postgresql\"\n[tls]\nclient_tls = \"passthrough\"", "tls.client_tls",
     "\"passthrough\" needs TLS from the server"),
    ("[databases.sales]\nhost = \"/run/pg\"\n[backend]\nsslmode = \"verify-full\"\n"
     "sslrootcert = \"system\"", "backend.sslmode", "databases.sales.host = \"/run/pg\""),
    (f"[backend]\nhost = \"/{'d' * 92}\"\nport = 10000", "backend.host",
     "takes 108 bytes, and at most 107 fit"),
])
def test_errors_name_the_key_and_the_problem(text: str, where: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.from_mapping(tomllib.loads(text), "f.toml")
    assert raised.value.key == where
    assert problem in str(raised.value)
    assert str(raised.value).startswith(f"f.toml: {where}: ")


def test_a_server_host_may_be_a_unix_socket_directory_as_in_libpq() -> None:
    cfg = config.from_mapping({"backend": {"host": "/run/postgresql", "port": 5433},
                               "databases": {"sales": {"host": "/tmp/pg/"}}}, "t")
    assert cfg.backend.address.socket_path == "/run/postgresql/.s.PGSQL.5433"
    assert cfg.databases[0].address.socket_path == "/tmp/pg/.s.PGSQL.5433"
    assert str(cfg.backend.address) == "/run/postgresql/.s.PGSQL.5433"
    assert Address("127.0.0.1", 5432).socket_path is None
    assert config.parse_server_address("/run/postgresql:5433") == Address("/run/postgresql", 5433)
    # One directory, however spelt, is one server (and one budget).
    same = config.from_mapping({"backend": {"host": "//run/./postgresql"},
                                "databases": {"a": {"host": "/run/postgresql/"}, "b": {}}}, "t")
    assert {r.address for r in same.databases} == {Address("/run/postgresql", 5432)}
    fits = config.from_mapping({"backend": {"host": "/" + "d" * 92, "port": 5432}}, "t")  # 107 bytes
    assert len(fits.backend.address.socket_path) == 107
    assert config.parse_server_address("[::1]:5432") == Address("::1", 5432)
    with pytest.raises(ValueError, match="SOCKET/DIRECTORY:PORT"):
        config.parse_server_address("/run/postgresql")
    with pytest.raises(ValueError, match="not a valid host name"):
        config.parse_address("/run/postgresql:5432")  # a listen address is TCP only


def test_listen_accepts_ipv6_and_port_zero() -> None:
    cfg = config.from_mapping({"proxy": {"listen": "[::1]:0"}}, "t")
    assert cfg.proxy.listen == Address("::1", 0)
    assert str(cfg.proxy.listen) == "[::1]:0"


def test_example_config_has_every_key_at_its_default() -> None:
    data = tomllib.loads((ROOT / "config.example.toml").read_text())
    example = {f"{section}.{name}": value for section, table in data.items() for name, value in table.items()}
    assert set(example) == {k.dotted for k in config.keys()}
    loaded = config.from_mapping(data, "example")
    assert all(not changed for _, _, changed in config.describe(loaded)), "the example shows the defaults"


def test_readme_documents_every_key_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", readme, re.M))
    assert rows == {k.dotted: config.format_value(k.default) for k in config.keys()}


def test_workers_share_out_every_limit_meant_for_the_whole_proxy() -> None:
    from slotproxy.workers import worker_config

    cfg = config.from_mapping({
        "proxy": {"workers": 3},
        "admission": {"max_backend_slots": 10, "max_queue": 100,
                      "class": [{"name": "cron", "match": {"user": "cron"}, "min_slots": 4,
                                 "max_slots": 5, "max_queue": 7}]}}, "test")
    parts = [worker_config(cfg, i, 3) for i in range(3)]
    assert sum(p.admission.max_backend_slots for p in parts) == 10
    assert sum(p.admission.max_queue for p in parts) == 100
    crons = [p.class_list[0] for p in parts]
    assert [c.name for c in crons] == ["cron"] * 3
    assert sum(c.min_slots for c in crons) == 4 and sum(c.max_slots for c in crons) == 5
    assert sum(c.max_queue for c in crons) == 7
    assert all(c.min_slots <= c.max_slots for c in crons)


def test_a_reload_cannot_leave_a_running_worker_without_its_share() -> None:
    from slotproxy.workers import worker_config

    # The file says one worker, but four run until a restart: a reload must not give three of them 0.
    cfg = config.from_mapping({"admission": {"max_backend_slots": 2}}, "slotproxy.toml")
    with pytest.raises(ConfigError) as refused:
        worker_config(cfg, 3, 4)
    assert str(refused.value) == ("slotproxy.toml: proxy.workers: the 4 running workers cannot share "
                                  "admission.max_backend_slots = 2: each needs at least 1 "
                                  "(or set [monitor] dsn)")
    with pytest.raises(ConfigError, match=r"4 workers cannot share admission\.max_queue = 2"):
        config.from_mapping({"proxy": {"workers": 4}, "admission": {"max_queue": 2}}, "test")
    config.from_mapping({"proxy": {"workers": 4}, "admission": {"max_queue": 0}}, "test")  # 0 stays 0


@pytest.mark.parametrize(("proxy", "admin", "workers", "clash"), [
    ("127.0.0.1:6432", "127.0.0.1:6432", 1, True),
    ("127.0.0.1:6432", "0.0.0.0:6432", 1, True),  # the wildcard takes every IPv4 address
    ("127.0.0.1:6432", "[::]:6432", 1, False),  # IPv6 only: another family
    ("127.0.0.1:6432", "127.0.0.1:6431", 2, True),  # worker 1's admin port is 6432
    ("127.0.0.1:6432", "127.0.0.1:6433", 4, False),
])
def test_the_admin_ports_may_not_take_the_proxys(proxy: str, admin: str, workers: int, clash: bool) -> None:
    data = {"proxy": {"listen": proxy, "workers": workers}, "admin": {"listen": admin},
            "admission": {"max_backend_slots": 8}}
    if clash:
        with pytest.raises(ConfigError, match=r"admin\.listen: .* would take proxy\.listen's"):
            config.from_mapping(data, "t")
    else:
        config.from_mapping(data, "t")

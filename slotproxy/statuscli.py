"""`slotproxy status`: /status of a running proxy as terminal tables (or its JSON)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from . import config
from .errors import ConfigError


def _admin_address(config_path: str | None, admin: str | None) -> str:
    if admin:
        try:
            return str(config.admin_address(admin))
        except ValueError as e:
            raise ConfigError("--admin", None, str(e)) from None
    cfg = config.load(config_path)
    if cfg.admin.listen is None:
        raise ConfigError(cfg.source, "admin.listen",
                          "the admin endpoints are off: set it, or pass --admin HOST:PORT")
    return str(cfg.admin.listen)


def fetch(address: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/status", timeout=timeout) as response:
        return json.load(response)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}s"
    return str(value)


def table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def render(status: dict[str, Any]) -> str:
    out = []
    servers = [[s["server"], s["capacity"], s["own"], s["waiting"], s["connecting"], s["paused"],
                s["blind"], s["max_connections"], s["external"]] for s in status["servers"]]
    out.append(table(["server", "capacity", "own", "waiting", "connecting", "paused", "blind",
                      "max_conn", "external"], servers))
    waiting = status["waiting"]
    out.append(f"\nWAITING ({len(waiting)}), longest wait first")
    if waiting:
        out.append(table(["waited", "id", "class", "user", "database", "application_name", "address"],
                         [[w["waited"], w["id"], w["class"], w["user"], w["database"],
                           w["application_name"], w["address"]] for w in waiting]))
    sessions = status["sessions"]
    out.append(f"\nSESSIONS ({len(sessions)}), longest idle first")
    if sessions:
        out.append(table(["idle_for", "state", "id", "class", "user", "database", "application_name",
                          "address", "backend_pid"],
                         [[s["idle_for"], s["state"], s["id"], s["class"], s["user"], s["database"],
                           s["application_name"], s["address"], s["backend_pid"]] for s in sessions]))
    return "\n".join(out)


def health(config_path: str | None, admin: str | None) -> int:
    """GET /health: 0 when the proxy answers, 1 when it does not (for HEALTHCHECK and probes)."""
    address = _admin_address(config_path, admin)
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"slotproxy: http://{address}/health: {e}", file=sys.stderr)
        return 1


def show(config_path: str | None, admin: str | None, as_json: bool, watch: float | None) -> int:
    address = _admin_address(config_path, admin)
    try:
        while True:
            try:
                status = fetch(address)
            except (urllib.error.URLError, OSError) as e:
                print(f"slotproxy: cannot read http://{address}/status: {e}", file=sys.stderr)
                return 1
            text = json.dumps(status, indent=1) if as_json else render(status)
            if watch is None:
                print(text)
                return 0
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + address + "\n" + text, flush=True)
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0

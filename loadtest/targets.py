"""Targets: a name and a PostgreSQL URI to connect to, compared side by side."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

# A URI's password (user:PASSWORD@) and a keyword DSN's (password=PASSWORD).
_PASSWORDS = re.compile(r"(?P<keep>postgres(?:ql)?://[^/@\s]*?:)[^/\s]*(?=@)"
                        r"|(?P<kw>password\s*=\s*)(?:'[^']*'|\"[^\"]*\"|\S+)",
                        re.IGNORECASE)  # PGPASSWORD='...' in a shell command too


def mask_passwords(text: str) -> str:
    """`text` with the passwords of the DSNs in it masked, for reports."""
    return _PASSWORDS.sub(lambda m: (m["keep"] or m["kw"]) + "***", text)


class UsageError(Exception):
    """A bad command line or target; the CLI prints it and exits 2."""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    dsn: str
    kind: str = "given"  # "direct", "slotproxy", "pgbouncer" when spawned
    pid: int | None = None  # the proxy's process, for its CPU time and memory

    @property
    def address(self) -> tuple[str, int]:
        parts = urllib.parse.urlsplit(self.dsn)
        return parts.hostname or "127.0.0.1", parts.port or 5432

    @property
    def user(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.dsn).username or "postgres")

    @property
    def database(self) -> str:
        path = urllib.parse.urlsplit(self.dsn).path.lstrip("/")
        return urllib.parse.unquote(path) or self.user

    def shown(self) -> str:
        """The DSN with its password masked, for reports."""
        return mask_passwords(self.dsn)


def parse_target(text: str) -> Target:
    """NAME=postgresql://user[:password]@host:port/database[?...]"""
    shown = mask_passwords(text)
    name, sep, dsn = text.partition("=")
    if "://" in name:  # NAME= left out, and the URI's own '=' (?sslmode=...) taken for it
        raise UsageError(f"--target {shown!r}: expected NAME=DSN, a name first (direct=postgresql://...)")
    if not sep or not name or not dsn:
        raise UsageError(f"--target {shown!r}: expected NAME=DSN")
    try:
        parts = urllib.parse.urlsplit(dsn)
        parts.port  # noqa: B018 - raises on a port out of range, which a connect would wrap around
    except ValueError as e:  # also a malformed [IPv6] host
        raise UsageError(f"--target {name}: {e}") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise UsageError(f"--target {name}: expected a postgresql:// URI, got {mask_passwords(dsn)!r}")
    return Target(name, dsn)


def parse_number(text: str, flag: str) -> tuple[str, int]:
    """NAME=N, as --pid and --slots take it."""
    name, sep, n = text.partition("=")
    if not sep or not name or not n.isdigit():
        raise UsageError(f"{flag} {text!r}: expected NAME={flag.strip('-').upper()}")
    return name, int(n)

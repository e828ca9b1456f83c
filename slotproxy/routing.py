"""Where a client goes: its server, by the database it asks for, and its class, by who it is. Pure."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .config import Address, ClassConfig, ClassMatch, Config, parse_ip


@dataclass(frozen=True, slots=True)
class Route:
    server: Address
    dbname: str  # the database to ask the server for


class Router:
    def __init__(self, config: Config) -> None:
        self._routes = {r.name: r for r in config.databases if r.name != "*"}
        self.names = frozenset(self._routes)  # the databases routed by name
        self._fallback = config.fallback
        star = next((r for r in config.databases if r.name == "*"), None)
        self._fallback_dbname = star.dbname if star else ""
        servers = [r.address for r in config.databases]
        if self._fallback is not None:
            servers.insert(0, self._fallback)
        self.servers: tuple[Address, ...] = tuple(dict.fromkeys(servers))  # the fallback first

    def resolve(self, database: str) -> Route | None:
        """The server for `database`, or None when nothing routes it."""
        route = self._routes.get(database)
        if route is not None:
            return Route(route.address, route.dbname or database)
        if self._fallback is not None:
            return Route(self._fallback, self._fallback_dbname or database)
        return None


def matches(match: ClassMatch, user: str, database: str, application_name: str, address: str) -> bool:
    if match.user and not _any_glob(match.user, user):
        return False
    if match.database and not _any_glob(match.database, database):
        return False
    if match.application_name and not _any_glob(match.application_name, application_name):
        return False
    if match.address:
        ip = parse_ip(address)
        if ip is None or not any(ip in net for net in match.address):
            return False
    return True


def _any_glob(patterns: tuple[str, ...], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def classify(classes: tuple[ClassConfig, ...], user: str, database: str, application_name: str,
             address: str) -> ClassConfig:
    """The first class that matches; the last class (the default) matches everyone."""
    for cls in classes[:-1]:
        if matches(cls.match, user, database, application_name, address):
            return cls
    return classes[-1]

"""What the proxy counts, and its Prometheus exposition.

Counters are plain integers on `Stats`, bumped once per admission decision
(never per chunk). Gauges are not kept at all: the collector reads them at
scrape time from the collections they describe (queues, holders, sessions).
Labels are bounded: server address, class name, session state, reason,
SQLSTATE; never a client address or free text.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import wire

if TYPE_CHECKING:
    from .server import Proxy

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SESSION_STATES = (wire.STARTING, wire.ACTIVE, wire.IDLE, wire.IDLE_IN_TRANSACTION,
                  wire.IDLE_IN_FAILED_TRANSACTION, wire.PASSTHROUGH)


class Stats:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # Admission waits by (server, class): a count per bucket (the last one +Inf), and
        # their sum. Kept here and exposed at scrape: cheaper per admission than a Histogram.
        self.waits: dict[tuple[str, str], list[int]] = {}
        self.wait_sums: Counter[tuple[str, str]] = Counter()
        self.admitted: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()  # (reason, SQLSTATE)
        self.retries: Counter[tuple[str, str]] = Counter()  # (server, SQLSTATE or "connect")
        self.reclaimed: Counter[tuple[str, str]] = Counter()  # (server, state it was in)
        self.bytes_to_server = 0  # of sessions that ended; live ones are added at scrape
        self.bytes_to_client = 0

    def admit(self, server: str, cls: str, waited: float) -> None:
        key = server, cls
        self.admitted[key] += 1
        counts = self.waits.get(key)
        if counts is None:
            counts = self.waits[key] = [0] * (len(WAIT_BUCKETS) + 1)
        counts[bisect_left(WAIT_BUCKETS, waited)] += 1  # the first bound >= waited: "le"
        self.wait_sums[key] += waited


class ProxyCollector(Collector):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        stats = proxy.stats
        waiting = GaugeMetricFamily("slotproxy_clients_waiting", "Clients waiting for a server slot",
                                    labels=("server", "class"))
        sessions = GaugeMetricFamily("slotproxy_sessions", "Server sessions through the proxy",
                                     labels=("server", "class", "state"))
        counts: Counter[tuple[str, str, str]] = Counter()
        for session in proxy.sessions:
            if session.upstream is not None and session.relay is not None:
                cls = session.cls.name if session.cls else ""
                counts[str(session.upstream.address), cls, session.state] += 1
        capacity = GaugeMetricFamily("slotproxy_capacity", "Server sessions this proxy may hold "
                                     "(-1: no limit)", labels=("server",))
        server_gauges = {
            name: GaugeMetricFamily(f"slotproxy_server_{name}", help_text, labels=("server",))
            for name, help_text in (
                ("max_connections", "max_connections as the monitor last read it"),
                ("reserved_connections", "superuser_reserved_connections + reserved_connections"),
                ("external_sessions", "client backends on the server that are not this proxy's"),
                ("peers", "slotproxy instances whose monitors the server shows"),
            )}
        blind = GaugeMetricFamily("slotproxy_monitor_blind", "1 while the monitor cannot read the server",
                                  labels=("server",))
        paused = GaugeMetricFamily("slotproxy_paused", "1 while admission to the server is paused",
                                   labels=("server",))
        connecting = GaugeMetricFamily("slotproxy_startups_in_flight",
                                       "Server connection startups in flight", labels=("server",))
        for upstream in proxy.upstreams.values():
            server = str(upstream.address)
            admission = upstream.gate.admission
            for name, lane in admission.lanes.items():
                waiting.add_metric((server, name), lane.waiting)
                for state in SESSION_STATES:
                    sessions.add_metric((server, name, state), counts[server, name, state])
            snap = upstream.capacity
            capacity.add_metric((server,), -1 if snap.capacity is None else snap.capacity)
            if snap.max_connections is not None:
                server_gauges["max_connections"].add_metric((server,), snap.max_connections)
                server_gauges["reserved_connections"].add_metric(
                    (server,), (snap.superuser_reserved or 0) + (snap.reserved or 0))
                server_gauges["external_sessions"].add_metric((server,), snap.external or 0)
                server_gauges["peers"].add_metric((server,), snap.peers)
            blind.add_metric((server,), 1 if snap.blind else 0)
            paused.add_metric((server,), 1 if admission.paused else 0)
            connecting.add_metric((server,), len(admission.connecting))
        yield waiting
        yield sessions
        yield capacity
        yield from server_gauges.values()
        yield blind
        yield paused
        yield connecting

        yield wait_histogram(stats)
        yield _counter("slotproxy_clients_admitted", "Clients admitted to a server session",
                       ("server", "class"), stats.admitted)
        yield _counter("slotproxy_clients_refused", "Clients refused, by reason and the SQLSTATE they saw",
                       ("reason", "sqlstate"), stats.refused)
        yield _counter("slotproxy_server_refusals_retried",
                       "Connection attempts the server refused before answering, retried unseen",
                       ("server", "sqlstate"), stats.retries)
        yield _counter("slotproxy_sessions_reclaimed", "Idle sessions ended to free a slot for waiters",
                       ("server", "state"), stats.reclaimed)
        up, down = stats.bytes_to_server, stats.bytes_to_client
        for session in proxy.sessions:
            if session.relay is not None:
                up += session.relay.bytes_to_server
                down += session.relay.bytes_to_client
        relayed = CounterMetricFamily("slotproxy_bytes_relayed", "Bytes relayed", labels=("direction",))
        relayed.add_metric(("to_server",), up)
        relayed.add_metric(("to_client",), down)
        yield relayed


_WAIT_LE = (*map(floatToGoString, WAIT_BUCKETS), "+Inf")


def wait_histogram(stats: Stats) -> HistogramMetricFamily:
    wait = HistogramMetricFamily(
        "slotproxy_admission_wait_seconds",
        "Time from a client's startup packet to its admission (queue and retries)",
        labels=("server", "class"))
    for key, counts in sorted(stats.waits.items()):
        wait.add_metric(key, list(zip(_WAIT_LE, accumulate(counts), strict=True)), stats.wait_sums[key])
    return wait


def _counter(name: str, help_text: str, labels: tuple[str, ...],
             values: Counter[tuple[str, str]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key, value)
    return family

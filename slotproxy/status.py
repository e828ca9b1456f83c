"""Who waits and who holds slots: one snapshot for /status, the console and `slotproxy status`."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from . import wire

if TYPE_CHECKING:
    from .server import Proxy
    from .session import Session

IDLE_STATES = (wire.IDLE, wire.IDLE_IN_TRANSACTION, wire.IDLE_IN_FAILED_TRANSACTION)


def _client(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "address": f"{session.client_addr}:{session.client_port}",
        "user": session.user,
        "database": session.database,
        "application_name": session.application_name,
        "class": session.cls.name if session.cls else None,
        "server": str(session.backend_address) if session.backend_address else None,
    }


def snapshot(proxy: Proxy) -> dict[str, Any]:
    """Waiting clients (in queue order: longest wait first), sessions (longest idle first), servers."""
    now = asyncio.get_running_loop().time()
    wall = time.time()
    queued = []
    sessions = []
    for session in proxy.sessions:
        ticket = session.ticket
        if ticket.state.value == "waiting":
            # By arrival, ties (the same clock reading) by the queue's own order.
            queued.append(((ticket.queued_at, ticket.seq),
                           {**_client(session), "waited": round(now - ticket.queued_at, 3)}))
        elif session.relay is not None:
            tracker = session.tracker
            state = session.state
            since = tracker.since if tracker is not None else session.connected_at
            sessions.append({
                **_client(session),
                "state": state,
                "since": round(wall - (now - since), 3),
                "idle_for": round(now - since, 3) if state in IDLE_STATES else None,
                "backend_pid": session.backend_key[0] if session.backend_key else None,
                "bypass": session.bypass,
            })
    waiting = [w for _, w in sorted(queued, key=lambda q: q[0])]
    sessions.sort(key=lambda s: -(s["idle_for"] if s["idle_for"] is not None else -1))
    servers = []
    for upstream in proxy.upstreams.values():
        admission = upstream.gate.admission
        snap = upstream.capacity
        servers.append({
            "server": str(upstream.address),
            "capacity": snap.capacity,
            "blind": snap.blind,
            "why": snap.why or None,
            "max_connections": snap.max_connections,
            "superuser_reserved": snap.superuser_reserved,
            "reserved": snap.reserved,
            "headroom": snap.headroom,
            "usable": snap.usable,
            "external": snap.external,
            "own": len(admission.holders),
            "peers": snap.peers,
            "waiting": admission.waiting,
            "connecting": len(admission.connecting),
            "paused": admission.paused,
            "retired": upstream.retired,
            "classes": [
                {"class": name, "weight": lane.config.weight, "min_slots": lane.config.min_slots,
                 "max_slots": lane.config.max_slots, "held": len(lane.holders), "waiting": lane.waiting}
                for name, lane in admission.lanes.items()
            ],
        })
    return {"time": round(wall, 3), "accepting": not proxy.stopping, "waiting": waiting,
            "sessions": sessions, "servers": servers}

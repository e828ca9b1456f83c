"""`slotproxy demo`: one burst of clients against a throwaway server, without and with the proxy.

A thin call of the load-test harness (`python -m loadtest --spawn burst`):
it spawns the server and slotproxy, runs the burst against each, and prints
the harness's table.
"""

from __future__ import annotations

from loadtest.clients import Outcome, one_client
from loadtest.context import Context, Knobs
from loadtest.progress import Progress
from loadtest.report import render
from loadtest.scenarios import run_sessions
from loadtest.spawn import Environment, SpawnOptions

__all__ = ["Outcome", "one_client", "run_demo"]


async def run_demo(clients: int = 100, max_connections: int = 10, hold: float = 0.5) -> int:
    reserved = min(3, max_connections - 2)
    slots = max_connections - reserved
    print(f"Starting a throwaway PostgreSQL: max_connections={max_connections}, "
          f"{reserved} of them reserved for superusers, and slotproxy in front of it "
          f"(admission.max_backend_slots={slots}) ...", flush=True)
    options = SpawnOptions(max_connections=max_connections, reserved=reserved, proxy_slots=slots,
                           queue_timeout=60, kinds=("direct", "slotproxy"))
    async with Environment(options) as env:
        print(f"{clients} clients arrive at once; each holds a session for {hold:g} s, "
              "first straight at the server, then through slotproxy.\n", flush=True)
        section = await run_sessions("burst", Context.spawned(env, Knobs(clients=clients, hold=hold),
                                                              Progress()))
    print("\n" + render(section))
    print("\nMore scenarios, PgBouncer beside it, JSON and PNG: python -m loadtest --help")
    proxied = next(r for r in section["results"] if r["target"] == "slotproxy")
    return 0 if proxied["succeeded"] == proxied["attempts"] else 1

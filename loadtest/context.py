"""The knobs of every scenario and what a scenario gets to run with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .procs import run_captured
from .progress import Progress
from .spawn import Environment
from .targets import Target, UsageError, mask_passwords


@dataclass(slots=True)
class Knobs:
    """Every scenario's knobs; None means "the scenario's own default" (see DEFAULTS)."""

    # a client's session
    hold: float | None = None
    query: str = "select 1"
    think: float = 0.02
    connect_timeout: float | None = None
    # burst
    clients: int = 100
    # churn, leak, external, restart: arrivals at a rate (Poisson, seeded) for a duration
    rate: float | None = None
    duration: float = 5.0
    seed: int = 1
    leaked: int = 5
    external: int = 8
    external_at: float | None = None
    external_for: float | None = None
    restart_at: float | None = None
    restart_command: str | None = None
    sample_interval: float = 0.1
    # pgbench
    pgbench_clients: int = 8
    pgbench_jobs: int = 2
    pgbench_seconds: int = 10
    pgbench_scale: int = 1
    pgbench_init: bool = False
    protocols: list[str] = field(default_factory=lambda: ["simple", "extended"])
    reconnect: list[bool] = field(default_factory=lambda: [False, True])
    rounds: int = 3
    # measurements
    relay_mb: int = 50
    waiters: int = 5000
    handoffs: int = 300
    instr_connections: int = 200
    instr_transactions: int = 8000


# Per scenario: the hold and the rate when not given.
DEFAULTS = {
    "burst": {"hold": 0.5},
    "churn": {"hold": 0.0, "rate": 100.0},
    "leak": {"hold": 0.5, "rate": 30.0},
    "external": {"hold": 0.5, "rate": 30.0},
    "restart": {"hold": 0.5, "rate": 30.0},
}


@dataclass(slots=True)
class Context:
    targets: list[Target]
    knobs: Knobs
    progress: Progress
    env: Environment | None = None
    server_dsn: str | None = None  # the server itself, bypassing every proxy
    slots: dict[str, int] = field(default_factory=dict)  # target name -> its server slots (waiters)

    @classmethod
    def spawned(cls, env: Environment, knobs: Knobs, progress: Progress) -> Context:
        """For the targets `--spawn` started: the server is known, and the proxies' slots.

        The forwarder has no slot limit (it opens a server session per client), so `waiters`
        skips it.
        """
        return cls(env.targets, knobs, progress, env=env, server_dsn=env.server_dsn,
                   slots={t.name: env.options.slots for t in env.targets
                          if t.kind in ("slotproxy", "pgbouncer")})

    def moment(self, name: str) -> float:
        """external_at, external_for, restart_at: a third of the duration unless given."""
        value = getattr(self.knobs, name)
        return self.knobs.duration / 3 if value is None else value

    def knob(self, scenario: str, name: str) -> float:
        value = getattr(self.knobs, name)
        return DEFAULTS[scenario][name] if value is None else value

    @property
    def proxy_cpus(self) -> frozenset[int] | None:
        """Where the proxies a measurement starts itself run (--proxy-cpus); None: anywhere."""
        if self.env is None or not self.env.options.proxy_cpus:
            return None
        return self.env.options.proxy_cpus

    @property
    def connect_timeout(self) -> float:
        if self.knobs.connect_timeout is not None:
            return self.knobs.connect_timeout
        # Above the proxies' queue timeout, so that the proxy decides, not the client.
        return self.env.options.queue_timeout + 10 if self.env else 60.0

    async def settle(self) -> None:
        if self.env is not None:
            await self.env.settle()

    def require(self, scenario: str) -> None:
        """Raise UsageError when `scenario` needs what was not given (checked before any runs)."""
        if scenario == "external" and not self.server_dsn:
            raise UsageError("external needs --server DSN (the server itself, bypassing the proxies) "
                             "or --spawn")
        if scenario == "restart" and self.restarter() is None:
            raise UsageError("restart needs --restart-command CMD (restarts your server) or --spawn")

    def restarter(self) -> Callable[[], Awaitable[None]] | None:
        if self.knobs.restart_command:
            return lambda: run_shell(self.knobs.restart_command or "")
        if self.env is not None:
            return self.env.restart_server
        return None


async def run_shell(command: str, timeout: float = 300) -> None:
    status, out, _ = await run_captured(["/bin/sh", "-c", command], timeout)
    if status != 0:
        tail = out.decode(errors="replace")[-500:]
        raise RuntimeError(f"{mask_passwords(command)!r} exited with {status}: {tail}")

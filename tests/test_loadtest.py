"""The load-test harness, briefly, against servers it spawns: each scenario's JSON holds what its table shows.

Timings are never asserted (the machine is shared and noisy); who succeeded,
who was refused and with which SQLSTATE, are.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from loadtest import callgrind, plot
from loadtest.cli import new_file
from loadtest.context import Context, Knobs
from loadtest.measure import handoff, relay, waiters
from loadtest.pgbench import run as run_pgbench
from loadtest.procs import cpu_list, pgbouncer_binary, run_captured
from loadtest.progress import Progress
from loadtest.report import render
from loadtest.scenarios import run_sessions
from loadtest.spawn import Environment, SpawnOptions
from slotproxy.cluster import Template

from .conftest import wait_until

# A small server: 5 slots for the application role, 1 reserved for the superuser.
SMALL = {"max_connections": 6, "reserved": 1}
LOADTEST = [sys.executable, "-m", "loadtest"]


async def harness(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """`python -m loadtest ARGS`: exit code, stdout, stderr. Stopped by SIGTERM if it
    overruns or the test fails (the harness then stops what it started), killed if that
    does not end it."""
    proc = await asyncio.create_subprocess_exec(*LOADTEST, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await stop_harness(proc)
    return proc.returncode, stdout.decode(), stderr.decode()  # type: ignore[return-value]


async def stop_harness(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()


@pytest.fixture
async def spawn(pg_template: Template) -> AsyncIterator[Callable[..., Any]]:
    started: list[Environment] = []

    async def make(**options: Any) -> Environment:
        options = {**SMALL, "kinds": ("direct", "slotproxy"), **options}
        env = Environment(SpawnOptions(**options), template=pg_template)
        started.append(env)
        return await env.__aenter__()

    yield make
    errors = []
    for env in started:  # each, even if another failed
        try:
            await env.close()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


def context(env: Environment, **knobs: Any) -> Context:
    return Context.spawned(env, Knobs(**knobs), Progress(enabled=False))


def by_target(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["target"]: r for r in section["results"]}


def table_row(table: str, label: str) -> list[str]:
    """The cells of the row `label` in a rendered table."""
    for line in table.splitlines():
        if line.startswith(label + "  "):
            return line[len(label):].split()
    raise AssertionError(f"no row {label!r} in:\n{table}")


def assert_accounted(result: dict[str, Any]) -> None:
    """Every attempt either succeeded, was refused, or broke, and the timeline saw the run."""
    assert result["attempts"] == (result["succeeded"] + sum(result["refused"].values())
                                  + sum(result["failed_first_query"].values())
                                  + sum(result["broken"].values())), result
    assert sum(result["messages"].values()) == result["attempts"] - result["succeeded"]
    timeline = result["timeline"]
    assert timeline["t"] and timeline["errors"][-1] == result["attempts"] - result["succeeded"]
    json.dumps(result, allow_nan=False)


# -- burst: the acceptance test ----------------------------------------------------------------


async def test_burst_direct_reports_the_servers_53300_refusals_and_slotproxy_none(spawn: Any) -> None:
    env = await spawn()
    section = await run_sessions("burst", context(env, clients=30, hold=0.2))
    results = by_target(section)
    direct, proxied = results["direct"], results["slotproxy"]
    for r in (direct, proxied):
        assert r["attempts"] == 30
        assert_accounted(r)

    assert set(direct["refused"]) == {"53300"} and direct["refused"]["53300"] > 0, direct["refused"]
    assert direct["succeeded"] == 30 - direct["refused"]["53300"]
    assert all(m.startswith("53300: ") for m in direct["messages"]), direct["messages"]
    assert proxied["succeeded"] == 30 and proxied["refused"] == {} and proxied["broken"] == {}
    assert proxied["connect_wait_s"]["max"] > 0.2  # some waited for a slot a holder gave back
    assert proxied["ratio_to_first"]["succeeded"] == 30 / direct["succeeded"]

    # The table shows the same figures.
    table = render(section)
    assert table_row(table, "attempts") == ["30", "30"]
    assert table_row(table, "succeeded")[:2] == [str(direct["succeeded"]), "30"]
    assert table_row(table, "refused 53300") == [str(direct["refused"]["53300"]), "0"]
    told = [int(n) for n in re.findall(r"^ +(\d+) x direct: 53300: ", table, re.M)]
    assert sum(told) == direct["refused"]["53300"], table


async def test_burst_from_the_command_line_writes_json_matching_its_table(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    code, text, stderr = await harness(
        "--spawn", "--spawn-targets", "direct,slotproxy", "--max-connections", "6",
        "--reserved", "1", "burst", "--clients", "20", "--hold", "0.2", "--json", str(out),
        "--png-dir", str(tmp_path), timeout=120)
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    [section] = doc["scenarios"]
    results = by_target(section)
    assert [t["name"] for t in doc["targets"]] == ["direct", "slotproxy"]
    assert table_row(text, "attempts") == ["20", "20"]
    assert table_row(text, "succeeded")[:2] == [str(results["direct"]["succeeded"]),
                                                str(results["slotproxy"]["succeeded"])]
    assert results["slotproxy"]["succeeded"] == 20
    assert f"Every figure: {out}" in text
    assert doc["png"] or plot.HOW_TO_GET in text
    assert "burst direct:" in stderr  # the progress line


# -- the other incidents -----------------------------------------------------------------------


async def test_churn_makes_one_connection_per_request_on_the_same_schedule_everywhere(spawn: Any) -> None:
    env = await spawn()
    section = await run_sessions("churn", context(env, rate=40, duration=1.0, seed=7))
    rng = random.Random(7)
    expected, at = 0, rng.expovariate(40)
    while at < 1.0:
        expected, at = expected + 1, at + rng.expovariate(40)
    for r in section["results"]:
        assert r["attempts"] == expected and r["succeeded"] == expected, r
        assert r["queries"] == expected  # hold 0: one query per connection
        assert_accounted(r)
    assert table_row(render(section), "attempts") == [str(expected)] * 2


async def test_leak_takes_slots_for_good_and_slotproxy_makes_the_rest_wait(spawn: Any) -> None:
    env = await spawn()
    section = await run_sessions("leak", context(env, leaked=3, rate=20, duration=1.5, hold=0.3))
    results = by_target(section)
    for r in results.values():
        assert r["extra"]["leaked held"] == 3
        assert_accounted(r)
    assert results["direct"]["refused"].get("53300", 0) > 0, results["direct"]
    assert results["slotproxy"]["succeeded"] == results["slotproxy"]["attempts"]
    assert table_row(render(section), "leaked held") == ["3", "3"]


async def test_external_connections_take_slots_and_a_proxy_sized_for_them_refuses_nobody(
        spawn: Any) -> None:
    # 5 usable slots: 3 taken from outside mid-run, so slotproxy is given the other 2.
    env = await spawn(proxy_slots=2)
    section = await run_sessions("external", context(env, external=3, external_at=0.2, external_for=1.0,
                                                      rate=15, duration=1.5, hold=0.3))
    results = by_target(section)
    for r in results.values():
        assert r["extra"]["external held"] == 3, r["extra"]
        assert [what for _, what in r["marks"]] == ["3 external connections", "external connections closed"]
        assert_accounted(r)
    assert results["slotproxy"]["refused"] == {} and results["slotproxy"]["broken"] == {}
    assert table_row(render(section), "external held") == ["3", "3"]


async def _postmaster_started(env: Environment) -> Any:
    conn = await asyncpg.connect(env.superuser_dsn)
    try:
        return await conn.fetchval("select pg_postmaster_start_time()")
    finally:
        await conn.close()


async def test_restart_mid_run_new_clients_wait_through_slotproxy(spawn: Any) -> None:
    env = await spawn()
    before = await _postmaster_started(env)
    section = await run_sessions("restart", context(env, rate=15, duration=1.5, hold=0.2, restart_at=0.4))
    assert await _postmaster_started(env) > before  # the server did restart
    results = by_target(section)
    for r in results.values():
        assert [what for _, what in r["marks"]] == ["server restart begins", "server is back"]
        assert r["extra"]["restart took s"] > 0
        assert_accounted(r)
    # Sessions open at the restart may break (57P01 and its kin), but no client is refused.
    assert results["slotproxy"]["refused"] == {}, results["slotproxy"]["messages"]
    table = render(section)
    assert table_row(table, "attempts") == [str(results["direct"]["attempts"]),
                                            str(results["slotproxy"]["attempts"])]
    assert table_row(table, "succeeded")[:2] == [str(results["direct"]["succeeded"]),
                                                 str(results["slotproxy"]["succeeded"])]


async def test_restart_by_your_own_command_returns_once_the_server_is_back(spawn: Any) -> None:
    # Under uvloop the command held extra copies of its output pipe, and pg_ctl's new server
    # inherited them (-l moves only its stdout and stderr): the harness must wait for the
    # command, not for its output to end (it waited 300 s, then failed).
    env = await spawn()
    assert env.cluster is not None and env.template is not None
    template = env.template
    pg_ctl = [str(template.bindir / "pg_ctl"), "-D", str(env.cluster.datadir), "-l",
              str(env.cluster.logfile), "-w", "-m", "fast", "restart"]
    if template.account is not None:  # postgres refuses root: as the clusters of the tests run
        pg_ctl = ["runuser", "-u", template.account.pw_name, "--", *pg_ctl]
    before = await _postmaster_started(env)
    section = await asyncio.wait_for(run_sessions("restart", context(
        env, rate=10, duration=1.0, hold=0.1, restart_at=0.2, restart_command=shlex.join(pg_ctl))), 90)
    assert await _postmaster_started(env) > before
    for r in section["results"]:
        assert r["extra"]["restart took s"] > 0
    assert section["params"]["restart_command"] == shlex.join(pg_ctl)


async def test_a_command_is_waited_for_not_the_daemons_it_leaves_holding_its_output() -> None:
    status, out, _ = await run_captured(["/bin/sh", "-c", "sleep 600 & echo $!"], timeout=30)
    os.kill(int(out.split()[0]), signal.SIGKILL)
    assert status == 0


async def test_the_json_records_the_moments_the_scenario_used(spawn: Any) -> None:
    env = await spawn(kinds=("slotproxy",))
    section = await run_sessions("external", context(env, external=1, rate=5, duration=0.6, hold=0.1))
    assert section["params"]["external_at"] == section["params"]["external_for"] == pytest.approx(0.2)
    [result] = section["results"]
    assert result["marks"][0][0] >= 0.2  # when the outsiders came


# -- measurements -----------------------------------------------------------------------------


async def test_pgbench_interleaved_rounds_with_and_without_a_connection_per_transaction(
        spawn: Any) -> None:
    env = await spawn()
    section = await run_pgbench(context(env, pgbench_seconds=1, rounds=1, pgbench_clients=2,
                                        pgbench_jobs=1, protocols=["simple", "extended"],
                                        reconnect=[False, True]))
    assert list(section["variants"]) == ["simple", "extended", "simple -C", "extended -C"]
    table = render(section)
    for variant, res in section["variants"].items():
        for name in ("direct", "slotproxy"):
            [run] = res[name]["runs"]
            assert run["exit"] == 0 and "error" not in run, run
            assert run["tps"] > 0 and run["transactions"] > 0 and run["failed"] == 0
        assert res["direct"]["ratio_to_first"] == 1.0
        assert res["slotproxy"]["proxy_cpu_us_per_tx_median"] is not None
        assert res["direct"]["proxy_cpu_us_per_tx_median"] is None  # no process of its own
        assert table_row(table, f"tps {variant}")[0] == f"{res['direct']['tps_median']:,.0f}"
        # The whole machine's CPU: pgbench and the server, and the proxy's own within it.
        machine = res["slotproxy"]["machine_cpu_us_per_tx_median"]
        assert machine >= res["slotproxy"]["proxy_cpu_us_per_tx_median"] > 0
        assert res["direct"]["machine_cpu_us_per_tx_median"] > 0
        assert 0 < res["direct"]["machine_kernel_share_median"] < 1
        [ratio] = [m / d for m, d in zip([r["machine_cpu_us_per_tx"] for r in res["slotproxy"]["runs"]],
                                          [r["machine_cpu_us_per_tx"] for r in res["direct"]["runs"]],
                                          strict=True)]  # one round: its own ratio
        assert res["slotproxy"]["machine_ratio_to_first"] == ratio
        assert table_row(table, f"machine CPU us/tx {variant}") == [
            f"{res['direct']['machine_cpu_us_per_tx_median']:,.1f}", f"{machine:,.1f}", f"{ratio:.2f}x"]


async def test_pgbench_rounds_interleave_the_targets_and_pair_each_rounds_runs(spawn: Any) -> None:
    env = await spawn()
    section = await run_pgbench(context(env, pgbench_seconds=1, rounds=2, pgbench_clients=2,
                                        pgbench_jobs=1, protocols=["simple"], reconnect=[False]))
    assert section["order"] == ["1 simple direct", "1 simple slotproxy", "2 simple direct",
                                "2 simple slotproxy"]
    res = section["variants"]["simple"]
    per_round = [p["tps"] / d["tps"] for p, d in zip(res["slotproxy"]["runs"], res["direct"]["runs"],
                                                      strict=True)]
    assert res["slotproxy"]["ratio_to_first"] == pytest.approx(sum(per_round) / 2)  # their median


async def test_relay_reads_the_whole_result_through_every_target(spawn: Any) -> None:
    env = await spawn(kinds=("direct", "slotproxy", "forwarder"))
    ctx = context(env, relay_mb=4, rounds=2)
    section = await relay(ctx)
    assert [r["target"] for r in section["results"]] == ["direct", "slotproxy", "forwarder"]
    for r in section["results"]:
        # Each run is a psql that read the whole result: relay raises otherwise (see the
        # test of a target that refuses every connection).
        assert len(r["runs"]) == 2 and r["mib_per_s_median"] > 0
    assert by_target(section)["forwarder"]["proxy_cpu_s_median"] is not None
    assert "forwarder" not in ctx.slots
    waiting = by_target(await waiters(context(env, waiters=20)))
    assert waiting["forwarder"]["skipped"] == "a bare forwarder has no queue: nobody waits"
    assert waiting["slotproxy"]["waiting"] == 20
    assert table_row(render(section), "MiB/s")[0] == f"{section['results'][0]['mib_per_s_median']:,.1f}"


@pytest.mark.skipif(pgbouncer_binary() is None, reason="pgbouncer is not installed")
async def test_unpooled_pgbouncer_gives_each_client_a_server_session_of_its_own(spawn: Any) -> None:
    env = await spawn(kinds=("direct", "pgbouncer", "pgbouncer-unpooled"))
    ctx = context(env, waiters=10)
    pids = {}
    for target in env.targets[1:]:
        seen = []
        for _ in range(3):  # one after another: a pool would hand the same session on
            conn = await asyncpg.connect(target.dsn, timeout=10)
            seen.append(await conn.fetchval("select pg_backend_pid()"))
            await conn.close()
        pids[target.kind] = seen
    assert len(set(pids["pgbouncer"])) == 1
    assert len(set(pids["pgbouncer-unpooled"])) == 3
    waiting = by_target(await waiters(ctx))
    assert waiting["pgbouncer-unpooled"]["skipped"] == "the same queue as pgbouncer's"
    assert waiting["pgbouncer"]["waiting"] == 10


@pytest.mark.skipif(callgrind.valgrind_binaries() is None, reason="valgrind is not installed")
async def test_instructions_counts_each_proxy_per_connection_and_per_transaction(spawn: Any) -> None:
    bouncers = ("pgbouncer", "pgbouncer-unpooled") if pgbouncer_binary() else ()
    env = await spawn(kinds=("direct", "slotproxy", *bouncers))
    section = await callgrind.instructions(context(env, instr_connections=20, instr_transactions=400))
    results = by_target(section)
    assert list(results) == ["slotproxy", *bouncers, "forwarder"]
    if bouncers:  # logging in to the server for each client costs the unpooled one more
        assert results["pgbouncer-unpooled"]["per_connection"] > results["pgbouncer"]["per_connection"]
    for r in results.values():
        assert r["per_connection"] > 0 and r["per_transaction"] > 0, r
    # A session costs more than a transaction on it; the bare forwarder sets up a connection
    # with less than slotproxy (no startup parsing, no queue).
    proxy, floor = results["slotproxy"], results["forwarder"]
    assert proxy["per_connection"] > proxy["per_transaction"]
    assert floor["per_connection"] < proxy["per_connection"]
    assert table_row(render(section), "per connection")[0] == f"{proxy['per_connection']:,}"


async def test_instructions_says_what_it_needs(spawn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    section = await callgrind.instructions(Context([], Knobs(), Progress(enabled=False)))
    assert "needs --spawn" in render(section)
    monkeypatch.setattr(callgrind.shutil, "which", lambda name: None)
    section = await callgrind.instructions(context(await spawn()))
    assert "apt-get install valgrind" in render(section) and section["results"] == []


async def test_waiters_counts_the_proxys_memory_with_every_client_left_waiting(spawn: Any) -> None:
    env = await spawn()
    section = await waiters(context(env, waiters=200))
    results = by_target(section)
    assert "skipped" in results["direct"]  # no process of its own to measure
    proxied = results["slotproxy"]
    assert proxied["waiting"] == 200 and proxied["closed_by_proxy"] == 0
    assert proxied["answered_before_slot"] == 0  # waiting clients are told nothing
    assert proxied["rss_with_bytes"] >= proxied["rss_before_bytes"] > 0
    assert table_row(render(section), "clients waiting") == ["200"]


async def test_handoff_times_each_slot_from_its_release_to_the_next_waiters_startup(spawn: Any) -> None:
    env = await spawn(kinds=("slotproxy",))
    section = await handoff(context(env, handoffs=20))
    results = by_target(section)
    assert results["direct"]["samples"] == results["slotproxy"]["samples"] == 20
    for key in ("startup_s", "query_s", "client_s"):
        figures = results["slotproxy"][key]
        assert 0 < figures["p50"] <= figures["p99"] <= figures["max"], (key, figures)
    # The waiter's startup reaches the server before its query does.
    assert results["slotproxy"]["startup_s"]["p50"] <= results["slotproxy"]["query_s"]["p50"]


@pytest.mark.skipif(pgbouncer_binary() is None, reason="pgbouncer is not installed")
@pytest.mark.parametrize("server_socket", [False, True], ids=["tcp", "server-socket"])
async def test_pgbouncer_in_session_mode_beside_slotproxy(spawn: Any, server_socket: bool) -> None:
    env = await spawn(kinds=("direct", "slotproxy", "pgbouncer"), server_socket=server_socket)
    assert [t.kind for t in env.targets] == ["direct", "slotproxy", "pgbouncer"]
    section = await run_sessions("burst", context(env, clients=20, hold=0.2))
    results = by_target(section)
    assert results["pgbouncer"]["succeeded"] == 20, results["pgbouncer"]["messages"]
    assert "PgBouncer logs clients in itself" in render(section)
    # The server shows a session over its Unix socket with client_port -1.
    for target in env.targets:
        conn = await asyncpg.connect(target.dsn)
        port = await conn.fetchval("select client_port from pg_stat_activity where pid = pg_backend_pid()")
        await conn.close()
        over_socket = server_socket and target.kind != "direct"
        assert (port == -1) == over_socket, (target.kind, port)


# -- PNGs, and stopping everything --------------------------------------------------------------


def _section_with_one_result() -> dict[str, Any]:
    return {"scenario": "burst", "kind": "sessions", "results": [{
        "target": "slot proxy", "succeeded": 2, "attempts": 3, "refused": {"53300": 1},
        "failed_first_query": {}, "broken": {},
        "marks": [[0.5, "server restart begins"]],
        "timeline": {"t": [0, 0.1, 0.2], "open": [0, 2, 0], "waiting": [3, 1, 0], "errors": [0, 1, 1]}}]}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to give the proxies one")
async def test_proxy_cpus_gives_the_proxies_a_cpu_and_the_server_and_pgbench_the_others(
        spawn: Any) -> None:
    ours = os.sched_getaffinity(0)
    proxies = {max(ours)}
    kinds = ("direct", "slotproxy", "pgbouncer") if pgbouncer_binary() else ("direct", "slotproxy")
    env = await spawn(kinds=kinds, proxy_cpus=frozenset(proxies))
    assert env.cluster is not None
    others = ours - proxies
    postmaster = int((env.cluster.datadir / "postmaster.pid").read_text().split()[0])
    assert os.sched_getaffinity(postmaster) == others  # its backends inherit it
    assert os.sched_getaffinity(0) == others  # so do pgbench and psql, started by us
    for target in env.targets[1:]:
        assert target.pid is not None and os.sched_getaffinity(target.pid) == proxies, target
    assert env.describe()["proxy_cpus"] == sorted(proxies)
    assert env.describe()["other_cpus"] == sorted(others)
    assert f"proxies on CPU {cpu_list(proxies)}" in env.notes[-1]

    section = await run_pgbench(context(env, pgbench_seconds=1, rounds=1, pgbench_clients=2,
                                        pgbench_jobs=1, protocols=["simple"], reconnect=[True]))
    for name in (t.name for t in env.targets):
        [run] = section["variants"]["simple -C"][name]["runs"]
        assert run["exit"] == 0 and run["transactions"] > 0 and run["failed"] == 0, (name, run)
    await env.close()
    assert os.sched_getaffinity(0) == ours  # given back: the test session goes on with every CPU


def test_without_matplotlib_the_report_says_how_to_get_the_png(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    written, why = plot.write([_section_with_one_result()], tmp_path, "run")
    assert written == [] and "pip install 'slotproxy[plot]'" in why
    assert list(tmp_path.iterdir()) == []


def test_with_matplotlib_one_png_per_scenario_and_target(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written, why = plot.write([_section_with_one_result()], tmp_path, "run")
    assert why == "" and written == [tmp_path / "run-burst-slot_proxy.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_interrupted_run_stops_what_it_started(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *LOADTEST, "--spawn", "--spawn-targets", "slotproxy", "burst", "--clients", "5", "--hold", "600",
        "--json", str(tmp_path / "never.json"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        [port] = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
        await wait_until(lambda: _listening(port), "the spawned slotproxy to listen")
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await stop_harness(proc)
    assert proc.returncode == 1, err.decode()
    assert "interrupted; everything it started is stopped" in err.decode()
    assert not _listening(port)
    assert not (tmp_path / "never.json").exists()


async def test_a_target_that_refuses_every_connection_is_reported_and_what_finished_is_kept(
        tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    out = tmp_path / "run.json"
    # burst records the refusals; relay cannot run at all through it, and stops the run.
    code, stdout, stderr = await harness(
        "--target", f"nobody=postgresql://app:s3cret@127.0.0.1:{port}/postgres", "burst",
        "relay", "--clients", "3", "--connect-timeout", "5", "--json", str(out), "--no-png", "--quiet")
    assert code == 1, stderr
    assert "loadtest: relay through nobody: psql failed" in stderr
    doc = json.loads(out.read_text())
    assert doc["incomplete"].startswith("1 of 2 finished; then RuntimeError: relay through nobody")
    [result] = doc["scenarios"][0]["results"]
    assert result["refused"] == {"ConnectionRefusedError": 3} and result["succeeded"] == 0
    assert table_row(stdout, "refused ConnectionRefusedError") == ["3"]
    assert "s3cret" not in out.read_text() and "app:***@" in " ".join(doc["command"])


@pytest.mark.parametrize(("args", "problem"), [
    (["burst"], "give either --spawn or at least one --target NAME=DSN"),
    (["--target", "x=http://db", "burst"], "--target x: expected a postgresql:// URI"),
    (["--spawn", "churn", "--rate", "0"], "--rate: must be above 0"),
    (["--spawn", "--spawn-targets", "direct,pgpool", "burst"], "--spawn-targets: unknown target 'pgpool'"),
    (["--spawn", "--reserved", "0", "burst"], "--reserved: must be at least 1"),
    # Checked before anything runs, not when external's turn comes after burst.
    (["--target", "x=postgresql://app@127.0.0.1:9/postgres", "burst", "external"], "external needs --server"),
    (["--target", "x=postgresql://app@127.0.0.1:9/postgres", "--pid", "y=1", "burst"],
     "--pid/--slots y: no target has that name"),
    (["--target", "x=postgresql://app@127.0.0.1:9/postgres", "--proxy-cpus", "0", "burst"],
     "--proxy-cpus: only with --spawn"),
    (["--spawn", "--proxy-cpus", "1-x", "burst"], "--proxy-cpus '1-x': expected CPU numbers"),
    (["--spawn", "--proxy-cpus", "4096", "burst"], "--proxy-cpus: CPU 4096 is not available"),
    (["--spawn", "--proxy-cpus", "0,3-1", "burst"], "--proxy-cpus '0,3-1': the range 3-1 runs backwards"),
    (["--spawn", "--proxy-cpus", "\u00b2", "burst"], "--proxy-cpus '\u00b2': expected CPU numbers"),
    (["--target", "x=postgresql://app:s3cret@[::1/postgres", "burst"], "--target x: Invalid IPv6 URL"),
    (["--spawn", "--proxy-cpus", cpu_list(os.sched_getaffinity(0)), "burst"],
     "--proxy-cpus: leaves no CPU for the server"),
    (["--target", "x=postgresql://app@127.0.0.1:9/postgres", "--max-connections", "5", "burst"],
     "--max-connections: only with --spawn"),
    # NAME= left out: the URI's own '=' is not taken for it, and the password is not shown.
    (["--target", "postgresql://app:s3cret@127.0.0.1:9/postgres?sslmode=disable", "burst"],
     "--target 'postgresql://app:***@127.0.0.1:9/postgres?sslmode=disable': expected NAME=DSN"),
    (["--target", "x=host=127.0.0.1 password=s3cret", "burst"],
     "--target x: expected a postgresql:// URI, got 'host=127.0.0.1 password=***'"),
    (["--target", "x=postgresql://app@127.0.0.1:99999/postgres", "burst"], "--target x: Port out of range"),
])
async def test_bad_usage_exits_2_saying_what_is_wrong(args: list[str], problem: str) -> None:
    code, _, err = await harness(*args)
    assert code == 2
    assert err.startswith(f"loadtest: {problem}"), err
    assert "s3cret" not in err


async def test_a_failing_restart_command_is_reported_in_one_line_and_its_password_masked(
        tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens: the clients are refused at once
    out = tmp_path / "run.json"
    code, _, err = await harness(
        "--target", f"x=postgresql://app@127.0.0.1:{port}/postgres", "burst", "restart",
        "--clients", "2", "--rate", "5", "--duration", "0.5", "--restart-at", "0.1",
        "--restart-command", "PGPASSWORD=s3cret false", "--json", str(out), "--no-png", "--quiet")
    assert code == 1, err
    assert err.strip().splitlines()[-1] == "loadtest: 'PGPASSWORD=*** false' exited with 1:", err
    assert "Traceback" not in err and "s3cret" not in err
    doc = json.loads(out.read_text())
    assert doc["incomplete"] == "1 of 2 finished; then RuntimeError: 'PGPASSWORD=*** false' exited with 1: "
    assert "s3cret" not in out.read_text()


async def test_failed_pgbench_runs_are_shown_with_pgbenchs_error_and_the_run_exits_1(
        tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, stdout, stderr = await harness(
        "--target", f"x=postgresql://app@127.0.0.1:{port}/postgres", "pgbench",
        "--pgbench-seconds", "1", "--rounds", "1", "--protocols", "simple", "--reconnect", "no",
        "--json", str(tmp_path / "run.json"), "--quiet")
    assert code == 1, stderr
    assert "loadtest: 1 pgbench runs failed" in stderr
    assert re.search(r"^  x simple: pgbench: error: connection to server .* failed", stdout, re.M), stdout
    assert json.loads((tmp_path / "run.json").read_text())["scenarios"][0]["failed_runs"] == 1


def test_runs_started_in_the_same_second_keep_a_json_file_each(tmp_path: Path) -> None:
    first = new_file(tmp_path / "results", "run-20261122-055548", ".json")
    second = new_file(tmp_path / "results", "run-20261122-055548", ".json")
    assert (first.name, second.name) == ("run-20261122-055548.json", "run-20261122-055548-2.json")
    assert first.exists() and second.exists()

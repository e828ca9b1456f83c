"""What the Dockerfile relies on, checked without a Docker engine (none runs here):
its config edit gives a valid file, and its HEALTHCHECK command works against it."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from slotproxy import config
from slotproxy.cluster import Cluster, free_port

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def instruction(name: str) -> str:
    [only] = instructions(name)
    return only


def image_config(tmp_path: Path) -> Path:
    """config.example.toml edited by the Dockerfile's own sed command."""
    target = tmp_path / "config.toml"
    target.write_text((ROOT / "config.example.toml").read_text())
    sed = next(part for run in instructions("RUN") for part in run.split("&&")
               if part.strip().startswith("sed"))
    argv = shlex.split(sed.replace("/etc/slotproxy/config.toml", str(target)))
    subprocess.run(argv, check=True)
    return target


def test_the_image_runs_the_proxy_as_a_non_root_user_and_stops_on_sigterm() -> None:
    assert instruction("USER") not in ("root", "0")
    assert instruction("STOPSIGNAL") == "SIGTERM"  # the CLI's graceful shutdown
    assert instruction("ENTRYPOINT") == '["slotproxy"]'
    assert instruction("CMD") == '["run", "--config", "/etc/slotproxy/config.toml"]'
    assert '"health", "--config", "/etc/slotproxy/config.toml"' in instruction("HEALTHCHECK")


def test_the_image_config_listens_for_clients_and_health(tmp_path: Path) -> None:
    cfg = config.load(str(image_config(tmp_path)))
    assert str(cfg.proxy.listen) == "0.0.0.0:6432"
    assert str(cfg.admin.listen) == "127.0.0.1:6433"


async def test_the_healthcheck_command_passes_against_a_running_proxy(pg: Cluster, tmp_path: Path) -> None:
    path = image_config(tmp_path)
    port, admin = free_port(), free_port()
    text = path.read_text().replace('"0.0.0.0:6432"', f'"127.0.0.1:{port}"') \
        .replace('"127.0.0.1:6433"', f'"127.0.0.1:{admin}"') \
        .replace('port = 5432', f'port = {pg.port}')
    loaded = config.from_mapping(tomllib.loads(text), "test")  # the tests stay on loopback
    assert (str(loaded.proxy.listen), str(loaded.admin.listen), loaded.backend.port) == \
        (f"127.0.0.1:{port}", f"127.0.0.1:{admin}", pg.port)
    path.write_text(text)

    async def healthcheck() -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "slotproxy", "health", "--config", str(path),
            stderr=asyncio.subprocess.DEVNULL)
        return await proc.wait()

    assert await healthcheck() == 1, "nothing answers yet"
    proxy = await asyncio.create_subprocess_exec(sys.executable, "-m", "slotproxy", "run", "--config",
                                                 str(path), stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            async for line in proxy.stderr:  # type: ignore[union-attr]
                if b"admin endpoints on" in line:
                    break
        assert await healthcheck() == 0
    finally:
        proxy.terminate()
        await proxy.wait()

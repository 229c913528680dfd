"""The `powerbank` CLI as a user runs it: help, a taken port, and `up` on embedded defaults."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

POWERBANK = str(Path(sys.executable).with_name("powerbank"))


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "RAY_ADDRESS")}
    env.update(
        {"DATA_DIR": str(tmp_path / "var"), "HTTP_PORT": str(free_port()), "MQTT_PORT": str(free_port())}
    )
    env.update(extra)
    return env


def _sample(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def test_help_lists_the_commands() -> None:
    out = subprocess.run([POWERBANK, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("up", "migrate", "admin", "simulate"):
        assert command in out


def test_taken_mqtt_port_fails_fast_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [POWERBANK, "up"],
            env=_env(tmp_path, MQTT_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "MQTT_PORT" in result.stderr and str(port) in result.stderr


@pytest.mark.integration
def test_up_demo_runs_on_embedded_defaults_and_admin_create_works_beside_it(tmp_path: Path) -> None:
    """`make up`: nothing external (embedded PostgreSQL and Valkey, a local Ray, the broker, the API),
    three demo stations whose simulated cabinets connect and become ready."""
    env = _env(tmp_path)
    base = f"http://127.0.0.1:{env['HTTP_PORT']}"
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen([POWERBANK, "up", "--demo"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "powerbank up did not become healthy in 120 s"
            time.sleep(0.5)
        assert httpx.get(f"{base}/docs").status_code == 200
        assert httpx.get(f"{base}/api/rentals/packages").json()["error"]["code"] == "unauthorized"
        while _sample(httpx.get(f"{base}/metrics").text, "powerbank_cabinets_ready") < 3:
            assert time.monotonic() < deadline, "the demo cabinets did not become ready"
            time.sleep(0.5)
        assert (tmp_path / "var" / "demo-cabinets.json").exists()
        printed = (tmp_path / "up.log").read_text()
        assert "curl" in printed
        # no gateway is configured on embedded defaults, and `up` says so (eSewa's test site was on)
        assert "Top-up gateways: khalti off: not configured; esewa off: not configured; stripe off" in printed
        created = subprocess.run(
            [POWERBANK, "admin", "create", "--phone", "+9779800000001", "--role", "operator"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stderr
        assert "+9779800000001" in created.stdout + created.stderr
        assert (tmp_path / "var" / "postgres" / "PG_VERSION").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            log.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_everything_it_started_within_10_s(tmp_path: Path, stop: signal.Signals) -> None:
    """Issue 10, item 12: SIGTERM used to leave embedded PostgreSQL (and Ray's processes) running."""
    import psutil

    env = _env(tmp_path)
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen([POWERBANK, "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{env['HTTP_PORT']}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "powerbank up did not become healthy in 120 s"
            time.sleep(0.5)
        started += psutil.Process(proc.pid).children(recursive=True)
        names = [p.name() for p in started]
        assert any("valkey" in n or "redis" in n for n in names), names
        assert any("raylet" in n or "gcs_server" in n for n in names), names
        postmaster = tmp_path / "var" / "postgres" / "postmaster.pid"  # pg_ctl detaches PostgreSQL
        started.append(psutil.Process(int(postmaster.read_text().split()[0])))
        signalled = time.monotonic()
        proc.send_signal(stop)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(started, timeout=max(0.0, signalled + 10 - time.monotonic()))
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert not postmaster.exists()  # PostgreSQL shut down cleanly
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in started:  # whatever a failed stop left behind must not outlive the test
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        log.close()

"""The product under test, as a user runs it: `powerbank up` in a subprocess, seen from outside.

`Product` starts it on free ports with its own DATA_DIR (embedded PostgreSQL and Valkey, local Ray),
waits for /healthz, and stops it. `ProcessTree` measures CPU seconds and PSS of everything it runs: the
`powerbank up` process and its descendants (Ray's GCS, raylet and workers: broker, kiosk hosts,
scheduler) plus the embedded PostgreSQL and Valkey, found by their data directory.
`Staff` logs in through the API with the one-time codes the file SMS backend writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

STAFF_PHONE = "+9779800000001"
STAFF_PASSWORD = "benchmark staff password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def powerbank_command() -> str:
    """The `powerbank` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("powerbank")
    if not script.exists():
        raise SystemExit(f"{script} is missing: run `make venv` (or `pip install -e .`) first")
    return str(script)


@dataclass
class Product:
    """`powerbank up` with DATA_DIR=`data_dir`, on free ports, logging to `data_dir/product.log`."""

    data_dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    checkout: Path | None = None  # another checkout's code (e.g. an older commit) instead of this one
    http_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def sms_file(self) -> Path:
        return self.data_dir / "sms.jsonl"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "product.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "RAY_ADDRESS")}
        env.update(
            DATA_DIR=str(self.data_dir),
            HTTP_PORT=str(self.http_port),
            MQTT_PORT=str(self.mqtt_port),
            SMS_BACKEND=f"file:{self.sms_file}",
            LOG_LEVEL="WARNING",
        )
        if self.checkout is not None:  # Ray workers import from the driver's working directory too
            env["PYTHONPATH"] = str(self.checkout)
        env.update(self.env_overrides)
        return env

    async def start(self, timeout_s: float = 180.0) -> None:
        self.process = self._spawn()
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise SystemExit(
                        f"`powerbank up` exited ({self.process.returncode}): see {self.log_file}"
                    )
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)
        raise SystemExit(f"`powerbank up` not healthy after {timeout_s:.0f} s: see {self.log_file}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            return subprocess.Popen(
                [powerbank_command(), "up"],
                env=self.env(),
                cwd=self.checkout,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def create_staff(self) -> None:
        """The benchmark's admin, with STAFF_PASSWORD (staff log in with code + password)."""
        subprocess.run(
            [
                powerbank_command(),
                "admin",
                "create",
                "--phone",
                STAFF_PHONE,
                "--role",
                "admin",
                "--password-stdin",
            ],
            env=self.env(),
            cwd=self.checkout,
            check=True,
            capture_output=True,
            input=f"{STAFF_PASSWORD}\n".encode(),
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(2)  # SIGINT: what Ctrl-C does; `up` stops Ray and the embedded services
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            for proc in ProcessTree(self).processes():
                proc.kill()


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    pss_bytes: int
    processes: int


class ProcessTree:
    """Every process of the product: `powerbank up`, its descendants, its embedded PostgreSQL and Valkey."""

    def __init__(self, product: Product) -> None:
        assert product.process is not None
        self.root = psutil.Process(product.process.pid)
        self.data_dir = str(product.data_dir.resolve())
        self._cpu_of_gone = 0.0
        self._last: dict[int, float] = {}

    def processes(self) -> Iterator[psutil.Process]:
        seen: set[int] = set()
        try:
            family = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for proc in family:
            seen.add(proc.pid)
            yield proc
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid in seen:
                continue
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if self.data_dir in cmdline:
                for member in [proc, *proc.children(recursive=True)]:
                    if member.pid not in seen:
                        seen.add(member.pid)
                        yield member

    def cpu_seconds(self) -> float:
        """CPU (user + system) used so far by the product's processes, those that exited included."""
        now: dict[int, float] = {}
        for proc in self.processes():
            try:
                times = proc.cpu_times()
                now[proc.pid] = times.user + times.system + times.children_user + times.children_system
            except psutil.NoSuchProcess:
                continue
        self._cpu_of_gone += sum(v for pid, v in self._last.items() if pid not in now)
        self._last = now
        return self._cpu_of_gone + sum(now.values())

    def usage(self) -> Usage:
        pss = 0
        count = 0
        for proc in self.processes():
            try:
                pss += proc.memory_full_info().pss
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return Usage(cpu_s=self.cpu_seconds(), pss_bytes=pss, processes=count)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of the processes alive now, by what they are (api, kiosk hosts, broker...)."""
        roles: dict[str, float] = {}
        for proc in self.processes():
            try:
                times = proc.cpu_times()
                role = _role(" ".join(proc.cmdline()) or proc.name())
            except psutil.NoSuchProcess:
                continue
            roles[role] = roles.get(role, 0.0) + times.user + times.system
        return roles


def _role(cmdline: str) -> str:
    for marker, role in ROLES:
        if marker in cmdline:
            return role
    return "ray runtime"


ROLES = (
    ("ray::KioskHost", "kiosk hosts"),
    ("ray::BrokerService", "broker"),
    ("ray::Scheduler", "scheduler"),
    ("powerbank up", "api"),
    ("postgres", "postgres"),
    ("valkey", "valkey"),
)


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: after[role] - before.get(role, 0.0) for role in after}


class CodeReader:
    """One-time codes from the file SMS backend, read incrementally (the file only grows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._codes: dict[str, str] = {}

    def code_for(self, phone: str) -> str | None:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self._offset)
                for line in f.read().splitlines():
                    sms = json.loads(line)
                    words = sms["text"].split()
                    if "code" in words:
                        self._codes[sms["to"]] = words[words.index("code") + 2].rstrip(".")
                self._offset = f.tell()
        return self._codes.pop(phone, None)


async def log_in(
    client: httpx.AsyncClient, codes: CodeReader, phone: str, *, password: str | None = None
) -> dict[str, str]:
    """`{"token", "id"}` of `phone`, logged in by one-time code (the account is made on first login); staff
    add their password."""
    response = await client.post("/api/auth/otp/request", json={"identifier": phone})
    response.raise_for_status()
    code = None
    for _ in range(200):
        code = codes.code_for(phone)
        if code is not None:
            break
        await asyncio.sleep(0.01)
    if code is None:
        raise SystemExit(f"no one-time code for {phone} in {codes.path}")
    body = {"identifier": phone, "otp": code} | ({"password": password} if password else {})
    response = await client.post("/api/auth/otp/verify", json=body)
    response.raise_for_status()
    data = response.json()["data"]
    return {"token": data["access"], "id": data["user"]["id"]}


class Metrics:
    """The product's fleet-wide `/metrics`, scraped and parsed."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def scrape(self) -> Scrape:
        response = await self.client.get("/metrics", timeout=30)
        response.raise_for_status()
        return Scrape(response.text)


class Scrape:
    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

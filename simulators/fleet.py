"""Many simulated cabinets: provisioning through the operator API, credential files, start/stop.

Provisioning is the only place the simulator talks to the server directly, and only through its
public HTTP API (``POST /api/admin/stations``), exactly as an operator would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simulators.cabinet import (
    KEEPALIVE_S,
    UPLOAD_INTERVAL_S,
    CabinetCredentials,
    CabinetError,
    SimulatedCabinet,
    random_banks,
)
from simulators.faults import Faults

__all__ = [
    "ProvisioningError",
    "SimulatedFleet",
    "load_credentials",
    "provision",
    "save_credentials",
]

STATIONS_PATH: Final = "/api/admin/stations"
PROVISION_CONCURRENCY: Final = 8
PROVISION_ATTEMPTS: Final = 3  # a random serial number may collide with an existing station (409)
START_CONCURRENCY: Final = 50
PROGRESS_THRESHOLD: Final = 10
"""Show a progress bar when starting more cabinets than this."""
HTTP_TIMEOUT_S: Final = 30.0
# Around Kathmandu, where the deployed fleet is.
CENTER_LATITUDE: Final = 27.7172
CENTER_LONGITUDE: Final = 85.3240
SPREAD_DEGREES: Final = 0.05


class ProvisioningError(RuntimeError):
    """The operator API did not create a station; the message says what to do."""


def _serial_number() -> str:
    return f"SIM{secrets.randbelow(10**12):012d}"


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:200]


def _credentials_from_response(serial_number: str, payload: Any) -> CabinetCredentials:
    try:
        data = payload["data"]
        mqtt = data["mqtt"]
        return CabinetCredentials(
            sn=str(data.get("serial_number", serial_number)),
            host=str(mqtt["host"]),
            port=int(mqtt["port"]),
            username=str(mqtt["username"]),
            password=str(mqtt["password"]),
            product_key=str(mqtt.get("product_key", "powerbank")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProvisioningError(
            f"the API created station {serial_number} but its answer has no usable data.mqtt "
            f"(host, port, username, password): {exc!r}. Is --api pointing at the orchestrator?"
        ) from exc


async def _create_station(
    http: httpx.AsyncClient, *, name: str, boards: int, holes_per_board: int, rng: random.Random
) -> CabinetCredentials:
    for _ in range(PROVISION_ATTEMPTS):
        serial_number = _serial_number()
        body = {
            "serial_number": serial_number,
            "name": name,
            "address": "Simulated cabinet",
            "latitude": round(CENTER_LATITUDE + rng.uniform(-SPREAD_DEGREES, SPREAD_DEGREES), 6),
            "longitude": round(CENTER_LONGITUDE + rng.uniform(-SPREAD_DEGREES, SPREAD_DEGREES), 6),
            "boards": boards,
            "holes_per_board": holes_per_board,
        }
        try:
            response = await http.post(STATIONS_PATH, json=body)
        except httpx.HTTPError as exc:
            raise ProvisioningError(
                f"cannot reach the API at {http.base_url}: {exc}. Is the server running, and is --api right?"
            ) from exc
        if response.status_code == 409:
            continue
        if response.status_code in (401, 403):
            raise ProvisioningError(
                f"the API refused the token ({response.status_code}: {_error_message(response)}): "
                "pass an operator (admin) access token with --token"
            )
        if response.is_error:
            raise ProvisioningError(
                f"creating station {serial_number} failed "
                f"({response.status_code}): {_error_message(response)}"
            )
        try:
            payload = response.json()
        except ValueError as exc:
            raise ProvisioningError(f"the API answered non-JSON for station {serial_number}") from exc
        return _credentials_from_response(serial_number, payload)
    raise ProvisioningError(f"{PROVISION_ATTEMPTS} random serial numbers were all taken; try again")


async def provision(
    api_url: str,
    token: str,
    count: int,
    *,
    boards: int,
    holes_per_board: int,
    name_prefix: str = "Sim",
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[CabinetCredentials]:
    """Create ``count`` stations through the operator API and return their MQTT credentials.

    Serial numbers are ``SIM`` + 12 random digits. ``transport`` is for tests (``httpx.MockTransport``).
    Raises :class:`ProvisioningError` with a message telling the user what to do.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = random.Random()
    semaphore = asyncio.Semaphore(PROVISION_CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=api_url.rstrip("/"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=HTTP_TIMEOUT_S,
        transport=transport,
    ) as http:

        async def one(number: int) -> CabinetCredentials:
            async with semaphore:
                return await _create_station(
                    http,
                    name=f"{name_prefix} {number}",
                    boards=boards,
                    holes_per_board=holes_per_board,
                    rng=rng,
                )

        return list(await asyncio.gather(*(one(n) for n in range(1, count + 1))))


_FIELDS: Final = ("sn", "host", "port", "username", "password", "product_key")


def save_credentials(path: str | os.PathLike[str], credentials: Sequence[CabinetCredentials]) -> None:
    """Write credentials as a JSON list of objects, readable only by the owner (it holds passwords)."""
    target = Path(path)
    text = json.dumps([{name: getattr(c, name) for name in _FIELDS} for c in credentials], indent=2) + "\n"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    target.chmod(0o600)


def load_credentials(path: str | os.PathLike[str]) -> list[CabinetCredentials]:
    """Read a file written by :func:`save_credentials`. Raises ValueError naming the file and the problem."""
    source = Path(path)
    try:
        entries = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{source}: cannot read cabinet credentials: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a JSON list of cabinet credentials")
    result: list[CabinetCredentials] = []
    for index, entry in enumerate(entries):
        where = f"{source}: entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object")
        missing = [name for name in _FIELDS[:-1] if name not in entry]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        if not isinstance(entry["port"], int) or not 0 < entry["port"] < 65536:
            raise ValueError(f"{where}: port must be a number 1..65535")
        strings = {name: entry.get(name, "powerbank") for name in _FIELDS if name != "port"}
        if not all(isinstance(value, str) for value in strings.values()):
            raise ValueError(f"{where}: sn, host, username, password and product_key must be strings")
        result.append(CabinetCredentials(port=entry["port"], **strings))
    return result


class SimulatedFleet:
    """Many :class:`SimulatedCabinet`, with power-bank SNs unique across the whole fleet.

    Every cabinet gets its own copy of ``faults`` (switch one cabinet's with ``fleet[sn].faults = ...``).
    """

    def __init__(
        self,
        credentials: Sequence[CabinetCredentials],
        *,
        boards: int = 1,
        holes_per_board: int = 4,
        fill: float = 0.75,
        seed: int | None = None,
        heartbeat_s: float = 60.0,
        faults: Faults | None = None,
        upload_s: float = UPLOAD_INTERVAL_S,
        keepalive_s: int = KEEPALIVE_S,
    ) -> None:
        rng = random.Random(seed)
        faults = faults if faults is not None else Faults()
        taken: set[str] = set()
        self.cabinets: list[SimulatedCabinet] = []
        for creds in credentials:
            banks = random_banks(rng, hole_count=boards * holes_per_board, fill=fill, taken=taken)
            self.cabinets.append(
                SimulatedCabinet(
                    creds,
                    boards=boards,
                    holes_per_board=holes_per_board,
                    seed=rng.randrange(2**32),
                    heartbeat_s=heartbeat_s,
                    banks=banks,
                    faults=dataclasses.replace(faults),
                    upload_s=upload_s,
                    keepalive_s=keepalive_s,
                )
            )
        self._by_sn = {cabinet.sn: cabinet for cabinet in self.cabinets}
        if len(self._by_sn) != len(self.cabinets):
            raise ValueError("two credentials have the same cabinet SN")

    def __getitem__(self, sn: str) -> SimulatedCabinet:
        return self._by_sn[sn]

    def __iter__(self) -> Iterator[SimulatedCabinet]:
        return iter(self.cabinets)

    def __len__(self) -> int:
        return len(self.cabinets)

    async def start(
        self, *, progress: bool | None = None, console: Console | None = None
    ) -> dict[str, CabinetError]:
        """Connect every cabinet; returns ``{sn: error}`` for those that could not start (the others run).

        ``progress`` shows a rich progress bar; by default only when starting many cabinets on a terminal.
        """
        console = console or Console(stderr=True)
        if progress is None:
            progress = len(self.cabinets) > PROGRESS_THRESHOLD and console.is_terminal
        failures: dict[str, CabinetError] = {}
        semaphore = asyncio.Semaphore(START_CONCURRENCY)
        with Progress(
            TextColumn("Connecting cabinets"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not progress,
        ) as bar:
            task = bar.add_task("connect", total=len(self.cabinets))

            async def one(cabinet: SimulatedCabinet) -> None:
                async with semaphore:
                    try:
                        await cabinet.start()
                    except CabinetError as exc:
                        failures[cabinet.sn] = exc
                    except Exception as exc:  # an amqtt surprise must not stop the other cabinets
                        failures[cabinet.sn] = CabinetError(f"cabinet {cabinet.sn} failed to start: {exc!r}")
                    bar.advance(task)

            await asyncio.gather(*(one(cabinet) for cabinet in self.cabinets))
        return failures

    async def stop(self) -> None:
        """Disconnect every cabinet."""
        await asyncio.gather(*(cabinet.stop() for cabinet in self.cabinets))

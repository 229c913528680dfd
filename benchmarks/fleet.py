"""Fleet benchmark: the whole product under a cabinet fleet and app load, with Mosquitto as reference.

Starts the product as a user does (`powerbank up` on embedded defaults, in its own DATA_DIR and on free
ports), provisions N cabinets and the users it needs through the API, then drives it from this process: a
swarm of N emulated cabinets over raw MQTT (`simulators.swarm`) and open-loop `POST /api/rentals/start`.
Before that, the same swarm runs against a private Mosquitto (anonymous, no ACL), so the broker's connect
and ingest figures print as a ratio to it. Everything runs on this one machine; CPU and PSS are the
product's whole process tree (API, Ray and its workers, embedded PostgreSQL and Valkey), never the load
generator's.

Phases, each a few rows of the table printed at the end:
  connect   N cabinets connect at --connect-rate: time until all are online and ready (the product has
            applied each one's first snapshot), CONNACK p50/p99, refusals and retries;
  idle      --idle-seconds with a heartbeat from each cabinet every --heartbeat-s: CPU (% of one core), PSS;
  rent      for each rate of --rent-rate: open-loop rents for --rent-seconds (each by its own user, at a
            cabinet that has banks): p50/p95/p99/max, errors, product CPU per rent; the banks go back after;
  ingest    0x10 snapshots (all holes) at --ingest-rate for --ingest-seconds: frames applied per second and
            frames dropped, against what Mosquitto delivers to one subscriber.

Examples:
  .venv/bin/python benchmarks/fleet.py --cabinets 1000 --rent-rate 50
  .venv/bin/python benchmarks/fleet.py --cabinets 10000
  .venv/bin/python benchmarks/fleet.py --cabinets 1000 --rent-rate 50,100,150 --profile var/profiles
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from product import STAFF_PASSWORD, STAFF_PHONE, CodeReader, Metrics, ProcessTree, Product, cpu_delta, log_in
from profiles import Profiler

from simulators.swarm import (
    Mosquitto,
    Subscriber,
    Swarm,
    SwarmCabinetSpec,
    make_specs,
    percentile,
    raise_nofile_limit,
)

PRODUCT_KEY = "powerbank"
PACKAGE_ID = 1
USER_CREDIT = "100000"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds == seconds else "-"


def pct(values: list[float], q: float) -> float:
    return percentile(values, q) if values else float("nan")


@dataclass
class Report:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, phase: str, what: str, product: str, reference: str = "", ratio: str = "") -> None:
        self.rows.append((phase, what, product, reference, ratio))
        print(f"  {phase:<8} {what:<46} {product:<30} {reference:<20} {ratio}", flush=True)

    def table(self) -> str:
        head = ("phase", "what", "product", "mosquitto", "ratio")
        cells = [head, *self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(head))) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


async def publish_snapshots(swarm: Swarm, args: argparse.Namespace) -> tuple[int, Callable[[], float]]:
    """Offer the ingest load; (snapshots sent, seconds since the first went out)."""
    started = time.monotonic()
    sent = await swarm.publish_snapshots(rate_per_s=args.ingest_rate, duration_s=args.ingest_seconds)
    return sent, lambda: time.monotonic() - started


# --------------------------------------------------------------------------------------------- reference


async def reference_run(args: argparse.Namespace, specs: list[SwarmCabinetSpec], report: Report) -> None:
    """The same swarm against Mosquitto: connect storm, then snapshot ingest to one subscriber."""
    async with Mosquitto() as broker:
        subscriber = await Subscriber.connect(
            broker.host, broker.port, filters=(f"/{PRODUCT_KEY}/+/user/upload",)
        )
        async with Swarm(
            host=broker.host, port=broker.port, product_key=PRODUCT_KEY, specs=specs, answer=False
        ) as swarm:
            started = time.monotonic()
            await swarm.connect_all(rate_per_s=args.connect_rate)
            report.raw["reference_connect"] = {
                "all_connected_s": time.monotonic() - started,
                "connack": list(swarm.stats.connack_s),
            }
            if args.ingest_seconds > 0:
                baseline = subscriber.received
                sent, seconds = await publish_snapshots(swarm, args)
                await asyncio.wait_for(subscriber.wait_count(baseline + sent), 60)
                got = subscriber.received - baseline
                report.raw["reference_ingest"] = {"sent": sent, "received": got, "rate": got / seconds()}
        await subscriber.close()


# --------------------------------------------------------------------------------------------- setup


async def provision(
    client: httpx.AsyncClient, staff: dict[str, str], specs: list[SwarmCabinetSpec], concurrency: int
) -> list[SwarmCabinetSpec]:
    """Create every station through the admin API; the specs with the MQTT passwords it issued."""
    headers = {"Authorization": f"Bearer {staff['token']}"}
    rng = random.Random(7)
    queue = list(reversed(specs))
    done: list[SwarmCabinetSpec] = []

    async def worker() -> None:
        while queue:
            spec = queue.pop()
            body = {
                "serial_number": spec.sn,
                "name": spec.sn,
                "address": "fleet benchmark",
                "latitude": round(27.7 + rng.uniform(-0.05, 0.05), 6),
                "longitude": round(85.3 + rng.uniform(-0.05, 0.05), 6),
                "boards": spec.boards,
                "holes_per_board": spec.holes_per_board,
            }
            response = await client.post("/api/admin/stations", json=body, headers=headers)
            if response.status_code != 201:
                raise SystemExit(f"provisioning {spec.sn} failed: {response.status_code} {response.text}")
            password = response.json()["data"]["mqtt"]["password"]
            done.append(
                SwarmCabinetSpec(
                    sn=spec.sn,
                    password=password,
                    banks=spec.banks,
                    boards=spec.boards,
                    holes_per_board=spec.holes_per_board,
                )
            )
            if len(done) % 1000 == 0:
                print(f"    provisioned {len(done):,}/{len(specs):,}", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def make_users(
    client: httpx.AsyncClient, codes: CodeReader, staff: dict[str, str], count: int, concurrency: int
) -> list[dict[str, str]]:
    """`count` app users logged in by one-time code, each credited USER_CREDIT by the operator."""
    headers = {"Authorization": f"Bearer {staff['token']}"}
    phones = [f"+97798{i:08d}" for i in range(1, count + 1)]
    users: list[dict[str, str]] = []

    async def worker() -> None:
        while phones:
            user = await log_in(client, codes, phones.pop())
            response = await client.post(
                f"/api/admin/users/{user['id']}/wallet/credit",
                json={"amount": USER_CREDIT, "reason": "fleet benchmark"},
                headers={**headers, "Idempotency-Key": f"fleet-{user['id']}"},
            )
            if response.status_code != 201:
                raise SystemExit(f"crediting {user['id']} failed: {response.status_code} {response.text}")
            users.append(user)
            if len(users) % 500 == 0:
                print(f"    users {len(users):,}/{count:,}", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return users


# --------------------------------------------------------------------------------------------- phases


async def wait_online_ready(
    metrics: Metrics, count: int, started: float, timeout_s: float
) -> tuple[float, float, list[tuple[float, float, float]]]:
    """Scrape /metrics until every cabinet is online and ready: (online after, ready after, scrapes)."""
    online_at = ready_at = float("nan")
    scrapes: list[tuple[float, float, float]] = []
    while time.monotonic() < started + timeout_s:
        values = await metrics.scrape()
        now = time.monotonic() - started
        online, ready = values.get("powerbank_cabinets_online"), values.get("powerbank_cabinets_ready")
        scrapes.append((now, online, ready))
        if online >= count and online_at != online_at:
            online_at = now
        if ready >= count:
            ready_at = now
            break
        await asyncio.sleep(0.5)
    return online_at, ready_at, scrapes


@dataclass
class RentResult:
    latencies: list[float]
    errors: Counter[str]
    rented: list[tuple[str, str]]  # (station, power bank)
    seconds: float
    cpu_s: float


def rent_plan(banks_left: dict[str, int], total: int, seed: int) -> list[str]:
    """The station of each rent: spread over the cabinets, never more rents than a cabinet has banks."""
    stations = [sn for sn, n in banks_left.items() if n > 0]
    random.Random(seed).shuffle(stations)
    plan: list[str] = []
    index = 0
    while len(plan) < total:
        if not any(banks_left[sn] for sn in stations):
            raise SystemExit(f"the fleet has banks for {len(plan)} rents, not {total}")
        sn = stations[index % len(stations)]
        index += 1
        if banks_left[sn] > 0:
            banks_left[sn] -= 1
            plan.append(sn)
    return plan


async def rent_phase(
    client: httpx.AsyncClient,
    tree: ProcessTree,
    users: list[dict[str, str]],
    banks_left: dict[str, int],
    rate: float,
    duration_s: float,
) -> RentResult:
    """Open loop: rent i is due at t0 + i/rate whatever the answers; its latency counts from then."""
    total = int(rate * duration_s)
    if total > len(users):
        raise SystemExit(f"{total} rents need {total} users; only {len(users)} were made")
    plan = rent_plan(banks_left, total, seed=total)
    result = RentResult([], Counter(), [], 0.0, 0.0)

    async def rent(i: int, due: float) -> None:
        user, sn = users[i], plan[i]
        try:
            response = await client.post(
                "/api/rentals/start",
                json={"station_sn": sn, "package_id": PACKAGE_ID},
                headers={"Authorization": f"Bearer {user['token']}", "Idempotency-Key": str(uuid.uuid4())},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            result.errors[type(exc).__name__] += 1
            banks_left[sn] += 1
            return
        result.latencies.append(time.monotonic() - due)
        if response.status_code == 201:
            result.rented.append((sn, response.json()["data"]["powerbank_sn"]))
        else:
            banks_left[sn] += 1
            result.errors[f"{response.status_code} {response.json()['error']['code']}"] += 1

    cpu_before = tree.cpu_seconds()
    started = time.monotonic()
    tasks = []
    for i in range(total):
        due = started + i / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(rent(i, due)))
    await asyncio.gather(*tasks)
    result.seconds = time.monotonic() - started
    result.cpu_s = tree.cpu_seconds() - cpu_before
    return result


async def return_all(
    metrics: Metrics, swarm: Swarm, rented: list[tuple[str, str]], banks_left: dict[str, int]
) -> None:
    """Put every rented bank back where it came from (a 0x40 each) and wait until no rental is open."""
    for sn, bank in rented:
        swarm.return_bank(sn, bank)
        banks_left[sn] += 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        values = await metrics.scrape()
        if sum(values.get("powerbank_rentals_active", status=s) for s in ("active", "overdue")) == 0:
            return
        await asyncio.sleep(0.5)
    print("    warning: rentals still open 120 s after the returns", flush=True)


async def ingest_phase(metrics: Metrics, swarm: Swarm, args: argparse.Namespace) -> tuple[int, float, float]:
    """Offer snapshots, then scrape until the product applied them all or stopped applying for 10 s:
    (sent, applied, seconds from the first snapshot until the last was applied)."""
    frames = ("powerbank_frames_total", {"cmd": "0x10"})
    before = (await metrics.scrape()).get(frames[0], **frames[1])
    sent, seconds = await publish_snapshots(swarm, args)
    applied, last_change, done_at = 0.0, time.monotonic(), float("nan")
    while time.monotonic() - last_change < 10:
        now_applied = (await metrics.scrape()).get(frames[0], **frames[1]) - before
        if now_applied >= sent:
            applied, done_at = now_applied, seconds()
            break
        if now_applied != applied:
            applied, last_change = now_applied, time.monotonic()
        await asyncio.sleep(0.25)
    return sent, applied, done_at if done_at == done_at else seconds()


# --------------------------------------------------------------------------------------------- the run


async def product_run(
    args: argparse.Namespace, specs: list[SwarmCabinetSpec], report: Report, profiler: Profiler
) -> None:
    product = Product(
        args.work / "product",
        env_overrides={
            "MQTT_MAX_CONNECTIONS_PER_IP": str(len(specs) + 1000),  # the whole swarm dials from 127.0.0.1
            "OTP_PER_IP_PER_HOUR": "1000000",  # every benchmark user logs in from 127.0.0.1
            **dict(kv.split("=", 1) for kv in args.env),
        },
        checkout=args.checkout,
    )
    print(f"  starting `powerbank up` (log: {product.log_file})", flush=True)
    await product.start()
    tree = ProcessTree(product)
    rates = [float(r) for r in args.rent_rate.split(",") if r]
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    try:
        product.create_staff()
        async with httpx.AsyncClient(base_url=product.base_url, timeout=30, limits=limits) as client:
            metrics = Metrics(client)
            codes = CodeReader(product.sms_file)
            staff = await log_in(client, codes, STAFF_PHONE, password=STAFF_PASSWORD)
            t = time.monotonic()
            specs = await provision(client, staff, specs, args.setup_concurrency)
            per_s = len(specs) / (time.monotonic() - t)
            report.add("setup", f"provision {len(specs):,} stations (admin API)", f"{per_s:,.0f}/s")
            users = await make_users(
                client, codes, staff, int(max(rates, default=0) * args.rent_seconds), args.setup_concurrency
            )
            async with Swarm(
                host="127.0.0.1",
                port=product.mqtt_port,
                product_key=PRODUCT_KEY,
                specs=specs,
                heartbeat_s=args.heartbeat_s,
            ) as swarm:
                idle_cpu = await connect_and_idle(args, report, profiler, tree, metrics, swarm)
                banks_left = {spec.sn: len(spec.banks) for spec in specs}
                for rate in rates:
                    await rents(
                        args,
                        report,
                        profiler,
                        tree,
                        client,
                        metrics,
                        swarm,
                        users,
                        banks_left,
                        rate,
                        idle_cpu,
                    )
                if args.ingest_seconds > 0:
                    print(
                        f"  ingest: snapshots at {args.ingest_rate:g}/s for {args.ingest_seconds:g} s",
                        flush=True,
                    )
                    with profiler.phase("ingest", tree):
                        sent, applied, seconds = await ingest_phase(metrics, swarm, args)
                    rate = min(applied, sent) / seconds
                    ref = report.raw.get("reference_ingest")
                    report.add(
                        "ingest",
                        f"0x10 frames/s applied (offered {args.ingest_rate:g}/s)",
                        f"{rate:,.0f}/s",
                        f"{ref['rate']:,.0f}/s" if ref else "",
                        f"{rate / ref['rate']:.2f}x" if ref else "",
                    )
                    dropped = max(0.0, sent - applied)
                    report.add(
                        "ingest",
                        "frames sent / applied (dropped)",
                        f"{sent:,} / {applied:,.0f} ({dropped:,.0f})",
                    )
    finally:
        product.stop()


async def connect_and_idle(
    args: argparse.Namespace,
    report: Report,
    profiler: Profiler,
    tree: ProcessTree,
    metrics: Metrics,
    swarm: Swarm,
) -> float:
    """The connect storm, then the idle fleet; returns the idle CPU (cores)."""
    count = len(swarm)
    print(f"  connecting {count:,} cabinets at {args.connect_rate:g}/s", flush=True)
    cpu_before = tree.cpu_seconds()
    started = time.monotonic()
    with profiler.phase("connect", tree):
        connecting = asyncio.create_task(swarm.connect_all(rate_per_s=args.connect_rate))
        online_at, ready_at, scrapes = await wait_online_ready(metrics, count, started, args.ready_timeout)
        await asyncio.wait_for(connecting, 60)
    storm_cpu = tree.cpu_seconds() - cpu_before
    connack = list(swarm.stats.connack_s)
    ref = report.raw.get("reference_connect")
    report.add(
        "connect",
        f"{count:,} at {args.connect_rate:g}/s: all online",
        f"{online_at:.1f} s",
        f"{ref['all_connected_s']:.1f} s" if ref else "",
        f"{online_at / ref['all_connected_s']:.2f}x" if ref else "",
    )
    report.add("connect", "all ready (first snapshot applied)", f"{ready_at:.1f} s")
    report.add(
        "connect",
        "CONNACK p50 / p99",
        f"{ms(pct(connack, 50))} / {ms(pct(connack, 99))}",
        f"{ms(pct(ref['connack'], 50))} / {ms(pct(ref['connack'], 99))}" if ref else "",
    )
    stats = swarm.stats
    report.add(
        "connect",
        "refused / timed out / retried",
        f"{sum(stats.refused.values())} / {stats.connect_timeouts} / {stats.retries}",
    )
    report.add("connect", "product CPU during the storm", f"{storm_cpu:.1f} s")
    after = [online for at, online, _ in scrapes if at > online_at]
    report.add("connect", "lowest cabinets_online scraped once all were", f"{min(after, default=count):,.0f}")

    print(f"  idle {args.idle_seconds:g} s", flush=True)
    roles_before = tree.cpu_by_role()
    cpu_before = tree.cpu_seconds()
    started = time.monotonic()
    with profiler.phase("idle", tree):
        await asyncio.sleep(args.idle_seconds)
    seconds = time.monotonic() - started
    idle_cpu = (tree.cpu_seconds() - cpu_before) / seconds
    by_role = cpu_delta(roles_before, tree.cpu_by_role())
    report.add("idle", "  of which", _shares({r: c / seconds * 100 for r, c in by_role.items()}, "%"))
    usage = tree.usage()
    report.add("idle", f"CPU, a heartbeat every {args.heartbeat_s:g} s", f"{idle_cpu * 100:.1f} % of a core")
    report.add(
        "idle", f"PSS of the process tree ({usage.processes} processes)", f"{usage.pss_bytes / 2**30:.2f} GB"
    )
    return idle_cpu


async def rents(
    args: argparse.Namespace,
    report: Report,
    profiler: Profiler,
    tree: ProcessTree,
    client: httpx.AsyncClient,
    metrics: Metrics,
    swarm: Swarm,
    users: list[dict[str, str]],
    banks_left: dict[str, int],
    rate: float,
    idle_cpu: float,
) -> None:
    print(f"  rents at {rate:g}/s for {args.rent_seconds:g} s", flush=True)
    roles_before = tree.cpu_by_role()
    with profiler.phase(f"rent{rate:g}", tree):
        result = await rent_phase(client, tree, users, banks_left, rate, args.rent_seconds)
    lat, ok = result.latencies, len(result.rented)
    by_role = cpu_delta(roles_before, tree.cpu_by_role())
    errors = sum(result.errors.values())
    report.add(
        "rent",
        f"{rate:g}/s x {args.rent_seconds:g} s: ok / errors",
        f"{ok} / {errors}" + (f" {dict(result.errors)}" if errors else ""),
    )
    report.add(
        "rent",
        "  p50 / p95 / p99 / max",
        " / ".join(ms(pct(lat, q)) for q in (50, 95, 99)) + f" / {ms(max(lat, default=float('nan')))}",
    )
    net = max(0.0, result.cpu_s - idle_cpu * result.seconds)
    report.add(
        "rent",
        "  product CPU per rent (gross / net of idle)",
        f"{result.cpu_s / max(ok, 1) * 1000:.1f} / {net / max(ok, 1) * 1000:.1f} ms",
    )
    report.add(
        "rent",
        "  of which (ms per rent)",
        _shares({r: c / max(ok, 1) * 1000 for r, c in by_role.items()}, ""),
    )
    report.raw.setdefault("rents", []).append(
        {"rate": rate, "latencies": lat, "errors": dict(result.errors), "ok": ok, "cpu_s": result.cpu_s}
    )
    await return_all(metrics, swarm, result.rented, banks_left)
    report.add("rent", "  command payloads that ejected twice (must be 0)", f"{swarm.stats.duplicate_ejects}")


def _shares(values: dict[str, float], unit: str) -> str:
    """`api 4.1, kiosk hosts 2.0, ...`, largest first, the negligible left out."""
    big = sorted(((v, k) for k, v in values.items() if v >= 0.1), reverse=True)
    return ", ".join(f"{k} {v:.1f}{unit}" for v, k in big)


async def main(args: argparse.Namespace) -> None:
    raise_nofile_limit(args.cabinets + 3000)
    report = Report()
    specs = make_specs(
        args.cabinets,
        fill=args.fill,
        holes_per_board=args.holes,
        seed=args.seed,
        sn_prefix=f"BF{args.seed:02d}",
    )
    profiler = Profiler(args.profile, duration_s=args.profile_seconds)
    print(
        f"fleet benchmark: {args.cabinets:,} cabinets x {args.holes} holes, work dir {args.work}", flush=True
    )
    if args.reference:
        print("  reference: the same swarm against Mosquitto", flush=True)
        await reference_run(args, specs, report)
    await product_run(args, specs, report, profiler)
    print()
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.raw, default=str))
    if args.profile:
        print(f"\npy-spy profiles per phase in {args.profile} (top functions: */summary.txt)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog="Examples:" + doc.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--cabinets", type=int, default=1000, help="cabinets to provision and connect (default 1000)")
    add("--holes", type=int, default=8, help="holes per cabinet, one board (default 8)")
    add("--fill", type=float, default=0.75, help="share of holes holding a bank (default 0.75)")
    add("--connect-rate", type=float, default=200, help="cabinet connects per second (default 200)")
    add("--ready-timeout", type=float, default=600, help="give up waiting for all ready after this (s)")
    add("--heartbeat-s", type=float, default=60, help="heartbeat interval of each cabinet (default 60 s)")
    add("--idle-seconds", type=float, default=30, help="idle measurement (default 30 s)")
    add("--rent-rate", default="50", help="comma-separated open-loop rents/s, each a phase (default 50)")
    add("--rent-seconds", type=float, default=20, help="duration of each rent phase (default 20 s)")
    add("--ingest-rate", type=float, default=3000, help="0x10 snapshots/s offered (default 3000)")
    add("--ingest-seconds", type=float, default=10, help="ingest duration (default 10 s; 0 skips it)")
    add("--no-reference", dest="reference", action="store_false", help="skip the Mosquitto run")
    add("--setup-concurrency", type=int, default=8, help="parallel setup requests (default 8)")
    add("--env", action="append", default=[], metavar="NAME=VALUE", help="a product setting (repeatable)")
    add("--checkout", type=Path, help="run the product from this checkout (e.g. an older commit's worktree)")
    add("--seed", type=int, default=1, help="seed of serial numbers and banks (default 1)")
    add("--work", type=Path, help="work directory (default: a new temp dir); the product's DATA_DIR is in it")
    add("--profile", type=Path, help="py-spy every product process in each phase, into this directory")
    add("--profile-seconds", type=float, default=15, help="py-spy duration per phase (default 15 s)")
    add("--json", type=Path, help="also write the raw measurements (latencies...) to this file")
    args = parser.parse_args(argv)
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="fleetbench-"))).resolve()
    return args


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))

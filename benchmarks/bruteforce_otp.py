"""Brute-force one-time codes against a running API and show that the lock-out holds.

(a) ATTEMPTS wrong codes from one IP at one identifier (the victim, who holds a live code);
(b) ATTEMPTS wrong codes from one IP spread over as many identifiers;
then the victim logs in from their own IP. Prints the answers by status and when the lock began.

Different client IPs are simulated with X-Forwarded-For (`--forwarded`), which only works when the server
trusts this machine as a proxy (TRUSTED_PROXIES). Without it every request comes from this machine's one
real IP, and the victim's own login from another IP cannot be shown.

Run: `.venv/bin/python benchmarks/bruteforce_otp.py http://127.0.0.1:8010 --sms-file var/sms.jsonl \
--forwarded` (a server with SMS_BACKEND=file:var/sms.jsonl and TRUSTED_PROXIES=127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Phase:
    name: str
    statuses: Counter[int] = field(default_factory=Counter)
    lock_at_request: int | None = None  # 1-based number of the first request answered 423
    lock_after_s: float | None = None
    retry_after: str | None = None
    elapsed_s: float = 0.0


@dataclass
class Report:
    attempts: int
    forwarded: bool
    one_identifier: Phase
    many_identifiers: Phase
    victim: list[tuple[str, int]] = field(default_factory=list)  # (step, HTTP status)

    @property
    def victim_logged_in(self) -> bool:
        return any(step.startswith("verify") and status == 200 for step, status in self.victim)


def random_phone(rng: random.Random) -> str:
    """A valid Nepali mobile number (NTC 984-986, Ncell 980-982)."""
    return f"+977{rng.choice((980, 981, 982, 984, 985, 986))}{rng.randrange(10**7):07d}"


def random_ip(rng: random.Random) -> str:
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def sms_file_codes(path: Path) -> Callable[[str], str]:
    """Read the newest one-time code sent to a phone from a `file:` SMS backend."""

    def newest(phone: str) -> str:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for message in reversed(lines):
            found = re.search(r"code is (\d{6})", message["text"])
            if message["to"] == phone and found:
                return found.group(1)
        raise LookupError(f"no code for {phone} in {path}")

    return newest


async def _attack(
    client: httpx.AsyncClient, phase: Phase, targets: list[str], headers: dict[str, str], seed: int
) -> None:
    rng = random.Random(seed)
    started = time.perf_counter()
    for number, identifier in enumerate(targets, start=1):
        r = await client.post(
            "/api/auth/otp/verify",
            json={"identifier": identifier, "otp": f"{rng.randrange(10**6):06d}"},
            headers=headers,
        )
        phase.statuses[r.status_code] += 1
        if r.status_code == 423 and phase.lock_at_request is None:
            phase.lock_at_request = number
            phase.lock_after_s = time.perf_counter() - started
            phase.retry_after = r.headers.get("retry-after")
    phase.elapsed_s = time.perf_counter() - started


async def run(
    base_url: str,
    *,
    attempts: int = 1000,
    code_for: Callable[[str], str] | None = None,
    forwarded: bool = False,
    seed: int | None = None,
) -> Report:
    """Both attacks, then the victim's own login (needs `code_for` to read the codes sent)."""
    rng = random.Random(seed)
    victim = random_phone(rng)
    ips = {name: random_ip(rng) for name in ("attacker_a", "attacker_b", "victim")}

    def via(name: str) -> dict[str, str]:
        return {"X-Forwarded-For": ips[name]} if forwarded else {}

    report = Report(
        attempts=attempts,
        forwarded=forwarded,
        one_identifier=Phase("one IP → one identifier"),
        many_identifiers=Phase("one IP → many identifiers"),
    )
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def victim_step(step: str, path: str, body: dict[str, str]) -> int:
            r = await client.post(path, json=body, headers=via("victim"))
            report.victim.append((step, r.status_code))
            return r.status_code

        # The victim asks for a code: the attacker now has a live code to guess.
        await victim_step("request code", "/api/auth/otp/request", {"identifier": victim})
        seeds = rng.randrange(2**32), rng.randrange(2**32)
        await _attack(client, report.one_identifier, [victim] * attempts, via("attacker_a"), seeds[0])
        others = [random_phone(rng) for _ in range(attempts)]
        await _attack(client, report.many_identifiers, others, via("attacker_b"), seeds[1])
        if code_for is None or not forwarded:
            return report
        # The victim, from their own IP: the code the attacker burnt is refused, a new one works.
        status = await victim_step(
            "verify first code", "/api/auth/otp/verify", {"identifier": victim, "otp": code_for(victim)}
        )
        if status != 200:
            await victim_step("request new code", "/api/auth/otp/request", {"identifier": victim})
            await victim_step(
                "verify new code", "/api/auth/otp/verify", {"identifier": victim, "otp": code_for(victim)}
            )
    return report


def describe(report: Report) -> str:
    lines = [f"{report.attempts} wrong codes per attack, X-Forwarded-For: {report.forwarded}"]
    for phase in (report.one_identifier, report.many_identifiers):
        counts = ", ".join(f"{status}: {n}" for status, n in sorted(phase.statuses.items()))
        lock = (
            f"locked from request #{phase.lock_at_request} ({phase.lock_after_s:.2f} s in, "
            f"Retry-After {phase.retry_after} s)"
            if phase.lock_at_request
            else "never locked"
        )
        rate = sum(phase.statuses.values()) / phase.elapsed_s if phase.elapsed_s else 0.0
        lines.append(f"  {phase.name}: {counts}; {lock}; {phase.elapsed_s:.2f} s, {rate:.0f} req/s")
    if report.victim:
        steps = ", ".join(f"{step} → {status}" for step, status in report.victim)
        lines.append(f"  victim from another IP: {steps}; logged in: {report.victim_logged_in}")
    if not report.forwarded:
        lines.append("  (no --forwarded: one IP for all; the victim's login from elsewhere is not shown)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("base_url", help="the API, e.g. http://127.0.0.1:8010")
    parser.add_argument("--attempts", type=int, default=1000, help="wrong codes per attack (default 1000)")
    parser.add_argument(
        "--forwarded",
        action="store_true",
        help="simulate client IPs with X-Forwarded-For (the server must trust this host: TRUSTED_PROXIES)",
    )
    parser.add_argument("--sms-file", type=Path, help="the server's SMS_BACKEND=file: path, to read codes")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    code_for = sms_file_codes(args.sms_file) if args.sms_file else None
    attack = run(
        args.base_url, attempts=args.attempts, code_for=code_for, forwarded=args.forwarded, seed=args.seed
    )
    print(describe(asyncio.run(attack)))


if __name__ == "__main__":
    main()

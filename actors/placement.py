"""Which kiosk-host actor owns a cabinet: rendezvous hashing over the host names.

Every API replica and the broker compute the same owner without a lookup, and changing the number of
hosts moves only the cabinets of the hosts that came or went.
"""

from __future__ import annotations

import hashlib


def host_names(count: int) -> list[str]:
    return [f"kiosk-host-{i}" for i in range(count)]


def owner(serial_number: str, hosts: list[str]) -> str:
    def weight(host: str) -> int:
        return int.from_bytes(
            hashlib.blake2b(f"{host}|{serial_number}".encode(), digest_size=8).digest(), "big"
        )

    return max(hosts, key=weight)

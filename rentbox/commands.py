"""Server → cabinet JSON commands (rentbox protocol V1, section 2) and the firmware's HTTP ``sign``.

Every value is a string and the payload is compact JSON, exactly what the firmware parses.
Commands go out with QoS 0 (see the spec's reliability rule); that is the MQTT layer's job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Final

__all__ = [
    "MAX_HOLE",
    "CommandError",
    "check",
    "encode_command",
    "parse_command",
    "popup",
    "popup_sn",
    "reboot",
    "sign",
]

MAX_HOLE: Final = 80
"""Highest hole number a ``popup`` (eject by hole) may address."""


class CommandError(ValueError):
    """A command payload that cannot be built or parsed."""


def encode_command(cmd: str, **fields: str) -> bytes:
    """Compact JSON ``{"cmd": cmd, **fields}``; every value must be a string."""
    if not cmd:
        raise CommandError("a command needs a non-empty cmd")
    for name, value in {"cmd": cmd, **fields}.items():
        if not isinstance(value, str):
            raise CommandError(f"command field {name!r} must be a string, got {type(value).__name__}")
    return json.dumps({"cmd": cmd, **fields}, separators=(",", ":"), ensure_ascii=False).encode()


def check() -> bytes:
    """Ask for a 0x10 snapshot."""
    return encode_command("check")


def popup_sn(sn: str, *, timestamp: int | None = None, ttl: int | None = None) -> bytes:
    """Eject the power bank with this SN (reply 0x31). The firmware ignores ``timestamp``/``ttl``."""
    if not sn.isascii() or not sn.isdigit():
        raise CommandError(f"power-bank SN must be decimal digits, got {sn!r}")
    fields = {"data": sn}
    if timestamp is not None:
        fields["timestamp"] = str(timestamp)
    if ttl is not None:
        fields["ttl"] = str(ttl)
    return encode_command("popup_sn", **fields)


def popup(hole: int, *, io: int = 0) -> bytes:
    """Eject whatever is in this hole (1-80; reply 0x21)."""
    if not 1 <= hole <= MAX_HOLE:
        raise CommandError(f"hole must be 1..{MAX_HOLE}, got {hole}")
    return encode_command("popup", data=str(hole), io=str(io))


def reboot() -> bytes:
    """Reboot the cabinet (no reply; it reconnects)."""
    return encode_command("reboot")


def parse_command(payload: bytes) -> dict[str, str]:
    """Parse a command payload as the firmware does: a JSON object of strings with a ``cmd``."""
    try:
        parsed: object = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"command payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise CommandError(f"command payload must be a JSON object, got {type(parsed).__name__}")
    result: dict[str, str] = {}
    for name, value in parsed.items():
        if not isinstance(value, str):
            raise CommandError(f"command field {name!r} must be a string, got {type(value).__name__}")
        result[name] = value
    if not result.get("cmd"):
        raise CommandError("command payload has no cmd")
    return result


def sign(params: Mapping[str, str]) -> str:
    """The firmware's HTTP ``sign``: lower-case hex MD5 of the ``key=value`` strings of every parameter
    except ``sign``, sorted ascending and joined with ``|``. No secret: it proves nothing."""
    parts = sorted(f"{key}={value}" for key, value in params.items() if key != "sign")
    return hashlib.md5("|".join(parts).encode(), usedforsecurity=False).hexdigest()

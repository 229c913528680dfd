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
    "check_all",
    "check_log",
    "encode_command",
    "get_wifi",
    "load_ad",
    "parse_command",
    "popup",
    "popup_sn",
    "push_version_publish",
    "reboot",
    "set_mode",
    "set_wifi",
    "sign",
    "upload_all",
    "volume",
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


def popup(hole: int, *, io: int = 0, timestamp: int | None = None) -> bytes:
    """Eject whatever is in this hole (1-80; reply 0x21). The firmware ignores ``timestamp``."""
    if not 1 <= hole <= MAX_HOLE:
        raise CommandError(f"hole must be 1..{MAX_HOLE}, got {hole}")
    fields = {"data": str(hole), "io": str(io)}
    if timestamp is not None:
        fields["timestamp"] = str(timestamp)
    return encode_command("popup", **fields)


def reboot() -> bytes:
    """Reboot the cabinet (no reply; it reconnects)."""
    return encode_command("reboot")


def check_all() -> bytes:
    """Snapshot, firmware variant (same 0x10 reply)."""
    return encode_command("check_all")


def upload_all() -> bytes:
    """Ask for the periodic 0x10 upload now."""
    return encode_command("upload_all")


def volume(level: int) -> bytes:
    if not 0 <= level <= 100:
        raise CommandError(f"volume must be 0..100, got {level}")
    return encode_command("volume", data=str(level))


def set_wifi(ssid: str, password: str) -> bytes:
    if not ssid:
        raise CommandError("setWifi needs an SSID")
    return encode_command("setWifi", username=ssid, password=password)


def get_wifi() -> bytes:
    return encode_command("getWifi")


def set_mode(mode: str) -> bytes:
    if mode not in ("wifi", "4g"):
        raise CommandError(f"network mode must be 'wifi' or '4g', got {mode!r}")
    return encode_command("setMode", data=mode)


def load_ad() -> bytes:
    return encode_command("load_ad")


def push_version_publish() -> bytes:
    """Firmware update."""
    return encode_command("push_version_publish")


def check_log() -> bytes:
    return encode_command("check_log")


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

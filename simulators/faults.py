"""What can go wrong with a real cabinet, on demand: the faults a :class:`SimulatedCabinet` injects.

A :class:`Faults` value is plain data. Give one to ``SimulatedCabinet(faults=...)`` or assign
``cabinet.faults`` on a running cabinet: it takes effect with the next packet. Pure: no I/O, no MQTT.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "HOT_TEMPERATURE_C",
    "Faults",
    "parse_byte",
    "parse_holes",
]

HOT_TEMPERATURE_C: Final = 65
"""Temperature a power bank in one of :attr:`Faults.hot_holes` reports (over the 60 °C rental limit)."""


def parse_byte(value: object, name: str = "value") -> int:
    """A state code 0..255 from an int or a decimal/hex string (``17``, ``"17"``, ``"0x11"``)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number 0..255 (e.g. 0x11), got {value!r}")
    if isinstance(value, str):
        try:
            number = int(value.strip(), 0)
        except ValueError:
            raise ValueError(f"{name} must be a number 0..255 (e.g. 0x11 or 17), got {value!r}") from None
    elif isinstance(value, int):
        number = value
    else:
        raise ValueError(f"{name} must be a number 0..255 (e.g. 0x11), got {value!r}")
    if not 0 <= number <= 0xFF:
        raise ValueError(f"{name} must be 0..255 (0x00..0xFF), got {number}")
    return number


def parse_holes(value: object, name: str = "holes") -> frozenset[int]:
    """Hole numbers from ``"1,3"``, ``[1, 3]``, ``3`` or ``""`` (none)."""
    items: Iterable[object]
    if isinstance(value, str):
        items = [part for part in value.replace(" ", "").split(",") if part]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ValueError(f"{name} must be hole numbers like 1,3 or [1, 3], got {value!r}")
    holes: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{name}: {item!r} is not a hole number")
        try:
            hole = int(item) if isinstance(item, int | str) else None
        except ValueError:
            hole = None
        if hole is None or hole < 1:
            raise ValueError(f"{name}: {item!r} is not a hole number (1, 2, ...)")
        holes.add(hole)
    return frozenset(holes)


def _probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability between 0 and 1, got {value}")


def _seconds(value: float, name: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value}")


@dataclass(slots=True, kw_only=True)
class Faults:
    """Faults of one cabinet. The default value is a healthy cabinet.

    Every field applies from the next packet on, so a running cabinet's faults can be switched by
    assigning ``cabinet.faults = Faults(...)`` (or ``dataclasses.replace(cabinet.faults, ...)``).
    """

    lose_eject_reply: float = 0.0
    """Probability that the 0x31/0x21 reply is not sent after the power bank physically came out."""
    reply_delay_s: float = 0.0
    """Delay before every reply to a command (0x31, 0x21, and the 0x10 answering check/upload_all)."""
    eject_failure_code: int | None = None
    """Answer every popup_sn/popup with this state (e.g. 0x00, 0x11, 0x12, 0xFE); nothing comes out."""
    stuck_holes: frozenset[int] = frozenset()
    """These holes report :attr:`stuck_state` in snapshots and never eject (0x12: did not pop out)."""
    stuck_state: int = 0x04
    """Hole state the stuck holes report (0x04 stuck/damaged; any fault state 0x02..0x0A)."""
    hot_holes: frozenset[int] = frozenset()
    """Power banks in these holes report 65 °C in snapshots."""
    bad_checksum: bool = False
    """Every frame sent carries a wrong checksum (length and structure stay valid)."""
    duplicate_returns: bool = False
    """Every 0x40 return is sent twice."""
    disconnect_mid_eject: float | None = None
    """On popup_sn/popup: eject, then drop the TCP connection without replying; reconnect after this
    many seconds."""
    silent: bool = False
    """TCP stays open but nothing passes: no heartbeats, uploads, replies or MQTT PINGREQ, and commands
    sent meanwhile are lost (not executed). No reconnect while silent."""
    disconnect_probability: float = 0.0
    """Per command received, probability to drop the connection (before executing it or after, before the
    reply: a coin flip) and reconnect after about 1 s."""

    def __post_init__(self) -> None:
        _probability(self.lose_eject_reply, "lose_eject_reply")
        _probability(self.disconnect_probability, "disconnect_probability")
        _seconds(self.reply_delay_s, "reply_delay_s")
        if self.disconnect_mid_eject is not None:
            _seconds(self.disconnect_mid_eject, "disconnect_mid_eject")
        if self.eject_failure_code is not None:
            self.eject_failure_code = parse_byte(self.eject_failure_code, "eject_failure_code")
        self.stuck_state = parse_byte(self.stuck_state, "stuck_state")
        self.stuck_holes = parse_holes(self.stuck_holes, "stuck_holes")
        self.hot_holes = parse_holes(self.hot_holes, "hot_holes")

    @property
    def active(self) -> bool:
        """True when any fault is switched on."""
        return self != Faults()

    def describe(self) -> str:
        """Short human text of the active faults, named like the CLI flags ("" when healthy)."""
        parts: list[str] = []
        if self.silent:
            parts.append("SILENT")
        if self.lose_eject_reply:
            parts.append(f"lose-reply {self.lose_eject_reply:.0%}")
        if self.reply_delay_s:
            parts.append(f"reply-delay {self.reply_delay_s:g}s")
        if self.eject_failure_code is not None:
            parts.append(f"fail-ejects 0x{self.eject_failure_code:02X}")
        if self.stuck_holes:
            parts.append(f"stuck {_holes_text(self.stuck_holes)} (0x{self.stuck_state:02X})")
        if self.hot_holes:
            parts.append(f"hot {_holes_text(self.hot_holes)}")
        if self.bad_checksum:
            parts.append("bad-checksum")
        if self.duplicate_returns:
            parts.append("duplicate-returns")
        if self.disconnect_mid_eject is not None:
            parts.append(f"disconnect-mid-eject {self.disconnect_mid_eject:g}s")
        if self.disconnect_probability:
            parts.append(f"disconnect {self.disconnect_probability:.0%}")
        return ", ".join(parts)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, base: Faults | None = None) -> Faults:
        """Faults from JSON/YAML-like data (field names as above), over ``base`` (default: no faults).

        Hole sets may be lists or ``"1,3"``; state codes ints or ``"0x11"``; ``null`` clears
        ``eject_failure_code`` / ``disconnect_mid_eject``. Raises ValueError naming the bad field.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"faults must be a mapping of field: value, got {data!r}")
        changes: dict[str, Any] = {}
        for name, value in data.items():
            convert = _CONVERTERS.get(str(name))
            if convert is None:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(_CONVERTERS)}")
            changes[str(name)] = convert(value, str(name))
        return dataclasses.replace(base if base is not None else cls(), **changes)


def _holes_text(holes: frozenset[int]) -> str:
    return ",".join(str(hole) for hole in sorted(holes))


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _optional_number(value: object, name: str) -> float | None:
    return None if value is None else _number(value, name)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _optional_byte(value: object, name: str) -> int | None:
    return None if value is None else parse_byte(value, name)


_CONVERTERS: Final[dict[str, Callable[[object, str], object]]] = {
    "lose_eject_reply": _number,
    "reply_delay_s": _number,
    "eject_failure_code": _optional_byte,
    "stuck_holes": parse_holes,
    "stuck_state": parse_byte,
    "hot_holes": parse_holes,
    "bad_checksum": _flag,
    "duplicate_returns": _flag,
    "disconnect_mid_eject": _optional_number,
    "silent": _flag,
    "disconnect_probability": _number,
}

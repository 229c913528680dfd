"""Fault scenarios: a timeline of fault changes applied to running cabinets.

A scenario file (JSON, or YAML with PyYAML installed) is a list of steps, or ``{"steps": [...]}``::

    [
      {"at": 0,  "cabinet": "*",               "faults": {"lose_eject_reply": 1.0}},
      {"at": 30, "cabinet": "SIM000000000042", "faults": {"silent": true}},
      {"at": 60, "cabinet": "*",               "faults": {}}
    ]

``at`` is seconds since the cabinets started; ``cabinet`` is a cabinet SN or ``*`` (every cabinet, the
default). A step **sets** the cabinet's faults to the base faults (the command line's, else none) with the
step's fields on top, so ``{}`` returns to the base. Field names are those of :class:`Faults`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from simulators.cabinet import SimulatedCabinet
from simulators.faults import Faults

__all__ = [
    "ALL_CABINETS",
    "ScenarioStep",
    "check_cabinets",
    "load_scenario",
    "parse_scenario",
    "run_scenario",
]

ALL_CABINETS: Final = "*"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioStep:
    """At ``at`` seconds, set ``cabinet``'s (or every cabinet's, ``*``) faults to base + ``changes``."""

    at: float
    cabinet: str
    changes: Mapping[str, Any]

    def faults(self, base: Faults | None = None) -> Faults:
        return Faults.from_mapping(self.changes, base=base)


def parse_scenario(data: object, *, source: str = "scenario") -> list[ScenarioStep]:
    """Validate decoded JSON/YAML into steps sorted by ``at``; ValueError names ``source`` and the step."""
    if isinstance(data, Mapping) and set(data) == {"steps"}:
        data = data["steps"]
    if not isinstance(data, list):
        raise ValueError(
            f'{source}: expected a list of steps (or {{"steps": [...]}}), got {type(data).__name__}'
        )
    steps: list[ScenarioStep] = []
    for index, entry in enumerate(data):
        where = f"{source}: step {index}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object with at, cabinet and faults")
        unknown = set(entry) - {"at", "cabinet", "faults"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(map(str, unknown))}; use at, cabinet, faults")
        at = entry.get("at")
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0:
            raise ValueError(f"{where}: 'at' must be seconds >= 0 since start, got {at!r}")
        cabinet = entry.get("cabinet", ALL_CABINETS)
        if not isinstance(cabinet, str) or not cabinet:
            raise ValueError(f"{where}: 'cabinet' must be a cabinet SN or '*', got {cabinet!r}")
        if "faults" not in entry:
            raise ValueError(f"{where} has no 'faults' (use {{}} to return to the base faults)")
        changes = entry["faults"]
        if not isinstance(changes, Mapping):
            raise ValueError(f"{where}: 'faults' must be an object of fault: value, got {changes!r}")
        try:
            Faults.from_mapping(changes)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        steps.append(ScenarioStep(at=float(at), cabinet=cabinet, changes=dict(changes)))
    return sorted(steps, key=lambda step: step.at)


def load_scenario(path: str | Path) -> list[ScenarioStep]:
    """Read a scenario file: YAML for ``.yaml``/``.yml`` (needs PyYAML), JSON otherwise."""
    source = Path(path)
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: cannot read the scenario: {exc}") from exc
    if source.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{source}: YAML scenarios need PyYAML (pip install pyyaml); or write it as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: not valid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{source}: not valid JSON: {exc}") from exc
    return parse_scenario(data, source=str(source))


def check_cabinets(steps: Sequence[ScenarioStep], sns: Sequence[str]) -> None:
    """Raise ValueError if a step names a cabinet that is not among ``sns``."""
    known = set(sns)
    missing = sorted({step.cabinet for step in steps} - known - {ALL_CABINETS})
    if missing:
        shown = ", ".join(sorted(known)[:5]) + (", ..." if len(known) > 5 else "")
        raise ValueError(f"the scenario names cabinet(s) {', '.join(missing)} that are not running ({shown})")


async def run_scenario(
    steps: Sequence[ScenarioStep],
    cabinets: Sequence[SimulatedCabinet],
    *,
    base: Faults | None = None,
    on_step: Callable[[ScenarioStep, list[SimulatedCabinet]], None] | None = None,
) -> None:
    """Apply ``steps`` at their ``at`` (seconds from now) to ``cabinets``; returns after the last step.

    Every cabinet gets its own :class:`Faults` value. ``on_step`` is told each step and the cabinets it hit.
    """
    check_cabinets(steps, [cabinet.sn for cabinet in cabinets])
    loop = asyncio.get_running_loop()
    started = loop.time()
    for step in sorted(steps, key=lambda s: s.at):
        await asyncio.sleep(max(0.0, started + step.at - loop.time()))
        targets = [c for c in cabinets if step.cabinet in (ALL_CABINETS, c.sn)]
        for cabinet in targets:
            cabinet.faults = step.faults(base)
        if on_step is not None:
            on_step(step, targets)

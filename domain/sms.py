"""SMS backends: `console` (logs) and `file:PATH` (one JSON line per message). Chosen by SMS_BACKEND."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class SmsBackend(Protocol):
    async def send(self, *, to: str, text: str) -> None: ...


class ConsoleSms:
    async def send(self, *, to: str, text: str) -> None:
        log.info("event=sms_sent backend=console to=%s text=%r", to, text)


class FileSms:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, *, to: str, text: str) -> None:
        line = json.dumps({"to": to, "text": text}) + "\n"
        await asyncio.to_thread(self._append, line)
        log.info("event=sms_sent backend=file to=%s", to)

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)


def sms_backend(spec: str) -> SmsBackend:
    if spec == "console":
        return ConsoleSms()
    if spec.startswith("file:") and len(spec) > len("file:"):
        return FileSms(Path(spec[len("file:") :]))
    raise ValueError(f"Unknown SMS_BACKEND {spec!r}: use 'console' or 'file:/path/to/sms.jsonl'.")

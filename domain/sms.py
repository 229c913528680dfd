"""SMS backends, chosen by SMS_BACKEND: `console` (logs), `file:PATH` (one JSON line per message) and
`sparrow` (Sparrow SMS, Nepal: POST <SPARROW_BASE_URL>/sms/ with form fields token, from, to, text)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import httpx
import phonenumbers

from config import Settings, get_settings
from domain.errors import DomainError, ValidationFailed

log = logging.getLogger(__name__)


class SmsFailed(DomainError):
    """The SMS gateway refused the message or could not be reached; nothing was sent."""

    code, status = "sms_unavailable", 503
    default_message = "We could not send the SMS right now: try again in a minute."


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


def nepal_local_number(to: str) -> str:
    """The 10-digit national number Sparrow wants (`+9779812345678` → `9812345678`)."""
    try:
        number = phonenumbers.parse(to, "NP")
    except phonenumbers.NumberParseException as exc:
        raise ValidationFailed("SMS can only be sent to a phone number.", context={"to": to}) from exc
    if phonenumbers.region_code_for_number(number) != "NP" or not phonenumbers.is_valid_number(number):
        raise ValidationFailed("SMS can only be sent to Nepali (+977) mobile numbers.", context={"to": to})
    return str(number.national_number)


class SparrowSms:
    """Sparrow SMS v2 outgoing API. Success is HTTP 200 with `response_code` 200; anything else (their
    403 `{response_code: 1002, response: "Invalid Token"}` and friends, a timeout, no connection) is
    SmsFailed (503), logged with the gateway's code but never with the message text (it holds codes)."""

    def __init__(self, *, base_url: str, token: str, sender: str, timeout_s: float) -> None:
        self.url = base_url.rstrip("/") + "/sms/"
        self.token = token
        self.sender = sender
        self.timeout_s = timeout_s

    async def send(self, *, to: str, text: str) -> None:
        local = nepal_local_number(to)
        form = {"token": self.token, "from": self.sender, "to": local, "text": text}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.post(self.url, data=form)
        except httpx.HTTPError as exc:
            log.warning("event=sms_failed backend=sparrow to=%s error=%r", to, exc)
            raise SmsFailed() from exc
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        code = body.get("response_code") if isinstance(body, dict) else None
        if response.status_code != 200 or code != 200:
            reason = body.get("response") if isinstance(body, dict) else response.text[:200]
            log.warning(
                "event=sms_failed backend=sparrow to=%s status=%s response_code=%s response=%r",
                to,
                response.status_code,
                code,
                reason,
            )
            raise SmsFailed()
        log.info("event=sms_sent backend=sparrow to=%s", to)


def sms_backend(spec: str, settings: Settings | None = None) -> SmsBackend:
    """The backend SMS_BACKEND names; `sparrow` reads SPARROW_* from `settings` (default: the environment)."""
    if spec == "console":
        return ConsoleSms()
    if spec.startswith("file:") and len(spec) > len("file:"):
        return FileSms(Path(spec[len("file:") :]))
    if spec == "sparrow":
        settings = settings or get_settings()
        if not settings.sparrow_token or not settings.sparrow_from:
            raise ValueError("SMS_BACKEND=sparrow needs SPARROW_TOKEN and SPARROW_FROM.")
        return SparrowSms(
            base_url=settings.sparrow_base_url,
            token=settings.sparrow_token,
            sender=settings.sparrow_from,
            timeout_s=settings.sms_timeout_s,
        )
    raise ValueError(f"Unknown SMS_BACKEND {spec!r}: use 'console', 'file:/path/to/sms.jsonl' or 'sparrow'.")

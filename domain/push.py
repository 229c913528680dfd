"""Push through Firebase Cloud Messaging's HTTP v1 API, with a service account's OAuth2 flow.

Authentication (Google's "OAuth 2.0 for server to server applications"): a JWT signed RS256 with the
service account's private key — `iss` = its `client_email`, `scope` = firebase.messaging, `aud` = the token
endpoint, valid one hour — is exchanged at the token endpoint (`grant_type=urn:ietf:params:oauth:grant-type:
jwt-bearer`) for an access token, which is cached until shortly before it expires.

Sending: `POST {FCM_BASE_URL}/v1/projects/{project_id}/messages:send` with `Authorization: Bearer <token>` and
`{"message": {"token", "notification": {"title", "body"}, "data": {str: str}}}` → `{"name": ...}`.
Errors come as `{"error": {"code", "status", "message", "details": [{"@type": ".../FcmError", "errorCode"}]}}`
and are classified as data, not exceptions (`PushOutcome`): retry later (429, 5xx, network, auth), the token
is dead (UNREGISTERED, SENDER_ID_MISMATCH → delete it), or the message is refused (other 4xx).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt

from config import Settings

log = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600  # Google's maximum
TOKEN_REFRESH_MARGIN_S = 60.0  # refresh an access token this long before it expires
DEAD_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
RETRY_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED"})


# --- outcomes ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PushSent:
    message_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PushRetry:
    """Not delivered now, may be later: FCM busy or failing, network, our credentials refused."""

    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PushUnregistered:
    """The device token is no longer valid for this project: drop it."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PushRejected:
    """FCM refused this message for good (e.g. INVALID_ARGUMENT): sending it again will not help."""

    reason: str


PushOutcome = PushSent | PushRetry | PushUnregistered | PushRejected


class PushSender(Protocol):
    async def send(self, *, token: str, title: str, body: str, data: Mapping[str, str]) -> PushOutcome: ...

    async def aclose(self) -> None: ...


# --- the service account and its access token ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccount:
    """The fields of a Google service-account key file that the flow uses."""

    project_id: str
    client_email: str
    private_key: str  # PEM, PKCS#8
    private_key_id: str
    token_uri: str

    @classmethod
    def load(cls, path: Path) -> ServiceAccount:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("type") != "service_account":
            raise ValueError(f"{path} is not a service-account key file (type={raw.get('type')!r})")
        try:
            return cls(
                project_id=raw["project_id"],
                client_email=raw["client_email"],
                private_key=raw["private_key"],
                private_key_id=raw["private_key_id"],
                token_uri=raw["token_uri"],
            )
        except KeyError as exc:
            raise ValueError(f"{path} lacks the service-account field {exc.args[0]!r}") from exc


class _AuthFailed(Exception):
    pass


def assertion(account: ServiceAccount, *, audience: str, now: float) -> str:
    """The signed JWT that the token endpoint exchanges for an access token."""
    issued = int(now)
    claims = {
        "iss": account.client_email,
        "scope": FCM_SCOPE,
        "aud": audience,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME_S,
    }
    return jwt.encode(claims, account.private_key, algorithm="RS256", headers={"kid": account.private_key_id})


def _fcm_error(reply: httpx.Response) -> tuple[str, str]:
    """(error code, message) of an FCM error reply: the FcmError detail's code, else the RPC status."""
    try:
        error = reply.json().get("error", {})
    except ValueError:
        return f"HTTP_{reply.status_code}", reply.text[:200]
    if not isinstance(error, dict):
        return f"HTTP_{reply.status_code}", str(error)[:200]
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            return str(detail["errorCode"]), str(error.get("message", ""))
    return str(error.get("status") or f"HTTP_{reply.status_code}"), str(error.get("message", ""))


def _retry_after(reply: httpx.Response) -> float | None:
    value = reply.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the backoff decides


# --- the client ----------------------------------------------------------------------------------------


class FcmClient:
    """One per process: keeps its HTTP connections and the cached access token."""

    def __init__(
        self,
        account: ServiceAccount,
        *,
        base_url: str,
        token_url: str | None = None,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.account = account
        self.send_url = f"{base_url.rstrip('/')}/v1/projects/{account.project_id}/messages:send"
        self.token_url = token_url or account.token_uri
        self.clock = clock
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._token: tuple[str, float] | None = None  # (access token, expires at, by `clock`)
        self._refreshing = asyncio.Lock()

    async def access_token(self) -> str:
        """The cached access token, or a new one from the token endpoint (one request at a time)."""
        async with self._refreshing:
            if self._token is not None and self.clock() < self._token[1] - TOKEN_REFRESH_MARGIN_S:
                return self._token[0]
            now = self.clock()
            form = {
                "grant_type": JWT_BEARER_GRANT,
                "assertion": assertion(self.account, audience=self.token_url, now=now),
            }
            try:
                reply = await self._http.post(self.token_url, data=form)
            except httpx.HTTPError as exc:
                raise _AuthFailed(f"token endpoint unreachable: {exc!r}") from exc
            try:
                body = reply.json()
            except ValueError:
                body = {}
            if reply.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
                log.error("event=fcm_auth_refused status=%s error=%s", reply.status_code, str(body)[:200])
                raise _AuthFailed(f"token endpoint answered {reply.status_code}")
            self._token = (str(body["access_token"]), now + float(body.get("expires_in", 3600)))
            log.info("event=fcm_token_issued expires_in=%s", body.get("expires_in"))
            return self._token[0]

    async def send(self, *, token: str, title: str, body: str, data: Mapping[str, str]) -> PushOutcome:
        message: dict[str, Any] = {
            "token": token,
            "notification": {"title": title, "body": body},
            "data": {str(k): str(v) for k, v in data.items()},
        }
        try:
            bearer = await self.access_token()
        except _AuthFailed as exc:
            return PushRetry(reason=f"auth: {exc}")
        try:
            reply = await self._http.post(
                self.send_url,
                json={"message": message},
                headers={"Authorization": f"Bearer {bearer}"},
            )
        except httpx.HTTPError as exc:
            return PushRetry(reason=f"transport: {type(exc).__name__}")
        if reply.status_code == 200:
            try:
                name = str(reply.json().get("name", ""))
            except ValueError:
                name = ""
            return PushSent(message_id=name)
        code, text = _fcm_error(reply)
        reason = f"{reply.status_code} {code}: {text}"[:200]
        if reply.status_code == 401:  # our access token was refused: get a fresh one next time
            self._token = None
            return PushRetry(reason=reason)
        if code in DEAD_TOKEN_CODES:
            return PushUnregistered(reason=reason)
        if code in RETRY_CODES or reply.status_code == 429 or reply.status_code >= 500:
            return PushRetry(reason=reason, retry_after_s=_retry_after(reply))
        return PushRejected(reason=reason)

    async def aclose(self) -> None:
        await self._http.aclose()


def fcm_client(settings: Settings) -> FcmClient | None:
    """The push client the settings describe; None (no push) without FCM_SERVICE_ACCOUNT_FILE."""
    if settings.fcm_service_account_file is None:
        return None
    return FcmClient(
        ServiceAccount.load(settings.fcm_service_account_file),
        base_url=settings.fcm_base_url,
        token_url=settings.fcm_token_url,
        timeout_s=settings.fcm_timeout_s,
    )

"""Fake Google OAuth2 token endpoint and FCM HTTP v1, so the real `domain.push` client runs against them.

POST /token  form {grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer, assertion=<JWT>}: the assertion
    must be RS256-signed by the service account's key (`kid` = its private_key_id), `iss` its client_email,
    `aud` this endpoint, `scope` firebase.messaging, `iat`/`exp` at most an hour apart and current
    → {access_token, expires_in, token_type: "Bearer"}; else 400 {error: invalid_grant|unsupported_grant_type,
    error_description} as Google answers.
POST /v1/projects/{project_id}/messages:send  `Authorization: Bearer <access_token>`,
    {"message": {"token", "notification": {"title", "body"}, "data": {str: str}}} → {"name": ...};
    errors as FCM sends them: {"error": {code, message, status, details: [{"@type": ...FcmError, errorCode}]}}
    — 401 UNAUTHENTICATED, 403 PERMISSION_DENIED (other project), 400 INVALID_ARGUMENT (bad body),
    404 UNREGISTERED (a token the test `unregister`ed), and whatever `fail_next` queues (500 INTERNAL,
    503 UNAVAILABLE, ...).

`FakeFcm.service_account_file(dir)` writes the service-account JSON (a fresh RSA key pair made with
`cryptography`) that the client loads, with `token_uri` pointing here.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
STATUS_OF = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}


def _key_pair() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, key.public_key()


def fcm_error(http_status: int, error_code: str, message: str) -> JSONResponse:
    status = STATUS_OF.get(http_status, error_code)
    body = {
        "error": {
            "code": http_status,
            "message": message,
            "status": status,
            "details": [{"@type": FCM_ERROR, "errorCode": error_code}],
        }
    }
    return JSONResponse(body, status_code=http_status)


@dataclass
class Failure:
    status: int
    error_code: str
    retry_after: str | None = None
    token: str | None = None  # fail only messages to this token (None: any)


@dataclass
class FakeFcm:
    project_id: str = field(default_factory=lambda: f"chargeghar-test-{secrets.token_hex(3)}")
    client_email: str = "fcm-sender@chargeghar-test.iam.gserviceaccount.com"
    private_key_id: str = field(default_factory=lambda: secrets.token_hex(20))
    token_lifetime_s: int = 3599
    base_url: str = ""  # set by the test once served
    private_key_pem: str = ""
    public_key: Any = None
    access_tokens: dict[str, float] = field(default_factory=dict)  # token → expires at (by `clock`)
    token_requests: list[dict[str, Any]] = field(default_factory=list)  # verified assertion claims
    messages: list[dict[str, Any]] = field(default_factory=list)  # accepted `message` objects
    send_attempts: int = 0
    unregistered: set[str] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    clock: Callable[[], float] = time.time  # what "now" is for assertions and access tokens

    def __post_init__(self) -> None:
        if not self.private_key_pem:
            self.private_key_pem, self.public_key = _key_pair()

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    def service_account(self) -> dict[str, str]:
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_url,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }

    def service_account_file(self, directory: Path) -> Path:
        path = directory / f"{self.project_id}.json"
        path.write_text(json.dumps(self.service_account()))
        return path

    # --- what the test makes FCM do ------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        error_code: str = "INTERNAL",
        retry_after: str | None = None,
        token: str | None = None,
    ) -> None:
        """The next `count` sends (to `token`, or to any token) fail with this error."""
        self.failures.extend(Failure(status, error_code, retry_after, token) for _ in range(count))

    def unregister(self, token: str) -> None:
        """The app was uninstalled: FCM answers 404 UNREGISTERED for this token from now on."""
        self.unregistered.add(token)

    def sent_to(self, token: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["token"] == token]

    # --- the API -------------------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()

        def grant_error(error: str, description: str) -> JSONResponse:
            return JSONResponse({"error": error, "error_description": description}, status_code=400)

        @app.post("/token")
        async def token(request: Request) -> JSONResponse:
            if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                return grant_error("invalid_request", "Expected a form-encoded body.")
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            if form.get("grant_type") != GRANT:
                return grant_error("unsupported_grant_type", "Invalid grant_type.")
            assertion = str(form.get("assertion") or "")
            try:
                header = jwt.get_unverified_header(assertion)
                claims = jwt.decode(
                    assertion,
                    self.public_key,
                    algorithms=["RS256"],
                    audience=self.token_url,
                    issuer=self.client_email,
                    options={
                        "require": ["iss", "aud", "iat", "exp", "scope"],
                        "verify_exp": False,
                        "verify_iat": False,
                    },
                )
            except jwt.PyJWTError as exc:
                return grant_error("invalid_grant", f"Invalid JWT: {exc}")
            if header.get("kid") != self.private_key_id:
                return grant_error("invalid_grant", "Invalid JWT Signature.")
            now = self.clock()
            if claims["exp"] - claims["iat"] > 3600 or claims["iat"] > now + 60:
                return grant_error(
                    "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes)"
                )
            if claims["exp"] <= now:
                return grant_error("invalid_grant", "Invalid JWT: Token has expired.")
            if SCOPE not in str(claims["scope"]).split():
                return grant_error("invalid_scope", "The scope does not allow sending messages.")
            self.token_requests.append(claims)
            access = f"ya29.fake-{secrets.token_urlsafe(24)}"
            self.access_tokens[access] = now + self.token_lifetime_s
            return JSONResponse(
                {"access_token": access, "expires_in": self.token_lifetime_s, "token_type": "Bearer"}
            )

        @app.post("/v1/projects/{project_id}/messages:send")
        async def send(project_id: str, request: Request) -> JSONResponse:
            self.send_attempts += 1
            bearer = request.headers.get("authorization", "")
            access = bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else ""
            if self.access_tokens.get(access, 0.0) <= self.clock():
                return fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
            if project_id != self.project_id:
                return fcm_error(403, "SENDER_ID_MISMATCH", "Permission denied for this project.")
            try:
                body = await request.json()
            except ValueError:
                return fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
            problem = _invalid(body)
            if problem:
                return fcm_error(400, "INVALID_ARGUMENT", problem)
            message = body["message"]
            failure = next((f for f in self.failures if f.token in (None, message["token"])), None)
            if failure is not None:
                self.failures.remove(failure)
                response = fcm_error(failure.status, failure.error_code, "The service is unavailable.")
                if failure.retry_after is not None:
                    response.headers["Retry-After"] = failure.retry_after
                return response
            if message["token"] in self.unregistered:
                return fcm_error(404, "UNREGISTERED", "Requested entity was not found.")
            self.messages.append(message)
            return JSONResponse({"name": f"projects/{self.project_id}/messages/{secrets.token_hex(8)}"})

        return app


def _invalid(body: Any) -> str | None:
    """Why FCM would refuse this request body (400 INVALID_ARGUMENT), or None."""
    if (
        not isinstance(body, dict)
        or set(body) - {"message", "validate_only"}
        or not isinstance(body.get("message"), dict)
    ):
        return "Invalid JSON payload received. Expected {'message': {...}}."
    message = body["message"]
    targets = [name for name in ("token", "topic", "condition") if name in message]
    if targets != ["token"] or not isinstance(message["token"], str) or not message["token"]:
        return "Exactly one of token, topic or condition must be set (this sender uses token)."
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or set(notification) - {"title", "body", "image"}:
        return "Invalid value at 'message.notification'."
    if not all(isinstance(notification.get(k, ""), str) for k in ("title", "body")):
        return "Invalid value at 'message.notification': title and body are strings."
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        return "Invalid value at 'message.data': values must be strings."
    return None

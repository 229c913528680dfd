"""Fake Sparrow SMS v2 outgoing API (https://api.sparrowsms.com/v2/sms/), mounted under `/v2`.

POST /v2/sms/  form (or query) fields token, from, to (comma-separated 10-digit mobile numbers), text
    → 200 {"count": n, "response_code": 200, "response": "n mesages has been queued for delivery"}
Errors as Sparrow documents them, HTTP 403 with {"response_code": 10xx, "response": "..."}: 1000 a required
field is missing, 1002 Invalid Token, 1008 Invalid Sender, 1010 Text cannot be empty, 1011 No valid
receiver, 1013 Insufficient Credits. `fail_with` makes every call answer a given (status, body).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

LOCAL_MOBILE = re.compile(r"^9[678]\d{8}$")


@dataclass
class FakeSparrow:
    token: str = field(default_factory=lambda: f"v2_{secrets.token_hex(12)}")
    sender: str = "TheAlert"
    base_url: str = ""  # set by the test once served; the client's SPARROW_BASE_URL is base_url + "/v2"
    messages: list[dict[str, str]] = field(default_factory=list)  # accepted: {token, from, to, text}
    fail_with: tuple[int, dict[str, Any]] | None = None

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v2"

    def app(self) -> FastAPI:
        app = FastAPI()

        def refuse(code: int, text: str) -> JSONResponse:
            return JSONResponse({"response_code": code, "response": text}, status_code=403)

        @app.api_route("/v2/sms/", methods=["GET", "POST"])
        async def send(request: Request) -> JSONResponse:
            fields = dict(request.query_params)
            if request.method == "POST":
                fields.update({k: str(v) for k, v in (await request.form()).items()})
            if self.fail_with is not None:
                status, body = self.fail_with
                return JSONResponse(body, status_code=status)
            if any(not fields.get(name) for name in ("token", "from", "to")) or "text" not in fields:
                return refuse(1000, "A required field is missing")
            if fields["token"] != self.token:
                return refuse(1002, "Invalid Token")
            if fields["from"] != self.sender:
                return refuse(1008, "Invalid Sender")
            if not fields["text"]:
                return refuse(1010, "Text cannot be empty")
            receivers = [n.strip() for n in fields["to"].split(",") if LOCAL_MOBILE.match(n.strip())]
            if not receivers:
                return refuse(1011, "No valid receiver")
            for to in receivers:
                self.messages.append({**fields, "to": to})
            count = len(receivers)
            return JSONResponse(
                {
                    "count": count,
                    "response_code": 200,
                    "response": f"{count} mesages has been queued for delivery",
                }
            )

        return app

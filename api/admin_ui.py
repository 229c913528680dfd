"""The operators' web UI at /admin (sqladmin): password login, live station state, audited actions.

Read-mostly on purpose. What changes state goes through the same functions as the admin API (maintenance
through `api.operations`, with its audit entry); money, rentals and station provisioning cannot be edited
here at all. An admin may change a user's role and active flag, audited too.

Login: phone + argon2 password (`powerbank admin create --password`), failures counted by
`domain.lockout` per (phone, IP). The session is a signed cookie (HttpOnly, SameSite=Lax, Secure over
https) holding the user id; it ends after ADMIN_SESSION_TTL_S, and every request re-reads the user, so
a deactivated or demoted operator, or a changed password, ends it at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import Sequence
from ipaddress import ip_address, ip_network
from typing import Any, cast
from urllib.parse import urlsplit

from fastapi import FastAPI
from jinja2 import BaseLoader, ChoiceLoader, DictLoader
from markupsafe import Markup, escape
from sqladmin import Admin, Flash, ModelView, action
from sqladmin.authentication import AuthenticationBackend
from sqladmin.authorization import Action, AuthorizationBackend
from sqladmin.pagination import Pagination
from sqladmin.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.host import read_live
from actors.messages import KioskStatus
from api import operations
from api.deps import Services, request_ip, services
from api.schemas import StationOut
from domain import auth, lockout, passwords
from domain.errors import DomainError, LockedOut, ValidationFailed
from storage.audit_models import AuditEntry
from storage.kyc_models import KycSubmission
from storage.models import Rental, Role, Station, User

log = logging.getLogger(__name__)

BASE_URL = "/admin"
SESSION_COOKIE = "powerbank_admin"

LOGIN_TEMPLATE = """{% extends "sqladmin/base.html" %}
{% block body %}
<div class="d-flex align-items-center justify-content-center vh-100">
  <form class="col-lg-4 col-md-6 card card-md" action="{{ url_for('admin:login') }}" method="POST">
    <div class="card-body">
      <h2 class="card-title text-center mb-4">{{ admin.title }}: operator login</h2>
      {% if error %}<div class="alert alert-danger" role="alert" id="login-error">{{ error }}</div>{% endif %}
      <div class="mb-3">
        <label class="form-label" for="phone">Phone number</label>
        <input id="phone" name="phone" type="tel" class="form-control" placeholder="+9779812345678"
          value="{{ phone or '' }}" autocomplete="username" required>
      </div>
      <div class="mb-2">
        <label class="form-label" for="password">Password</label>
        <input id="password" name="password" type="password" class="form-control"
          autocomplete="current-password" required>
      </div>
      <div class="form-footer">
        <button type="submit" class="btn btn-primary w-100">Log in</button>
      </div>
    </div>
  </form>
</div>
{% endblock %}
"""


def _operator(request: Request) -> User:
    """The logged-in operator, as `OperatorLogin.authenticate` read them for this request."""
    return cast(User, request.state.operator)


def session_secret(services: Services) -> str:
    """Derived from the signing key, so it is as stable (and as secret) without being the same key."""
    return auth.derived_secret(services.settings, "admin session")


def wait_text(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} seconds"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


class SecureCookieOverHttps:
    """Marks the session cookie Secure when the request came over https: directly, or through one of
    TRUSTED_PROXIES that says so in X-Forwarded-Proto. Plain http in development keeps working."""

    def __init__(self, app: ASGIApp, cookie: str, trusted_proxies: str) -> None:
        self.app = app
        self.prefix = f"{cookie}=".encode()
        self.proxies = [
            ip_network(part.strip(), strict=False) for part in trusted_proxies.split(",") if part.strip()
        ]

    def _https(self, scope: Scope) -> bool:
        if scope.get("scheme") == "https":
            return True
        client = scope.get("client")
        try:
            peer = ip_address(client[0]) if client else None
        except ValueError:
            return False
        if peer is None or not any(peer in network for network in self.proxies):
            return False
        proto = Headers(scope=scope).get("x-forwarded-proto", "")
        return proto.split(",")[-1].strip().lower() == "https"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._https(scope):
            await self.app(scope, receive, send)
            return

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, v + b"; secure")
                    if k.lower() == b"set-cookie" and v.startswith(self.prefix) and b"secure" not in v.lower()
                    else (k, v)
                    for k, v in MutableHeaders(scope=message).raw
                ]
            await send(message)

        await self.app(scope, receive, send_secure)


class OperatorLogin(AuthenticationBackend):
    def __init__(self, services: Services) -> None:
        super().__init__(
            secret_key=session_secret(services),
            session_cookie=SESSION_COOKIE,
            max_age=services.settings.admin_session_ttl_s,
            path=BASE_URL,
            same_site="lax",
        )
        self.middlewares.insert(
            0,
            Middleware(
                SecureCookieOverHttps,
                cookie=SESSION_COOKIE,
                trusted_proxies=services.settings.trusted_proxies,
            ),
        )
        self.services = services
        self.key = session_secret(services).encode()
        self.templates: Jinja2Templates | None = None  # the admin's, set by mount_admin

    def fingerprint(self, password_hash: str | None) -> str:
        """Changes with the password, so a new password ends the sessions made with the old one."""
        return hmac.new(self.key, (password_hash or "").encode(), hashlib.sha256).hexdigest()[:24]

    async def _form_error(self, request: Request, *, phone: str, error: str, status: int) -> Response:
        assert self.templates is not None
        response: Response = await self.templates.TemplateResponse(
            request, "sqladmin/login.html", {"error": error, "phone": phone}, status_code=status
        )
        return response

    async def _locked(self, request: Request, phone: str, exc: LockedOut) -> Response:
        retry_after = int(exc.context.get("retry_after", self.services.settings.lockout_s))
        error = f"Too many failed logins: try again in {wait_text(retry_after)}."
        response = await self._form_error(request, phone=phone, error=error, status=exc.status)
        response.headers["Retry-After"] = str(retry_after)
        return response

    async def login(self, request: Request) -> Response | bool:
        svc = self.services
        form = await request.form()
        raw_phone, password = str(form.get("phone") or ""), str(form.get("password") or "")
        try:
            kind, phone = auth.normalise_identifier(raw_phone)
        except ValidationFailed:
            kind, phone = "", raw_phone
        if kind != "phone":
            error = "Enter your phone number in international form, e.g. +9779812345678."
            return await self._form_error(request, phone=raw_phone, error=error, status=400)
        ip = request_ip(request)
        try:
            await lockout.ensure_not_locked(svc.redis, identifier=phone, ip=ip)
        except LockedOut as exc:
            return await self._locked(request, phone, exc)

        async with svc.db.transaction() as session:
            user = await session.scalar(select(User).where(User.phone == phone))
        stored = user.password_hash if user is not None else None
        matches = await asyncio.to_thread(passwords.verify, stored, password)
        if not (matches and user is not None and user.is_active and user.role in passwords.STAFF_ROLES):
            log.warning("event=admin_login_failed ip=%s", ip)
            await lockout.failed(svc.redis, svc.settings, identifier=phone, ip=ip)
            try:
                await lockout.ensure_not_locked(svc.redis, identifier=phone, ip=ip)
            except LockedOut as exc:
                return await self._locked(request, phone, exc)
            return await self._form_error(
                request, phone=phone, error="Wrong phone number or password.", status=400
            )

        await lockout.succeeded(svc.redis, identifier=phone, ip=ip)
        if stored is not None and passwords.needs_rehash(stored):
            stored = await asyncio.to_thread(passwords.hash_password, password)
            async with svc.db.transaction() as session:
                fresh = await session.get(User, user.id, with_for_update=True)
                if fresh is not None:
                    fresh.password_hash = stored
        request.session.clear()
        request.session.update(
            {"user_id": str(user.id), "since": int(time.time()), "pw": self.fingerprint(stored)}
        )
        log.info("event=admin_login user_id=%s role=%s ip=%s", user.id, user.role.value, ip)
        return True

    async def logout(self, request: Request) -> Response | bool:
        request.session.clear()
        return RedirectResponse(request.url_for("admin:login"), status_code=302)

    async def authenticate(self, request: Request) -> Response | bool:
        user = await self.session_user(request)
        if user is None:
            request.session.clear()
            return False
        request.state.operator = user
        return True

    async def session_user(self, request: Request) -> User | None:
        data = request.session
        try:
            user_id, since, pw = uuid.UUID(data["user_id"]), int(data["since"]), str(data["pw"])
        except (KeyError, TypeError, ValueError):
            return None
        if time.time() - since > self.services.settings.admin_session_ttl_s:
            return None
        async with self.services.db.transaction() as session:
            user = await session.get(User, user_id)
        if user is None or not user.is_active or user.role not in passwords.STAFF_ROLES:
            return None
        if not hmac.compare_digest(self.fingerprint(user.password_hash), pw):
            return None
        return user


class OperatorPermissions(AuthorizationBackend):
    """Operators and admins see everything; only an admin edits users (role and active flag), and not
    themselves. What a view does not offer at all is switched off by its `can_*` flags."""

    def has_permission(self, request: Request, identity: str, action: str, obj: Any | None = None) -> bool:
        operator: User | None = getattr(request.state, "operator", None)
        if operator is None:
            return False
        if identity == UserAdmin.identity and action == Action.EDIT:
            return operator.role == Role.ADMIN and (obj is None or obj.id != operator.id)
        return True


def same_origin(request: Request) -> bool:
    """A state-changing GET (sqladmin's actions are links) must come from our own pages: SameSite=Lax
    still sends the cookie on a top-level navigation from another site."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return False
    parts = urlsplit(source)
    return (parts.scheme, parts.netloc) == (request.url.scheme, request.url.netloc)


class SameOriginWrites:
    """Every state-changing /admin request (any method but GET, HEAD, OPTIONS: the edit forms, login,
    logout) must come from our own pages, by `Sec-Fetch-Site` or else `Origin`/`Referer` (`same_origin`).
    SameSite=Lax alone let a page on another port of the same host post an edit form with the operator's
    cookie. Refused: 403, nothing done."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in self.SAFE and not same_origin(Request(scope)):
            log.info("event=request_refused path=%s code=cross_site_write", scope["path"])
            response = PlainTextResponse("Cross-site request refused: use the forms of this site.", 403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _badge(text: str, colour: str) -> Markup:
    return Markup('<span class="badge bg-{} text-{}-fg">{}</span>').format(colour, colour, escape(text))


STATE_COLOURS = {"ONLINE": "green", "OFFLINE": "secondary", "MAINTENANCE": "orange"}


def _live(request: Request, station: Station) -> StationOut:
    found: dict[str, KioskStatus] = getattr(request.state, "live", {})
    return StationOut.of(station, found.get(station.serial_number))


def _state(station: Station, _: str, request: Request) -> Markup:
    state = _live(request, station).status
    return _badge(state, STATE_COLOURS[state])


def _available(station: Station, _: str, request: Request) -> int:
    return _live(request, station).available_power_banks


def _empty(station: Station, _: str, request: Request) -> int:
    return _live(request, station).empty_slots


class ReadOnly(ModelView):
    """Nothing created, edited, deleted, imported or exported through the UI unless a view says so."""

    can_create = False
    can_edit = False
    can_delete = False
    can_export = False
    can_import = False
    page_size = 25

    async def enrich(self, request: Request, rows: Sequence[Any]) -> None:
        """Load what the shown rows' formatters need beyond the rows themselves (one query per page)."""

    async def list(self, request: Request) -> Pagination:
        page = await super().list(request)
        await self.enrich(request, page.rows)
        return page

    async def get_object_for_details(self, request: Request) -> Any:
        obj = await super().get_object_for_details(request)
        if obj is not None:
            await self.enrich(request, [obj])
        return obj


class StationAdmin(ReadOnly, model=Station):
    """Live state from the hosts' summaries in Redis (one round trip per page, like the API's list)."""

    identity = "station"
    name, name_plural = "Station", "Stations"
    icon = "fa-solid fa-charging-station"
    column_list = [Station.serial_number, Station.name, "state", "available", "empty", Station.address]
    column_details_list = [
        Station.serial_number,
        Station.name,
        "state",
        "available",
        "empty",
        Station.status,
        Station.address,
        Station.latitude,
        Station.longitude,
        Station.boards,
        Station.holes_per_board,
        Station.opening_time,
        Station.closing_time,
        Station.created_at,
        Station.first_connected_at,
        Station.credentials_issued_at,
        Station.credentials_issued_ip,
        Station.reprovision_until,
    ]
    column_labels = {
        Station.first_connected_at: "First MQTT login",
        Station.credentials_issued_at: "Credentials last issued (boot call)",
        Station.credentials_issued_ip: "... to IP",
        Station.reprovision_until: "Re-provisioning window open until",
        "state": "State",
        "available": "Available power banks",
        "empty": "Empty slots",
        Station.status: "Maintenance flag",
    }
    column_searchable_list = [Station.serial_number, Station.name]
    column_sortable_list = [Station.serial_number, Station.name]
    column_default_sort = [(Station.serial_number, False)]
    column_formatters = {"state": _state, "available": _available, "empty": _empty}
    column_formatters_detail = column_formatters

    async def enrich(self, request: Request, rows: Sequence[Station]) -> None:
        request.state.live = await read_live(services(request).redis, [s.serial_number for s in rows])

    @action(
        name="maintenance-on",
        label="Maintenance on",
        confirmation_message="Put the station into maintenance? No rental starts there until it is off.",
    )
    async def maintenance_on(self, request: Request) -> Response:
        return await self._maintenance(request, on=True)

    @action(name="maintenance-off", label="Maintenance off", confirmation_message="End maintenance?")
    async def maintenance_off(self, request: Request) -> Response:
        return await self._maintenance(request, on=False)

    async def _maintenance(self, request: Request, *, on: bool) -> Response:
        if not same_origin(request):
            raise HTTPException(status_code=403, detail="Use the buttons of this site.")
        svc, operator = services(request), _operator(request)
        ids = [int(pk) for pk in request.query_params.get("pks", "").split(",") if pk.strip().isdigit()]
        async with svc.db.transaction() as session:
            serials = list(await session.scalars(select(Station.serial_number).where(Station.id.in_(ids))))
        done = []
        for sn in serials:
            try:
                await operations.set_maintenance(
                    svc, serial_number=sn, on=on, actor=operator, ip=request_ip(request)
                )
            except DomainError as exc:
                Flash.error(request, f"{sn}: {exc.message}")
            else:
                done.append(sn)
        if done:
            Flash.success(request, f"Maintenance {'on' if on else 'off'}: {', '.join(done)}")
        if len(ids) == 1:
            return RedirectResponse(request.url_for("admin:details", identity=self.identity, pk=ids[0]), 302)
        return RedirectResponse(request.url_for("admin:list", identity=self.identity), 302)


def _serial(rental: Rental, prop: str) -> str:
    station: Station | None = getattr(rental, prop)
    return station.serial_number if station is not None else ""


class RentalAdmin(ReadOnly, model=Rental):
    identity = "rental"
    name, name_plural = "Rental", "Rentals"
    icon = "fa-solid fa-battery-half"
    column_list = [
        Rental.rental_code,
        Rental.status,
        Rental.payment_status,
        Rental.station,
        Rental.powerbank_sn,
        Rental.started_at,
        Rental.due_at,
        Rental.ended_at,
        Rental.amount_paid,
    ]
    column_details_exclude_list = [Rental.package]
    column_searchable_list = [Rental.rental_code, Rental.powerbank_sn]
    column_sortable_list = [Rental.started_at, Rental.status, Rental.rental_code]
    column_default_sort = [(Rental.created_at, True)]
    column_formatters = {Rental.station: _serial, Rental.return_station: _serial}
    column_formatters_detail = column_formatters


class UserAdmin(ReadOnly, model=User):
    """Never shows the password hash. Admins change role and active flag (audited); no one else edits."""

    identity = "user"
    name, name_plural = "User", "Users"
    icon = "fa-solid fa-user"
    can_edit = True
    column_list = [
        User.phone,
        User.email,
        User.name,
        User.role,
        User.is_active,
        User.kyc_status,
        User.created_at,
    ]
    column_details_list = [
        User.id,
        User.phone,
        User.email,
        User.name,
        User.role,
        User.is_active,
        User.kyc_status,
        "web_login",
        User.created_at,
    ]
    column_labels = {"web_login": "Has an /admin password"}
    column_formatters_detail = {"web_login": lambda user, _: user.password_hash is not None}
    column_searchable_list = [User.phone, User.email, User.name]
    column_sortable_list = [User.created_at, User.role]
    column_default_sort = [(User.created_at, True)]
    form_columns = [User.role, User.is_active]

    async def update_model(self, request: Request, pk: str, data: dict[str, Any]) -> Any:
        svc, operator = services(request), _operator(request)
        async with svc.db.transaction() as session:
            user = await operations.update_user(
                session,
                user_id=uuid.UUID(pk),
                role=Role(data["role"]),
                is_active=bool(data["is_active"]),
                actor=operator,
                ip=request_ip(request),
            )
        return user


class KycAdmin(ReadOnly, model=KycSubmission):
    """The review queue: open submissions first, oldest first (reviews go through the admin API)."""

    identity = "kyc-submission"
    name, name_plural = "KYC submission", "KYC queue"
    icon = "fa-solid fa-id-card"
    column_list = [
        KycSubmission.submitted_at,
        KycSubmission.user_id,
        KycSubmission.document_type,
        KycSubmission.status,
        KycSubmission.reviewed_at,
        KycSubmission.reason,
    ]
    column_default_sort = [(KycSubmission.status, False), (KycSubmission.submitted_at, False)]
    column_sortable_list = [KycSubmission.submitted_at, KycSubmission.status]
    column_searchable_list = [KycSubmission.status]
    non_link_related_fields = [KycSubmission.documents]
    column_formatters_detail = {
        KycSubmission.documents: lambda sub, _: [
            f"{d.side.value}: {d.content_type}, {d.size} bytes" for d in sub.documents
        ]
    }


def _actor(entry: AuditEntry, _: str, request: Request) -> str:
    phones: dict[uuid.UUID, str] = getattr(request.state, "actor_phones", {})
    if entry.actor_id is None:
        return "system"
    return f"{phones.get(entry.actor_id, entry.actor_id)} ({entry.actor_role})"


class AuditAdmin(ReadOnly, model=AuditEntry):
    identity = "audit-entry"
    name, name_plural = "Audit entry", "Audit log"
    icon = "fa-solid fa-clipboard-list"
    column_list = [
        AuditEntry.created_at,
        "actor",
        AuditEntry.action,
        AuditEntry.target_type,
        AuditEntry.target_id,
        AuditEntry.ip,
    ]
    column_details_list = [
        AuditEntry.id,
        AuditEntry.created_at,
        "actor",
        AuditEntry.action,
        AuditEntry.target_type,
        AuditEntry.target_id,
        AuditEntry.before,
        AuditEntry.after,
        AuditEntry.ip,
    ]
    column_labels = {"actor": "Actor"}
    column_formatters = {"actor": _actor}
    column_formatters_detail = column_formatters
    column_searchable_list = [AuditEntry.action, AuditEntry.target_id]
    column_default_sort = [(AuditEntry.id, True)]  # newest first

    async def enrich(self, request: Request, rows: Sequence[AuditEntry]) -> None:
        ids = {e.actor_id for e in rows if e.actor_id is not None}
        async with services(request).db.transaction() as session:
            found = (await session.execute(select(User.id, User.phone).where(User.id.in_(ids)))).all()
        request.state.actor_phones = {user_id: phone or "" for user_id, phone in found}


VIEWS: tuple[type[ModelView], ...] = (StationAdmin, RentalAdmin, UserAdmin, KycAdmin, AuditAdmin)


def mount_admin(app: FastAPI, services: Services) -> Admin:
    """sqladmin at /admin over the API's engine, with its own session factory (sqladmin reconfigures
    the one it is given)."""
    login = OperatorLogin(services)
    admin = Admin(
        app,
        session_maker=async_sessionmaker(services.db.engine, expire_on_commit=False),
        base_url=BASE_URL,
        title="ChargeGhar",
        authentication_backend=login,
        authorization_backend=OperatorPermissions(),
    )
    loader = cast(BaseLoader, admin.templates.env.loader)
    admin.templates.env.loader = ChoiceLoader([DictLoader({"sqladmin/login.html": LOGIN_TEMPLATE}), loader])
    admin.admin.state.services = services
    admin.admin.add_middleware(SameOriginWrites)
    login.templates = admin.templates
    for view in VIEWS:
        admin.add_view(view)
    return admin

"""The /admin web UI in headless Chromium, against the running system: operator login (argon2 passwords,
lock-out), live station state, maintenance through the audited operation, the audit log, who may edit.

Each browser context sends its own X-Forwarded-For (believed from 127.0.0.1, one of TRUSTED_PROXIES in
the tests), so the lock-out counters of one test (per phone + IP, and per IP) touch no other test's.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from starlette.requests import Request
from starlette.responses import HTMLResponse

from api.admin_ui import OperatorLogin
from domain import passwords, users
from domain.errors import ValidationFailed
from storage.kyc_models import KycDocument, KycDocumentType, KycSide, KycSubmission
from storage.models import Role, User
from tests.conftest import Api, new_phone
from tests.fakes.server import serve
from tests.support import funded_user, rent, start_cabinet, wait_ready

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "correct horse battery staple"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    ),
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium (Debian's; Playwright's own browsers are not downloaded). Every launch
    gets a fresh temporary profile, and every test its own context (cookies, IP)."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        await chromium.close()


async def new_context(browser: Browser, base_url: str) -> BrowserContext:
    ip = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    context = await browser.new_context(base_url=base_url, extra_http_headers={"X-Forwarded-For": ip})
    context.set_default_timeout(15_000)
    return context


@pytest.fixture
async def page(browser: Browser, base_url: str) -> AsyncIterator[Page]:
    context = await new_context(browser, base_url)
    yield await context.new_page()
    await context.close()


async def staff(system: Any, *, role: Role = Role.OPERATOR, password: str = PASSWORD) -> User:
    """An operator (or admin) with an /admin password, made with the domain code."""
    async with system.services.db.transaction() as session:
        user = await users.ensure_staff(session, phone=new_phone(), role=role)
        passwords.set_password(user, password, min_length=system.settings.admin_password_min_length)
    return user


async def log_in(page: Page, phone: str, password: str = PASSWORD) -> None:
    await page.goto("/admin/login")
    await page.get_by_label("Phone number").fill(phone)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()


async def logged_in(page: Page, phone: str, password: str = PASSWORD) -> None:
    await log_in(page, phone, password)
    await expect(page).to_have_url(re.compile(r"/admin/$"))
    await expect(page.get_by_role("link", name="Logout")).to_be_visible()


async def test_operator_puts_a_station_into_maintenance_and_finds_it_in_the_audit_log(
    system: Any, client: httpx.AsyncClient, api: Api, operator_token: str, page: Page
) -> None:
    cabinet = await start_cabinet(client, operator_token, holes=4)
    try:
        sn = cabinet.sn
        await wait_ready(client, operator_token, sn, within=15)
        operator = await staff(system)
        assert operator.phone is not None

        await logged_in(page, operator.phone)
        cookie = next(c for c in await page.context.cookies() if c["name"] == "powerbank_admin")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/admin"
        assert not cookie["secure"]  # plain http here; over https (or X-Forwarded-Proto: https) it is Secure

        renter = await funded_user(client, api, operator_token)
        r = await rent(client, renter["access"], sn)
        assert r.status_code in (200, 201), r.text
        rental_code = r.json()["data"]["rental_code"]

        # Rentals: read-only, found by code, with their station.
        await page.get_by_role("link", name="Rentals").click()
        await page.locator("#search-input").fill(rental_code)
        await page.locator("#search-button").click()
        rental_row = page.locator("tbody tr", has_text=rental_code)
        await expect(rental_row).to_contain_text(sn)
        await expect(rental_row).to_contain_text("ACTIVE")
        await expect(rental_row.locator("a[href*='/rental/edit/']")).to_have_count(0)
        await rental_row.locator("a[href*='/rental/details/']").click()
        await expect(page.locator("table")).to_contain_text(rental_code)
        await expect(page.get_by_role("link", name="Edit", exact=True)).to_have_count(0)

        # The station list, with the live state from the cabinet's host.
        await page.get_by_role("link", name="Stations").click()
        await page.locator("#search-input").fill(sn)
        await page.locator("#search-button").click()
        row = page.locator("tbody tr", has_text=sn)
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("ONLINE")
        await row.locator("a[href*='/station/details/']").click()

        # Its page: live state and banks, then maintenance on (confirmed in the dialog).
        details = page.locator("table")
        await expect(details).to_contain_text("Available power banks")
        await expect(details).to_contain_text("ONLINE")
        await page.get_by_role("link", name="Maintenance on").click()
        await page.locator(".modal.show").get_by_role("link", name="Yes").click()
        await expect(page.locator(".toast-body")).to_contain_text(f"Maintenance on: {sn}")
        await expect(details).to_contain_text("MAINTENANCE")

        # The audit log, newest first: this operator's entry for this station.
        await page.get_by_role("link", name="Audit log").click()
        first = page.locator("tbody tr").first
        await expect(first).to_contain_text("station.maintenance_on")
        await expect(first).to_contain_text(sn)
        await expect(first).to_contain_text(f"{operator.phone} (operator)")

        # The app sees it too.
        r = await client.get(f"/api/stations/{sn}", headers=Api.auth(operator_token))
        assert r.json()["data"]["status"] == "MAINTENANCE", r.text

        # Off again, from the list page's action menu this time.
        await page.goto(f"/admin/station/list?search={sn}")
        await page.locator("tbody tr", has_text=sn).locator(".select-box").check()
        await page.get_by_role("button", name="Actions").click()
        await page.get_by_text("Maintenance off").click()
        await page.locator(".modal.show").get_by_role("link", name="Yes").click()
        await expect(page.locator(".toast-body")).to_contain_text(f"Maintenance off: {sn}")
        r = await client.get(f"/api/stations/{sn}", headers=Api.auth(operator_token))
        assert r.json()["data"]["status"] != "MAINTENANCE", r.text
    finally:
        await cabinet.stop()


async def test_wrong_passwords_are_counted_until_the_login_is_locked(
    system: Any, browser: Browser, base_url: str
) -> None:
    operator = await staff(system)
    assert operator.phone is not None
    attempts = system.settings.otp_max_attempts  # the lock-out limit per (phone, IP)
    context = await new_context(browser, base_url)
    try:
        page = await context.new_page()
        for _ in range(attempts - 1):
            await log_in(page, operator.phone, "not the password at all")
            await expect(page.locator("#login-error")).to_have_text("Wrong phone number or password.")
        await log_in(page, operator.phone, "not the password at all")
        locked = re.compile(r"Too many failed logins: try again in \d+ minutes?\.")
        await expect(page.locator("#login-error")).to_have_text(locked)
        await log_in(page, operator.phone)  # the right password, but locked now
        await expect(page.locator("#login-error")).to_have_text(locked)
        await page.goto("/admin/")
        await expect(page).to_have_url(re.compile(r"/admin/login$"))
    finally:
        await context.close()
    # The lock is per phone and address: the operator still gets in from elsewhere.
    elsewhere = await new_context(browser, base_url)
    try:
        await logged_in(await elsewhere.new_page(), operator.phone)
    finally:
        await elsewhere.close()


async def test_app_users_and_inactive_operators_cannot_log_in(system: Any, page: Page) -> None:
    phone = new_phone()
    async with system.services.db.transaction() as session:
        app_user = User(phone=phone, role=Role.USER)
        session.add(app_user)
        with pytest.raises(ValidationFailed):
            passwords.set_password(app_user, PASSWORD, min_length=12)
        app_user.password_hash = passwords.hash_password(PASSWORD)  # as if left over from a demotion
    await log_in(page, phone)
    await expect(page.locator("#login-error")).to_have_text("Wrong phone number or password.")

    operator = await staff(system)
    assert operator.phone is not None
    await logged_in(page, operator.phone)
    async with system.services.db.transaction() as session:
        row = await session.get(User, operator.id)
        assert row is not None
        row.is_active = False
    # Every request re-reads the user: the open session ends at once.
    await page.get_by_role("link", name="Stations").click()
    await expect(page).to_have_url(re.compile(r"/admin/login$"))
    await log_in(page, operator.phone)
    await expect(page.locator("#login-error")).to_have_text("Wrong phone number or password.")


async def test_admin_pages_without_a_session_redirect_to_the_login(
    client: httpx.AsyncClient, page: Page
) -> None:
    for path in (
        "/admin/",
        "/admin/station/list",
        "/admin/audit-entry/list",
        "/admin/user/list",
        "/admin/kyc-submission/list",
        "/admin/rental/list",
        "/admin/station/action/maintenance-on?pks=1",
    ):
        r = await client.get(path)
        assert r.status_code == 302 and r.headers["location"].endswith("/admin/login"), (path, r.status_code)
    await page.goto("/admin/station/list")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))
    await expect(page.get_by_role("button", name="Log in")).to_be_visible()


async def test_only_admins_edit_users_and_only_role_and_active_flag(system: Any, page: Page) -> None:
    admin, operator = await staff(system, role=Role.ADMIN), await staff(system)
    assert admin.phone is not None and operator.phone is not None

    await logged_in(page, operator.phone)
    await page.goto(f"/admin/user/details/{admin.id}")
    await expect(page.locator("table")).to_contain_text(admin.phone)
    await expect(page.locator("table")).not_to_contain_text("argon2")  # the hash is never shown
    await expect(page.get_by_role("link", name="Edit", exact=True)).to_have_count(0)
    response = await page.goto(f"/admin/user/edit/{admin.id}")
    assert response is not None and response.status == 403
    await page.goto("/admin/logout")

    await logged_in(page, admin.phone)
    async with system.services.db.transaction() as session:
        submission = KycSubmission(user_id=operator.id, document_type=KycDocumentType.PASSPORT)
        submission.documents = [
            KycDocument(side=side, storage_key=f"t/{side}", sha256="0" * 64, size=9, content_type="image/png")
            for side in (KycSide.FRONT, KycSide.SELFIE)
        ]
        session.add(submission)
    await page.get_by_role("link", name="KYC queue").click()
    await page.locator(f"a[href$='/kyc-submission/details/{submission.id}']").click()
    await expect(page.locator("table")).to_contain_text("PASSPORT")
    await expect(page.locator("table")).to_contain_text("selfie: image/png, 9 bytes")
    await page.goto(f"/admin/user/edit/{operator.id}")
    assert await page.locator("#role").count() == 1 and await page.locator("#is_active").count() == 1
    assert await page.locator("#phone, #password_hash, #name").count() == 0
    await page.locator("#is_active").uncheck()
    await page.get_by_role("button", name="Save", exact=True).click()
    await expect(page).to_have_url(re.compile(r"/admin/user/list"))
    async with system.services.db.transaction() as session:
        row = await session.get(User, operator.id)
        assert row is not None and not row.is_active
    await page.get_by_role("link", name="Audit log").click()
    first = page.locator("tbody tr").first
    await expect(first).to_contain_text("user.updated")
    await expect(first).to_contain_text(str(operator.id))
    # Not on themselves.
    response = await page.goto(f"/admin/user/edit/{admin.id}")
    assert response is not None and response.status == 403


async def test_cli_admin_create_with_a_password_from_stdin_then_browser_login(
    system: Any, page: Page, tmp_path: Path
) -> None:
    """What the README tells an operator to run; the password never appears on the command line."""
    phone = new_phone()
    env = {**os.environ, "DATABASE_URL": system.settings.database_url, "DATA_DIR": str(tmp_path / "var")}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("powerbank")),
        *("admin", "create", "--phone", phone, "--password-stdin"),
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(f"{PASSWORD}\n".encode()), 120)
    assert process.returncode == 0, err.decode()
    assert PASSWORD not in (out + err).decode()
    await logged_in(page, phone)


async def test_the_session_cookie_is_secure_when_served_over_https(system: Any, base_url: str) -> None:
    """Behind a TLS proxy (X-Forwarded-Proto from one of TRUSTED_PROXIES) the cookie gets the Secure flag."""
    operator = await staff(system)
    headers = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": f"10.200.{random.randrange(256)}.1",
        "Sec-Fetch-Site": "same-origin",  # what a browser sends with the login form
    }
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as browserless:
        r = await browserless.post("/admin/login", data={"phone": operator.phone, "password": PASSWORD})
    assert r.status_code == 302, r.text
    cookie = r.headers["set-cookie"].lower()
    assert cookie.startswith("powerbank_admin=")
    for flag in (
        "httponly",
        "samesite=lax",
        "secure",
        "path=/admin",
        f"max-age={system.settings.admin_session_ttl_s}",
    ):
        assert flag in cookie, cookie


async def test_a_session_ends_after_its_ttl_and_with_a_new_password(system: Any) -> None:
    """The signed cookie holds the user id, the login time and a fingerprint of the password hash; every
    request re-reads the user, so all three are checked each time."""
    operator = await staff(system)
    login = OperatorLogin(system.services)

    def request(**session: Any) -> Request:
        scope = {"type": "http", "session": session, "headers": [], "app": None}
        return Request(scope)

    now, ttl, pw = (
        int(time.time()),
        system.settings.admin_session_ttl_s,
        login.fingerprint(operator.password_hash),
    )
    user = await login.session_user(request(user_id=str(operator.id), since=now, pw=pw))
    assert user is not None and user.id == operator.id
    assert await login.session_user(request(user_id=str(operator.id), since=now - ttl - 1, pw=pw)) is None
    assert await login.session_user(request(user_id=str(operator.id), since=now, pw="0" * 24)) is None
    assert await login.session_user(request(since=now, pw=pw)) is None
    async with system.services.db.transaction() as session:
        row = await session.get(User, operator.id)
        assert row is not None
        passwords.set_password(row, "another long password", min_length=12)
    assert await login.session_user(request(user_id=str(operator.id), since=now, pw=pw)) is None


async def test_a_form_posted_from_another_origin_is_refused(system: Any, page: Page, base_url: str) -> None:
    """Issue 10, item 6: a page on another port of the same host (same site, so the SameSite=Lax cookie
    goes along) auto-submits the user-edit form; it used to deactivate the operator."""
    admin, operator = await staff(system, role=Role.ADMIN), await staff(system)
    assert admin.phone is not None
    await logged_in(page, admin.phone)
    evil = f"""<html><body><form id="f" method="post" action="{base_url}/admin/user/edit/{operator.id}">
        <input name="role" value="operator"></form>
        <script>document.getElementById("f").submit()</script></body></html>"""

    async def attacker(scope: Any, receive: Any, send: Any) -> None:
        await HTMLResponse(evil)(scope, receive, send)

    async with serve(attacker) as evil_url:
        async with page.expect_response(re.compile(r"/admin/user/edit/")) as posted:
            await page.goto(f"{evil_url}/")
        response = await posted.value
    assert response.status == 403, await response.text()
    assert "Cross-site request refused" in await response.text()
    async with system.services.db.transaction() as session:
        row = await session.get(User, operator.id)
        assert row is not None and row.is_active and row.role == Role.OPERATOR
    # the same form from the site's own page still works (the browser says same-origin)
    await page.goto(f"/admin/user/edit/{operator.id}")
    await page.locator("#is_active").uncheck()
    await page.get_by_role("button", name="Save", exact=True).click()
    await expect(page).to_have_url(re.compile(r"/admin/user/list"))
    async with system.services.db.transaction() as session:
        row = await session.get(User, operator.id)
        assert row is not None and not row.is_active

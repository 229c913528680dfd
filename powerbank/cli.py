"""`powerbank`: run the system, migrate, manage operators, simulate cabinets."""

from __future__ import annotations

import asyncio
import signal
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console

from config import Settings

app = typer.Typer(
    help="ChargeGhar orchestrator: cabinets, rentals and money on one actor system.", no_args_is_help=True
)
admin_app = typer.Typer(help="Manage operators and admins.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
console = Console(stderr=True)


def _logging(level: str | None = None) -> None:
    from telemetry import logs

    logs.configure(level or Settings().log_level)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=1)


@app.command()
def up(
    demo: Annotated[
        bool, typer.Option(help="Provision 3 Kathmandu stations with simulated cabinets.")
    ] = False,
) -> None:
    """Start everything: database (embedded unless DATABASE_URL), cache, Ray, kiosk hosts, broker, API."""
    from broker.service import PortInUse
    from powerbank.serve import serve

    _logging()
    # SIGTERM (systemd, docker stop, kill) stops everything as Ctrl-C does. Its default action ended the
    # process at once when uvicorn re-raised it after shutting down, leaving embedded PostgreSQL, Valkey
    # and Ray's processes running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(serve(Settings(), demo=demo))
    except PortInUse as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


@app.command()
def migrate() -> None:
    """Apply database migrations (embedded PostgreSQL under DATA_DIR when DATABASE_URL is unset)."""
    from powerbank.serve import database_url
    from storage.migrate import upgrade

    _logging("WARNING")
    settings = Settings()
    with console.status("Migrating the database…"):
        url, embedded = database_url(settings)
        upgrade(url)
    console.print("[green]Database is at the latest schema.[/green]")
    del embedded


class StaffRole(StrEnum):
    admin = "admin"
    operator = "operator"


@admin_app.command("create")
def admin_create(
    phone: Annotated[str, typer.Option(help="Phone number, E.164 (e.g. +9779812345678).")],
    role: Annotated[StaffRole, typer.Option(help="admin or operator.")] = StaffRole.operator,
    password: Annotated[
        bool,
        typer.Option(
            "--password",
            help="Ask for a password for the /admin web UI (hidden, typed twice). No option takes the "
            "password itself: it would land in the shell history.",
        ),
    ] = False,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin", help="Read the /admin password from the first line of stdin (scripts)."
        ),
    ] = False,
) -> None:
    """Create an operator or admin (or promote an existing user; run again to change the role or password).

    They log in to the API with a one-time code, and to the /admin web UI with their password."""
    from domain import passwords
    from domain.errors import DomainError
    from powerbank.serve import create_staff

    _logging("WARNING")
    settings = Settings()
    secret: str | None = None
    if password and password_stdin:
        _fail("use --password or --password-stdin, not both.")
    if password:
        secret = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    elif password_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    try:
        if secret is not None:
            passwords.check_policy(secret, min_length=settings.admin_password_min_length)
        user = asyncio.run(create_staff(settings, phone=phone, role=role.value, password=secret))
    except DomainError as exc:
        _fail(exc.message)
    web = "/admin with the password, or " if secret is not None else ""
    console.print(f"[green]{role.value} {user} ready.[/green] Log in to {web}the API by code.")


def _register_commands() -> None:
    from broker.cli import broker_command
    from simulators.cli import simulate

    app.command("simulate", help=simulate.__doc__)(simulate)
    app.command("broker", help=broker_command.__doc__)(broker_command)


_register_commands()


def main() -> None:
    app()

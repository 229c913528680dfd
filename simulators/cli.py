"""``powerbank simulate``: run simulated cabinets against the orchestrator's MQTT broker.

Registered by the main CLI as ``app.command("simulate")(simulate)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Final, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from simulators.cabinet import CabinetCredentials, CabinetError, SimulatedCabinet, send_return
from simulators.faults import Faults, parse_byte, parse_holes
from simulators.fleet import ProvisioningError, SimulatedFleet, load_credentials, provision, save_credentials
from simulators.scenario import ScenarioStep, check_cabinets, load_scenario, run_scenario

__all__ = ["simulate"]

_T = TypeVar("_T")

REFRESH_S: Final = 0.5
TABLE_CHROME_LINES: Final = 9  # title, header, borders, caption: what the table needs besides its rows

CABINETS = "Cabinets"
PROVISIONING = "Provisioning (create new cabinets on the server)"
RETURNING = "Return a power bank (connect, send one 0x40, exit)"
FAULTS = "Faults (every cabinet; change them over time with --scenario)"


def simulate(
    credentials: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            "-c",
            help="JSON file of cabinet credentials (written by --save-credentials) to run those cabinets.",
            exists=True,
            dir_okay=False,
            readable=True,
            rich_help_panel=CABINETS,
        ),
    ] = None,
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            help="Base URL of the orchestrator's HTTP API, e.g. http://127.0.0.1:8010: provision --count new "
            "cabinets there (POST /api/admin/stations) and run them.",
            rich_help_panel=PROVISIONING,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="POWERBANK_TOKEN",
            help="Operator (admin) access token for --api. Also read from POWERBANK_TOKEN.",
            rich_help_panel=PROVISIONING,
        ),
    ] = None,
    count: Annotated[
        int,
        typer.Option(
            "--count", "-n", min=1, help="How many cabinets to provision.", rich_help_panel=PROVISIONING
        ),
    ] = 1,
    name_prefix: Annotated[
        str,
        typer.Option("--name-prefix", help="Station names are '<prefix> <n>'.", rich_help_panel=PROVISIONING),
    ] = "Sim",
    save_to: Annotated[
        Path | None,
        typer.Option(
            "--save-credentials",
            help="Write the cabinets' credentials to this JSON file (mode 600) to run them again later "
            "with --credentials. Passwords are only shown once by the server: save them.",
            dir_okay=False,
            rich_help_panel=PROVISIONING,
        ),
    ] = None,
    boards: Annotated[
        int,
        typer.Option("--boards", min=1, max=10, help="Control boards per cabinet.", rich_help_panel=CABINETS),
    ] = 1,
    holes: Annotated[
        int,
        typer.Option(
            "--holes",
            min=1,
            max=8,
            help="Holes per board (real models: 4, 5, 6, 8).",
            rich_help_panel=CABINETS,
        ),
    ] = 4,
    fill: Annotated[
        float,
        typer.Option(
            "--fill",
            min=0.0,
            max=1.0,
            help="Fraction of holes that start with a power bank (random 8-digit SNs, unique in the fleet).",
            rich_help_panel=CABINETS,
        ),
    ] = 0.75,
    heartbeat: Annotated[
        float,
        typer.Option(
            "--heartbeat", min=0.1, help="Seconds between 0x7A heartbeats.", rich_help_panel=CABINETS
        ),
    ] = 60.0,
    upload: Annotated[
        float,
        typer.Option(
            "--upload",
            min=0.1,
            help="Seconds between periodic 0x10 snapshots on /user/upload (firmware: 1200 = 20 min).",
            rich_help_panel=CABINETS,
        ),
    ] = 1200.0,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Random seed for the initial power banks and the random faults (same seed, same run).",
            rich_help_panel=CABINETS,
        ),
    ] = None,
    duration: Annotated[
        float,
        typer.Option(
            "--duration",
            min=0.0,
            help="Stop after this many seconds (0: run until Ctrl-C).",
            rich_help_panel=CABINETS,
        ),
    ] = 0.0,
    lose_reply: Annotated[
        float,
        typer.Option(
            "--lose-reply",
            min=0.0,
            max=1.0,
            help="Probability (0-1) that an eject's 0x31/0x21 reply is lost AFTER the power bank came out.",
            rich_help_panel=FAULTS,
        ),
    ] = 0.0,
    reply_delay: Annotated[
        float,
        typer.Option(
            "--reply-delay",
            min=0.0,
            help="Seconds to wait before every reply to a command (0x31, 0x21, and the 0x10 of a check).",
            rich_help_panel=FAULTS,
        ),
    ] = 0.0,
    fail_ejects: Annotated[
        str | None,
        typer.Option(
            "--fail-ejects",
            metavar="CODE",
            help="Answer every popup_sn/popup with this state and eject nothing: 0x00 failed, 0x11 serial "
            "timeout, 0x12 did not pop out, 0xFE previous rental unfinished (any 0x00-0xFF).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    stuck_holes: Annotated[
        str | None,
        typer.Option(
            "--stuck-holes",
            metavar="HOLES",
            help="Comma-separated holes (e.g. 1,3) that report a fault state in snapshots and never eject "
            "(popup answers 0x12).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    stuck_state: Annotated[
        str,
        typer.Option(
            "--stuck-state",
            metavar="STATE",
            help="Hole state the --stuck-holes report: 0x02 charging fault, 0x03 communication fault, "
            "0x04 stuck/damaged, ... 0x0A.",
            rich_help_panel=FAULTS,
        ),
    ] = "0x04",
    hot_holes: Annotated[
        str | None,
        typer.Option(
            "--hot-holes",
            metavar="HOLES",
            help="Comma-separated holes whose power banks report 65 °C (over the 60 °C rental limit).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    bad_checksum: Annotated[
        bool,
        typer.Option(
            "--bad-checksum",
            help="Send every frame with a wrong checksum (length and structure stay valid).",
            rich_help_panel=FAULTS,
        ),
    ] = False,
    duplicate_returns: Annotated[
        bool,
        typer.Option("--duplicate-returns", help="Send every 0x40 return twice.", rich_help_panel=FAULTS),
    ] = False,
    disconnect_mid_eject: Annotated[
        float | None,
        typer.Option(
            "--disconnect-mid-eject",
            metavar="SECONDS",
            min=0.0,
            help="On every popup_sn/popup: eject, then drop the TCP connection without replying, and "
            "reconnect after SECONDS.",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    silent: Annotated[
        bool,
        typer.Option(
            "--silent",
            help="Connect, then send nothing at all (no heartbeats, replies or MQTT pings) while the TCP "
            "connection stays open; commands are lost. End it with a --scenario step setting "
            "silent to false.",
            rich_help_panel=FAULTS,
        ),
    ] = False,
    disconnect_probability: Annotated[
        float,
        typer.Option(
            "--disconnect-probability",
            min=0.0,
            max=1.0,
            help="Per command received, probability (0-1) to drop the connection (before executing it, or "
            "after, before the reply) and reconnect after about 1 s. For soak tests.",
            rich_help_panel=FAULTS,
        ),
    ] = 0.0,
    scenario: Annotated[
        Path | None,
        typer.Option(
            "--scenario",
            metavar="FILE",
            help='Timeline of fault changes, JSON or YAML: [{"at": 0, "cabinet": "*", "faults": '
            '{"lose_eject_reply": 1.0}}, {"at": 30, "cabinet": "SIM...", "faults": {}}]. "at" is seconds '
            'after the cabinets connected, "cabinet" an SN or "*"; each step sets that cabinet\'s faults '
            "to the flags above plus the step's fields (Faults field names: lose_eject_reply, "
            "reply_delay_s, eject_failure_code, stuck_holes, stuck_state, hot_holes, bad_checksum, "
            "duplicate_returns, disconnect_mid_eject, silent, disconnect_probability), so {} goes back to "
            "the flags.",
            exists=True,
            dir_okay=False,
            readable=True,
            rich_help_panel=FAULTS,
        ),
    ] = None,
    return_sn: Annotated[
        str | None,
        typer.Option("--return-sn", help="SN of the power bank to return.", rich_help_panel=RETURNING),
    ] = None,
    return_to: Annotated[
        str | None,
        typer.Option(
            "--return-to",
            help="SN of the cabinet (from --credentials) to return it into. Stop any simulate process "
            "running that cabinet first: the broker keeps only one connection per cabinet.",
            rich_help_panel=RETURNING,
        ),
    ] = None,
    return_hole: Annotated[
        int,
        typer.Option(
            "--return-hole", min=1, max=80, help="Hole the power bank goes into.", rich_help_panel=RETURNING
        ),
    ] = 1,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log every command and MQTT event.")
    ] = False,
) -> None:
    """Run simulated power-bank cabinets that speak the rentbox protocol byte for byte over MQTT.

    They answer check / popup_sn / popup like real cabinets and send heartbeats; the fault options make
    them misbehave like real ones. Examples:

      powerbank simulate --api http://127.0.0.1:8010 --token $TOKEN --count 5 --save-credentials sims.json

      powerbank simulate --credentials sims.json --duration 600

      powerbank simulate --credentials sims.json --lose-reply 0.1 --disconnect-probability 0.05

      powerbank simulate --credentials sims.json --scenario faults.yaml

      powerbank simulate --credentials sims.json --return-sn 85019121 --return-to SIM000000000042
    """
    console = Console()
    _configure_logging(console, verbose=verbose)

    if (return_sn is None) != (return_to is None):
        raise _usage(
            "--return-sn and --return-to go together: which power bank, into which cabinet.",
            "--return-sn / --return-to",
        )
    if credentials is not None and api is not None:
        raise _usage(
            "Use either --credentials FILE (existing cabinets) or --api URL (new cabinets).",
            "--credentials / --api",
        )
    if credentials is None and api is None:
        raise _usage(
            "Say which cabinets to run: --credentials FILE (saved before with --save-credentials), "
            "or --api URL --token TOKEN --count N to provision new ones.",
            "--credentials / --api",
        )
    if api is not None and not token:
        raise _usage(
            "--api needs an operator access token: pass --token TOKEN or set POWERBANK_TOKEN.", "--token"
        )
    if return_to is not None and credentials is None:
        raise _usage(
            "--return-to needs --credentials FILE holding that cabinet's credentials.", "--return-to"
        )
    if boards * holes > 80:
        raise _usage("A cabinet has at most 80 holes (--boards x --holes).", "--boards / --holes")
    faults = _faults_from_options(
        lose_reply=lose_reply,
        reply_delay=reply_delay,
        fail_ejects=fail_ejects,
        stuck_holes=stuck_holes,
        stuck_state=stuck_state,
        hot_holes=hot_holes,
        bad_checksum=bad_checksum,
        duplicate_returns=duplicate_returns,
        disconnect_mid_eject=disconnect_mid_eject,
        silent=silent,
        disconnect_probability=disconnect_probability,
    )
    beyond = sorted(hole for hole in faults.stuck_holes | faults.hot_holes if hole > boards * holes)
    if beyond:
        raise _usage(
            f"Hole(s) {', '.join(map(str, beyond))} do not exist with --boards {boards} --holes {holes}.",
            "--stuck-holes / --hot-holes",
        )
    steps: list[ScenarioStep] = []
    if scenario is not None:
        try:
            steps = load_scenario(scenario)
        except ValueError as exc:
            raise _usage(str(exc), "--scenario") from exc

    creds: list[CabinetCredentials] = []
    if credentials is not None:
        try:
            creds = load_credentials(credentials)
        except ValueError as exc:
            _fail(console, f"{exc}\nRe-create the file with --api ... --save-credentials {credentials}.")
        if not creds:
            _fail(console, f"{credentials} lists no cabinets.")

    try:
        if return_sn is not None and return_to is not None:
            target = next((c for c in creds if c.sn == return_to), None)
            if target is None:
                known = ", ".join(c.sn for c in creds[:5]) + (", ..." if len(creds) > 5 else "")
                _fail(console, f"Cabinet {return_to} is not in {credentials} (it has {known}).")
            if return_hole > boards * holes:
                _fail(console, f"Hole {return_hole} does not exist with --boards {boards} --holes {holes}.")
            asyncio.run(send_return(target, return_sn, hole=return_hole, holes_per_board=holes))
            console.print(f"Returned power bank {return_sn} into cabinet {return_to}, hole {return_hole}.")
            return
        asyncio.run(
            _run(
                console,
                creds,
                api=api,
                token=token,
                count=count,
                name_prefix=name_prefix,
                save_to=save_to,
                boards=boards,
                holes=holes,
                fill=fill,
                heartbeat=heartbeat,
                upload=upload,
                seed=seed,
                duration=duration,
                faults=faults,
                steps=steps,
            )
        )
    except KeyboardInterrupt:
        pass  # the cabinets were stopped on the way out
    except (CabinetError, ProvisioningError, ValueError, OSError) as exc:
        _fail(console, str(exc))


def _faults_from_options(
    *,
    lose_reply: float,
    reply_delay: float,
    fail_ejects: str | None,
    stuck_holes: str | None,
    stuck_state: str,
    hot_holes: str | None,
    bad_checksum: bool,
    duplicate_returns: bool,
    disconnect_mid_eject: float | None,
    silent: bool,
    disconnect_probability: float,
) -> Faults:
    def parse(option: str, parser: Callable[[str, str], _T], value: str) -> _T:
        try:
            return parser(value, option)
        except ValueError as exc:
            raise _usage(str(exc), option) from exc

    return Faults(
        lose_eject_reply=lose_reply,
        reply_delay_s=reply_delay,
        eject_failure_code=None if fail_ejects is None else parse("--fail-ejects", parse_byte, fail_ejects),
        stuck_holes=parse("--stuck-holes", parse_holes, stuck_holes or ""),
        stuck_state=parse("--stuck-state", parse_byte, stuck_state),
        hot_holes=parse("--hot-holes", parse_holes, hot_holes or ""),
        bad_checksum=bad_checksum,
        duplicate_returns=duplicate_returns,
        disconnect_mid_eject=disconnect_mid_eject,
        silent=silent,
        disconnect_probability=disconnect_probability,
    )


def _usage(message: str, options: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=options)


def _fail(console: Console, message: str) -> NoReturn:
    console.print(f"[bold red]Error:[/] {message}", highlight=False)
    raise typer.Exit(code=1)


def _configure_logging(console: Console, *, verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # amqtt warns on every disconnect; the table shows that already.
    logging.getLogger("amqtt").setLevel(logging.INFO if verbose else logging.ERROR)


async def _run(
    console: Console,
    creds: list[CabinetCredentials],
    *,
    api: str | None,
    token: str | None,
    count: int,
    name_prefix: str,
    save_to: Path | None,
    boards: int,
    holes: int,
    fill: float,
    heartbeat: float,
    upload: float,
    seed: int | None,
    duration: float,
    faults: Faults,
    steps: list[ScenarioStep],
) -> None:
    if api is not None and token is not None:
        with console.status(f"Provisioning {count} cabinet(s) at {api}..."):
            creds = await provision(
                api, token, count, boards=boards, holes_per_board=holes, name_prefix=name_prefix
            )
        console.print(
            f"Provisioned {len(creds)} cabinet(s): {', '.join(c.sn for c in creds[:5])}"
            + (", ..." if len(creds) > 5 else "")
        )
    if save_to is not None:
        save_credentials(save_to, creds)
        console.print(f"Credentials saved to {save_to}: run them again with --credentials {save_to}")
    elif api is not None:
        console.print(
            "[yellow]Credentials not saved[/]: pass --save-credentials FILE to run these cabinets again."
        )

    check_cabinets(steps, [c.sn for c in creds])
    fleet = SimulatedFleet(
        creds,
        boards=boards,
        holes_per_board=holes,
        fill=fill,
        seed=seed,
        heartbeat_s=heartbeat,
        upload_s=upload,
        faults=faults,
    )
    try:
        failures = await fleet.start(console=console)
        for sn, error in failures.items():
            console.print(f"[red]Cabinet {sn} did not start:[/] {error}", highlight=False)
        if len(failures) == len(fleet):
            _fail(
                console, "No cabinet could connect: is the broker running, and are these credentials current?"
            )
        timeline = asyncio.create_task(
            run_scenario(steps, fleet.cabinets, base=faults, on_step=_announce(console)), name="scenario"
        )
        try:
            await _watch(console, fleet, duration=duration)
        finally:
            timeline.cancel()
            await asyncio.gather(timeline, return_exceptions=True)
    finally:
        await fleet.stop()
        ejects = sum(sum(cabinet.eject_counts.values()) for cabinet in fleet)
        commands = sum(len(cabinet.commands) for cabinet in fleet)
        console.print(
            f"Stopped {len(fleet)} cabinet(s): {commands} command(s), {ejects} power bank(s) ejected."
        )


async def _watch(console: Console, fleet: SimulatedFleet, *, duration: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration if duration > 0 else None
    until = f"for {duration:g}s" if deadline is not None else "until Ctrl-C"
    if not console.is_terminal:
        console.print(f"Running {len(fleet)} cabinet(s) {until}.")
        await asyncio.sleep(duration if deadline is not None else float("inf"))
        return
    with Live(_table(fleet, console, until), console=console, refresh_per_second=1 / REFRESH_S) as live:
        while deadline is None or loop.time() < deadline:
            await asyncio.sleep(REFRESH_S)
            live.update(_table(fleet, console, until))


def _announce(console: Console) -> Callable[[ScenarioStep, list[SimulatedCabinet]], None]:
    def announce(step: ScenarioStep, cabinets: list[SimulatedCabinet]) -> None:
        who = "every cabinet" if step.cabinet == "*" else f"cabinet {step.cabinet}"
        faults = cabinets[0].faults.describe() if cabinets else ""
        console.print(
            f"[bold]t={step.at:g}s[/] scenario: {who} -> faults: {faults or 'none'}", highlight=False
        )

    return announce


def _describe(command: dict[str, str] | None) -> str:
    if command is None:
        return "-"
    details = " ".join(f"{key}={value}" for key, value in command.items() if key != "cmd")
    return f"{command['cmd']} {details}".strip()


def _table(fleet: SimulatedFleet, console: Console, until: str) -> Table:
    online = sum(cabinet.connected for cabinet in fleet)
    table = Table(
        title=f"{len(fleet)} simulated cabinet(s), {online} online",
        caption=f"running {until}",
        expand=False,
    )
    table.add_column("Cabinet SN", no_wrap=True)
    table.add_column("MQTT", no_wrap=True)
    table.add_column("Banks", justify="right")
    table.add_column("Ejects", justify="right")
    table.add_column("Commands", justify="right")
    table.add_column("Last command", no_wrap=True)
    table.add_column("Faults")
    rows = max(console.height - TABLE_CHROME_LINES, 3)
    shown: list[SimulatedCabinet] = fleet.cabinets[:rows]
    for cabinet in shown:
        table.add_row(
            cabinet.sn,
            "[green]online[/]" if cabinet.connected else "[red]offline[/]",
            f"{len(cabinet.banks())}/{cabinet.hole_count}",
            str(sum(cabinet.eject_counts.values())),
            str(len(cabinet.commands)),
            _describe(cabinet.last_command),
            _faults_cell(cabinet),
        )
    if len(fleet) > len(shown):
        table.add_row(f"... {len(fleet) - len(shown)} more", "", "", "", "", "", "")
    return table


def _faults_cell(cabinet: SimulatedCabinet) -> str:
    text = cabinet.faults.describe()
    if not text:
        return "[dim]-[/]"
    return f"[bold red]{escape(text)}[/]" if cabinet.faults.silent else f"[yellow]{escape(text)}[/]"

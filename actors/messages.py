"""Messages to kiosk actors and the outcomes they answer with: small immutable data, never exceptions."""

from __future__ import annotations

from dataclasses import dataclass, field

from domain.errors import DomainError


# --- messages into a kiosk's mailbox (events are past tense) ---------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class CabinetConnected:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class CabinetSubscribed:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class CabinetDisconnected:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameReceived:
    kind: str  # update, heart or upload
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """Periodic: lets a kiosk notice a cabinet that has gone silent while its TCP connection stays open."""

    now: float


KioskMessage = CabinetConnected | CabinetSubscribed | CabinetDisconnected | FrameReceived | Tick

# --- what the broker carries to a kiosk host, in batches (plain tuples: cheap to pickle) -------------------
CONNECTED, SUBSCRIBED, DISCONNECTED = "connected", "subscribed", "disconnected"
CabinetEvent = tuple[str, str, bytes]
"""(cabinet SN, kind, payload): kind is CONNECTED, SUBSCRIBED, DISCONNECTED (payload b"") or, for a frame,
its up topic (update, heart, upload)."""
_SESSION_EVENTS: dict[str, KioskMessage] = {
    CONNECTED: CabinetConnected(),
    SUBSCRIBED: CabinetSubscribed(),
    DISCONNECTED: CabinetDisconnected(),
}


def kiosk_message(kind: str, payload: bytes) -> KioskMessage:
    """The mailbox message of one `CabinetEvent`."""
    return _SESSION_EVENTS.get(kind) or FrameReceived(kind=kind, payload=payload)


# --- RentPowerBank: an eject for a new rental ---------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class RentRequest:
    """Who rents which package; `rental_id` is also the eject's request id."""

    rental_id: str
    user_id: str
    package_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RentRefused:
    """The rental rules said no (unknown station, balance, an open rental, maintenance...): nothing was
    written or sent. `error` is the domain's own, for the API to answer with."""

    request_id: str
    error: DomainError


# --- outcomes of EjectPowerBank ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Ejected:
    request_id: str
    powerbank_sn: str
    slot_number: int
    soc: int | None
    reply_lost: bool = False  # the 0x31 never came, but a check showed the bank gone


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectRefused:
    """The cabinet answered with a failure code (the protocol state byte)."""

    request_id: str
    code: int
    slot_number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KioskTimedOut:
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KioskOffline:
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KioskNotReady:
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NoPowerBank:
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KioskBusy:
    """The cabinet's eject queue is full."""

    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectUnconfirmed:
    """No reply and no snapshot (e.g. the cabinet dropped off mid-eject): the rental stays PENDING_POPUP
    with the attempted power bank, and is resolved when the cabinet next reports its holes."""

    request_id: str
    powerbank_sn: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestWithdrawn:
    """The rental was settled elsewhere (e.g. by the reconciler) before its eject was sent: nothing sent."""

    request_id: str


EjectOutcome = (
    Ejected
    | EjectRefused
    | KioskTimedOut
    | KioskOffline
    | KioskNotReady
    | NoPowerBank
    | KioskBusy
    | EjectUnconfirmed
    | RequestWithdrawn
)


def outcome_reason(outcome: EjectOutcome) -> str:
    """A short tag for logs, metrics and the rental's failure_reason."""
    match outcome:
        case Ejected(reply_lost=True):
            return "lost_reply"
        case Ejected():
            return "success"
        case EjectRefused(code=code):
            return f"refused_0x{code:02x}"
        case KioskTimedOut():
            return "timeout"
        case KioskOffline():
            return "offline"
        case KioskNotReady():
            return "not_ready"
        case NoPowerBank():
            return "no_power_bank"
        case KioskBusy():
            return "busy"
        case EjectUnconfirmed():
            return "unconfirmed"
        case RequestWithdrawn():
            return "withdrawn"


# --- RemoteCommand: an operator's command to a cabinet, and its outcomes ------------------------------
COMMANDS = ("check", "eject_hole", "reboot", "volume", "wifi", "mode", "firmware_push")
"""What an operator may send. `check` waits for the 0x10 snapshot and `eject_hole` for the 0x21 result;
the others have no reply frame (rentbox-v1.md section 2) and are done once published."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteCommand:
    request_id: str
    command: str  # one of COMMANDS
    hole: int | None = None  # eject_hole
    level: int | None = None  # volume 0..100
    ssid: str | None = None  # wifi
    password: str | None = field(default=None, repr=False)  # wifi: never logged
    mode: str | None = None  # mode: wifi or 4g


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandSent:
    """A command without a reply frame was published to the connected cabinet."""

    request_id: str
    command: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotTaken:
    """`check` answered: the holes as the cabinet's 0x10 reported them."""

    request_id: str
    slots: tuple[SlotView, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HoleEjected:
    """`eject_hole` answered by a 0x21 (or, reply lost, by a snapshot showing the hole emptied)."""

    request_id: str
    hole: int
    success: bool
    state: int  # the 0x21 state byte (0x01 success)
    powerbank_sn: str | None  # what the hole held
    reply_lost: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandTimedOut:
    request_id: str
    command: str
    detail: str  # no_reply, no_reply_bank_still_in_hole, no_reply_no_snapshot, host_unavailable


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRefused:
    """Not sent: arguments the cabinet cannot take, or a hole whose bank an unconfirmed rental holds."""

    request_id: str
    reason: str


CommandOutcome = (
    CommandSent
    | SnapshotTaken
    | HoleEjected
    | CommandTimedOut
    | CommandRefused
    | KioskOffline
    | KioskNotReady
    | KioskBusy
)


# --- queries ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class SlotView:
    slot_number: int
    status: str  # AVAILABLE, OCCUPIED, MAINTENANCE, ERROR
    state: int
    powerbank_sn: str | None
    battery_level: int | None
    temperature: int | None
    rentable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class KioskStatus:
    serial_number: str
    online: bool
    ready: bool
    total_slots: int
    available_power_banks: int
    empty_slots: int

"""The metric catalogue and the collector that merges actor processes into the API's scrape.

Each process (API, broker actor, kiosk-host actors) records into its own default registry. The API's
`/metrics` asks every actor for its `powerbank_*` samples and adds them up with its own, so one scrape
shows the whole fleet: counters, gauges and histogram buckets with equal labels are summed.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PREFIX = "powerbank_"

CABINETS_ONLINE = Gauge("powerbank_cabinets_online", "Cabinets connected now")
CABINETS_READY = Gauge("powerbank_cabinets_ready", "Cabinets connected with a snapshot received (rentable)")
SLOTS = Gauge("powerbank_slots", "Holes by state", ["state"])
POWER_BANKS_RENTABLE = Gauge("powerbank_power_banks_rentable", "Power banks that could be rented now")
RENTALS = Counter("powerbank_rentals", "Rental transitions", ["outcome"])
RENTALS_ACTIVE = Gauge("powerbank_rentals_active", "Open rentals", ["status"])
EJECT_SECONDS = Histogram(
    "powerbank_eject_seconds",
    "Eject command sent to outcome known",
    ["result"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60),
)
EJECT_RESULTS = Counter("powerbank_eject_results", "Eject replies by protocol state byte", ["code"])
FRAMES = Counter("powerbank_frames", "Frames decoded", ["cmd"])
INVALID_FRAMES = Counter("powerbank_invalid_frames", "Frames rejected by the codec", ["reason"])
CHECKSUM_MISMATCHES = Counter("powerbank_checksum_mismatches", "Accepted frames with a bad checksum")
MQTT_DROPPED = Counter("powerbank_mqtt_dropped", "MQTT messages or connections refused", ["reason"])
COMMANDS_IN_FLIGHT = Gauge("powerbank_commands_in_flight", "Cabinet commands awaiting a reply")
HTTP_SECONDS = Histogram("powerbank_http_request_seconds", "API latency", ["route", "method", "status"])
HTTP_REFUSED = Counter("powerbank_http_refused", "Requests refused before routing", ["reason"])
HTTP_OVERLOADED = Counter(
    "powerbank_http_overloaded", "Requests refused with 503 overloaded (admission control)", ["kind"]
)
LEDGER_ENTRIES = Counter("powerbank_ledger_entries", "Money movements (ledger legs)", ["type"])
JOBS_RUNS = Counter("powerbank_jobs_runs", "Background job runs", ["job", "result"])
FIRMWARE_REQUESTS = Counter(
    "powerbank_firmware_requests", "Cabinet firmware HTTP calls", ["endpoint", "result"]
)
# An HTTP upload is never applied (anyone can post one): refused (invalid_frame, not_snapshot), only logged
# (cabinet_offline), or a connected cabinet is asked `check` over MQTT (check_sent, or check_throttled).
FIRMWARE_UPLOADS_IGNORED = Counter(
    "powerbank_firmware_uploads_ignored", "HTTP snapshot uploads not applied, by what was done", ["reason"]
)
OUTBOX_DROPPED = Counter(
    "powerbank_outbox_dropped", "Cabinet events or commands dropped between processes", ["outbox"]
)
OUTBOX_BATCH = Histogram(
    "powerbank_outbox_batch_items",
    "Items per call between the broker and the kiosk hosts",
    ["outbox"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
LOGINS_LOCKED_OUT = Counter("powerbank_logins_locked_out", "Lock-outs")
AUTH_FAILURES = Counter(
    "powerbank_auth_failures", "Refused one-time codes and tokens", ["reason"]
)  # wrong_code, no_code, locked_out, rate_limited, bad_token, refresh_reused, family_revoked, inactive


def local_families() -> list[Metric]:
    """This process's powerbank_* metric families, picklable, for a remote scrape."""
    return [m for m in REGISTRY.collect() if m.name.startswith(PREFIX)]


def merge(families: Iterable[Metric]) -> list[Metric]:
    """Sum samples with the same name and labels across processes, keeping one family per name."""
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in families:
        merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
        values = sums.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # creation times do not add up across processes
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[key] = values.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in sums[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(remote_families: Iterable[Metric]) -> bytes:
    """The text exposition of this process's metrics merged with those of the actor processes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merge([*local_families(), *remote_families])))
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(_Fixed(list(collector.collect())))
    return generate_latest(registry)

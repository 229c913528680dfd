"""Payment metrics (merged into the fleet-wide /metrics scrape like every `powerbank_*` family)."""

from __future__ import annotations

from prometheus_client import Counter

# result: initiated, credited, duplicate, pending, cancelled, expired, failed, amount_mismatch, rejected,
# gateway_error
PAYMENTS = Counter("powerbank_payments", "Top-up events by gateway and result", ["gateway", "result"])
SIGNATURE_FAILURES = Counter(
    "powerbank_payment_signature_failures",
    "Gateway callbacks, redirects or webhooks refused because they could not be authenticated",
    ["gateway"],
)
# result: credited, expired (24 h unpaid), pending (asked again later), cancelled, failed, error
TOPUPS_RECONCILED = Counter(
    "powerbank_topups_reconciled",
    "Top-up intents nobody verified, checked with their gateway by the reconcile_topups job",
    ["gateway", "result"],
)

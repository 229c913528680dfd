"""Settings: environment variables (and `.env`), each default written once here."""

from __future__ import annotations

import os
import secrets
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Where things run. Unset DATABASE_URL / REDIS_URL / RAY_ADDRESS mean "embedded / local".
    database_url: str | None = None
    redis_url: str | None = None
    ray_address: str | None = None
    ray_namespace: str = "powerbank"
    kiosk_hosts: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    ray_worker_niceness: int = Field(default=0, ge=0, le=19)  # a local Ray's actors (Ray's own default: 15)

    http_host: str = "127.0.0.1"
    http_port: int = 8010

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_public_host: str | None = None
    # MQTT over TLS beside plain TCP: on when both files are set (PEM certificate chain and private key)
    mqtt_tls_port: int = Field(default=8883, ge=1, le=65535)
    mqtt_tls_certfile: Path | None = None
    mqtt_tls_keyfile: Path | None = None
    mqtt_product_key: str = "powerbank"
    mqtt_max_payload_bytes: int = 4096
    mqtt_max_connections_per_ip: int = 50
    mqtt_connect_timeout_s: float = 10.0  # a TCP connection that sends no CONNECT is closed after this
    # Broker ⇄ kiosk hosts: events and commands go in batches, one Ray call in flight (actors.batching)
    outbox_max_batch: int = Field(default=1000, ge=1)  # items per call at most
    outbox_limit: int = Field(default=200_000, ge=1)  # items waiting at most; beyond, new ones are dropped
    # kiosk hosts write changed holes (PostgreSQL) and live summaries (Redis) in batches this often
    station_sync_interval_s: float = Field(default=0.2, gt=0)

    sms_backend: str = "console"
    data_dir: Path = Path("./var")
    log_level: str = "INFO"
    jwt_secret: str | None = None
    jwt_access_ttl_s: int = 15 * 60
    jwt_refresh_ttl_s: int = 30 * 24 * 3600
    # an operator's wallet credits in 24 h above this wait for a second operator (202, credit-approvals)
    staff_daily_credit_cap: Decimal = Field(default=Decimal("50000.00"), gt=0)
    jwt_staff_refresh_ttl_s: int = Field(default=12 * 3600, ge=300)  # operators and admins: a working day
    # a refresh token presented again this soon returns the same new pair (a retry after a lost answer);
    # later, it revokes its family. 0: no grace.
    refresh_reuse_grace_s: int = Field(default=30, ge=0, le=300)

    otp_ttl_s: int = 300
    otp_max_attempts: int = 5
    otp_resend_interval_s: int = 30

    eject_timeout_s: float = 15.0
    rent_max_in_flight: int = Field(default=64, ge=1)  # rentals/start in flight per API process; more → 503
    eject_queue_limit: int = 5  # rentals waiting behind the one eject in flight; more → 503 cabinet_busy
    eject_banks_tried: int = 2  # a hole-level failure code moves on to the next-best bank, this many in all
    slot_quarantine_s: float = 600.0  # a hole that failed an eject is not chosen again for this long
    cabinet_silence_timeout_s: float = 300.0  # no message for this long → offline, even if TCP stays open
    strict_checksum: bool = False  # reject frames whose checksum is off (default: accept, count, log)
    pending_popup_resolve_s: float = 60.0  # PENDING_POPUP older than this is settled from the cabinet's holes
    pending_popup_abandon_s: float = 3600.0  # ... or cancelled if the cabinet stays offline this long
    supervise_interval_s: float = 5.0  # how often hosts check silence and stale rentals
    rental_min_soc: int = 20
    slot_max_temperature_c: int = 60
    late_fee_per_hour: Decimal = Decimal("50.00")
    currency: str = "NPR"

    # --- payments (gateways, top-ups) ---
    public_base_url: str | None = None  # callbacks and redirects; unset → http://HTTP_HOST:HTTP_PORT
    app_return_url: str | None = None  # redirects end here (?intent_id=&status=); unset → JSON
    topup_min_amount: Decimal = Decimal("10.00")  # Khalti's minimum
    topup_max_amount: Decimal = Decimal("50000.00")
    topup_intent_ttl_s: int = 1800  # an unpaid top-up intent expires after this (Khalti sets its own)
    payment_gateway_timeout_s: float = 10.0
    # Every gateway is off until configured; sandbox endpoints and test credentials (dev.khalti.com, test_
    # keys, eSewa's rc-* sites, EPAYTEST and its published secret, sk_test_) only with PAYMENTS_SANDBOX=true.
    payments_sandbox: bool = False
    khalti_base_url: str = "https://khalti.com/api/v2"  # sandbox: https://dev.khalti.com/api/v2
    khalti_secret_key: str = ""  # empty → Khalti top-ups are off
    esewa_form_url: str = "https://epay.esewa.com.np/api/epay/main/v2/form"  # sandbox: rc-epay.esewa.com.np
    esewa_base_url: str = "https://epay.esewa.com.np"  # status check: <base>/api/epay/transaction/status/
    esewa_product_code: str = ""  # the merchant code eSewa issued; empty → eSewa top-ups are off
    esewa_secret_key: str = ""  # empty → eSewa top-ups are off
    stripe_base_url: str = "https://api.stripe.com"
    stripe_secret_key: str = ""  # empty → Stripe top-ups are off
    stripe_webhook_secret: str = ""  # empty → every webhook is refused
    stripe_webhook_tolerance_s: int = 300

    # --- rental rules ---
    # Late fees, grace and daily cap are rows of late_fee_configurations (one active); LATE_FEE_PER_HOUR
    # above seeds the first row and is used only if no row is active.
    postpaid_min_balance: Decimal = Field(default=Decimal("50.00"), ge=0)  # a POSTPAID start needs this much
    cancel_window_s: int = Field(default=300, ge=0)  # rentals/{id}/cancel this long after the start, at most
    rental_max_extensions: int = Field(default=3, ge=0)  # rentals/{id}/extend per rental
    lost_after_overdue_s: int = Field(default=24 * 3600, ge=1)  # OVERDUE this long → completed as lost
    lost_bank_penalty: Decimal = Field(default=Decimal("5000.00"), ge=0)  # PENALTY for a lost power bank
    vat_rate: Decimal = Field(default=Decimal("0.13"), ge=0)  # prices include VAT; receipts break it out
    service_charge_rate: Decimal = Field(default=Decimal("0.025"), ge=0)  # included too; VAT applies on top

    # --- idempotency ---
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)  # a key's first response is replayed this long
    idempotency_retry_after_s: int = Field(default=1, ge=1)  # Retry-After of "still in progress" (409)

    # --- notifications and jobs ---
    fcm_service_account_file: Path | None = None  # Firebase service-account JSON; unset → no push
    fcm_base_url: str = "https://fcm.googleapis.com"  # <base>/v1/projects/<project_id>/messages:send
    fcm_token_url: str | None = None  # OAuth2 token endpoint; unset → the service account's token_uri
    fcm_timeout_s: float = Field(default=10.0, gt=0)
    # Comma-separated kinds (RENTAL_STARTED, RENTAL_RETURNED, RENTAL_OVERDUE, EJECT_FAILED, TOPUP_CREDITED,
    # REFUND_PROCESSED) sent per channel; every kind is always kept in-app.
    notification_push_kinds: str = (
        "RENTAL_STARTED,RENTAL_RETURNED,RENTAL_OVERDUE,EJECT_FAILED,TOPUP_CREDITED,REFUND_PROCESSED"
    )
    notification_sms_kinds: str = "RENTAL_RETURNED,RENTAL_OVERDUE,REFUND_PROCESSED"
    notification_max_attempts: int = Field(default=5, ge=1)  # then the delivery is FAILED
    notification_retry_base_s: float = Field(default=30.0, gt=0)  # attempt n failed → wait base·2^(n-1)
    notification_retry_max_s: float = Field(default=3600.0, gt=0)  # ... at most this
    notification_batch_size: int = Field(default=100, ge=1)  # deliveries claimed per batch
    notification_send_concurrency: int = Field(default=10, ge=1)  # sends in flight per worker
    notification_send_lease_s: float = Field(default=300.0, gt=0)  # claimed, unfinished this long → FAILED
    job_timeout_s: float = Field(default=300.0, gt=0)  # a job run longer than this is cancelled (error)
    job_deliver_notifications_interval_s: float = Field(default=5.0, gt=0)
    job_purge_idempotency_keys_interval_s: float = Field(default=3600.0, gt=0)
    job_mark_overdue_interval_s: float = Field(default=60.0, gt=0)
    job_complete_lost_interval_s: float = Field(default=300.0, gt=0)
    job_reconcile_topups_interval_s: float = Field(default=30.0, gt=0)
    topup_reconcile_first_s: float = Field(
        default=60.0, gt=0
    )  # an unverified top-up is first asked after this
    topup_reconcile_for_s: float = Field(default=86400.0, gt=0)  # ... and asked (gaps doubling) for this long

    # --- stations around a rental ---
    nearby_default_radius_km: float = Field(default=5.0, gt=0)  # stations/nearby without ?radius=
    nearby_max_radius_km: float = Field(default=50.0, gt=0)  # a larger ?radius= is refused (422)
    station_favorites_max: int = Field(default=50, ge=1)  # favorites are a short plain list
    station_issue_reports_per_hour: int = Field(default=10, ge=1)  # per user; more → 429 rate_limited

    # --- auth: one-time codes, lock-out, tokens ---
    otp_per_identifier_per_hour: int = Field(default=5, ge=1)  # codes sent to one identifier per hour
    otp_per_ip_per_hour: int = Field(default=100, ge=1)  # code requests from one IP per hour (carrier NAT)
    lockout_s: int = Field(default=900, ge=1)  # how long a lock-out lasts (423 + Retry-After)
    # wrong codes (or operator passwords) from one IP, over any identifiers, within LOCKOUT_S → IP locked
    login_max_failures_per_ip: int = Field(default=20, ge=1)
    # Comma-separated IPs/CIDRs of reverse proxies whose X-Forwarded-For is believed; empty → the TCP peer
    trusted_proxies: str = Field(default="", pattern=r"^[0-9A-Fa-f:.,/ ]*$")
    # "kid1:secret1,kid2:secret2": the first signs, all verify (rotation); empty → JWT_SECRET as "default"
    jwt_keys: str = Field(default="", pattern=r"^$|^[^:,\s]+:[^,\s]+(,[^:,\s]+:[^,\s]+)*$")
    # SMS_BACKEND=sparrow: Sparrow SMS (https://api.sparrowsms.com/v2/sms/), token and sender identity
    sparrow_base_url: str = "https://api.sparrowsms.com/v2"
    sparrow_token: str = ""
    sparrow_from: str = ""
    sms_timeout_s: float = Field(default=10.0, gt=0)  # an SMS gateway call longer than this fails (503)

    # --- users, profile and KYC ---
    kyc_max_file_bytes: int = Field(default=5 * 1024 * 1024, ge=1)  # per file (front, back, selfie)
    kyc_required_to_rent: bool = False  # true → rentals/start needs APPROVED KYC (403 kyc_required)
    kyc_storage_backend: str = Field(default="local", pattern="^(local|s3)$")  # where KYC files are kept
    kyc_storage_dir: Path | None = None  # local backend; unset → DATA_DIR/kyc
    kyc_s3_endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, R2, ...); unset → AWS
    kyc_s3_bucket: str = ""
    kyc_s3_access_key_id: str = ""
    kyc_s3_secret_access_key: str = ""
    kyc_s3_region: str = "us-east-1"
    kyc_s3_prefix: str = "kyc/"  # object names are <prefix><user_id>/<submission_id>/<side>.<ext>

    # --- cabinet firmware HTTP calls (rentbox-v1.md section 5: `sign` has no secret, so proves nothing) ---
    # /con issues credentials to a cabinet that has logged in before only within an operator's window
    reprovision_window_s: int = Field(default=900, ge=60, le=86400)
    con_per_cabinet_per_hour: int = Field(default=12, ge=1)  # credentials issued per cabinet SN; more → 429
    con_per_ip_per_hour: int = Field(default=600, ge=1)  # per client IP (a carrier NAT after a power cut)
    upload_check_interval_s: float = Field(default=10.0, gt=0)  # HTTP uploads ask `check` at most this often

    # --- operators (admin API) ---

    # --- admin web UI ---
    admin_session_ttl_s: int = Field(default=8 * 3600, ge=60)  # an /admin login lasts this long, at most
    admin_password_min_length: int = Field(default=12, ge=8)  # operator passwords (powerbank admin create)

    # --- HTTP limits ---
    http_max_body_bytes: int = Field(default=1_048_576, ge=1)  # larger request bodies → 413
    http_max_upload_bytes: int = Field(default=20_971_520, ge=1)  # the same, for KYC uploads (multipart)

    @property
    def public_mqtt_host(self) -> str:
        return self.mqtt_public_host or self.mqtt_host

    def resolved_jwt_secret(self) -> str:
        """JWT_SECRET, or a secret generated once and kept under DATA_DIR."""
        if self.jwt_secret:
            return self.jwt_secret
        path = self.data_dir / "jwt_secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            write_private(path, secrets.token_urlsafe(48))
        return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Create `path` readable by its owner only from the start (never a moment at the umask's mode); an
    existing file is left alone (another process created it first)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as file:
        file.write(text)


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Metrics shared by every process (API, broker, kiosk hosts): names follow shared/design/METRICS.md."""

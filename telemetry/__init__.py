"""Metrics shared by every process (API, broker, kiosk hosts): names follow docs/metrics.md."""

"""MQTT topics of the rentbox protocol: ``/{productKey}/{deviceSN}/user/{kind}``."""

from __future__ import annotations

from typing import Final

__all__ = [
    "COMMAND_KIND",
    "DEFAULT_PRODUCT_KEY",
    "UP_KINDS",
    "command_topic",
    "parse_topic",
    "up_topic",
    "up_topic_filters",
]

DEFAULT_PRODUCT_KEY: Final = "powerbank"
UP_KINDS: Final = ("update", "heart", "upload")
"""Cabinet → server topic kinds."""
COMMAND_KIND: Final = "get"
"""Server → cabinet topic kind."""
_ALL_KINDS: Final = frozenset({*UP_KINDS, COMMAND_KIND})


def _segment(value: str, name: str) -> str:
    if not value or any(char in value for char in "/+#\x00"):
        raise ValueError(f"{name} must be a non-empty topic segment without '/', '+', '#', got {value!r}")
    return value


def command_topic(product_key: str, sn: str) -> str:
    """Topic the cabinet ``sn`` subscribes to for JSON commands."""
    return f"/{_segment(product_key, 'product_key')}/{_segment(sn, 'sn')}/user/{COMMAND_KIND}"


def up_topic(product_key: str, sn: str, kind: str) -> str:
    """Topic the cabinet ``sn`` publishes binary frames on; ``kind`` is one of :data:`UP_KINDS`."""
    if kind not in UP_KINDS:
        raise ValueError(f"kind must be one of {UP_KINDS}, got {kind!r}")
    return f"/{_segment(product_key, 'product_key')}/{_segment(sn, 'sn')}/user/{kind}"


def up_topic_filters(product_key: str = DEFAULT_PRODUCT_KEY) -> tuple[str, ...]:
    """Subscription filters for every cabinet's up topics (``/{pk}/+/user/{kind}``)."""
    return tuple(f"/{_segment(product_key, 'product_key')}/+/user/{kind}" for kind in UP_KINDS)


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """``(product_key, sn, kind)`` of a rentbox topic (kind: update, heart, upload or get), else None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] or parts[3] != "user":
        return None
    _, product_key, sn, _, kind = parts
    if not product_key or not sn or kind not in _ALL_KINDS:
        return None
    if any(char in product_key + sn for char in "+#"):
        return None
    return product_key, sn, kind

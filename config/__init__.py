"""One typed settings object for the whole system."""

from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]

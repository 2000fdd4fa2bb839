"""Configuration: the one `Settings` class and `get_settings()`."""

from hybrid_router.settings.config import (
    DEFAULT_PRICES,
    OTHER_MODEL,
    BatchMode,
    ModelPrice,
    Route,
    Settings,
    get_settings,
    settings_to_env,
)

__all__ = ["DEFAULT_PRICES", "OTHER_MODEL", "BatchMode", "ModelPrice", "Route", "Settings",
           "get_settings", "settings_to_env"]

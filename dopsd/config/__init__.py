"""The typed configuration: its schema (`schema`), loading (`load`), the named presets, dotted keys and overrides
(`keys`), the values' types (`types`), ranges and relations (`validate`) and the generated reference (`docs`).
The names most callers need are here."""

from dopsd.config.load import load_config
from dopsd.config.schema import SECTIONS, SEED_LIMIT, Config, DataConfig, ModelConfig, as_before_the_options
from dopsd.config.types import ConfigError

__all__ = [
    "SECTIONS",
    "SEED_LIMIT",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "as_before_the_options",
    "load_config",
]

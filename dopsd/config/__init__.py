"""The typed configuration: its schema (`schema`), the named presets, dotted keys and overrides (`keys`), the values'
types (`types`), ranges and relations (`validate`) and the generated reference (`docs`). The names most callers
need are here."""

from dopsd.config.schema import (
    SECTIONS,
    SEED_LIMIT,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    as_before_the_options,
    load_config,
)

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

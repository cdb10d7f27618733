"""Configuration: one dataclass per YAML section (sections.py), read from YAML and dotted command-line
overrides (parsing.py), validated (checks.py), and printed with each key's doc (doc.py).

`from prefix import config; config.load(path, overrides)` is the way in; the names below are the
package's public surface.
"""

from prefix.config.checks import ConfigError, check_world, parse_size, validate
from prefix.config.parsing import KEYWORD_KEYS, from_dict, load, parse_override, read_yaml
from prefix.config.sections import (
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    MlflowConfig,
    ModelConfig,
    RopeScaling,
    RunConfig,
    StreamConfig,
    TelemetryConfig,
    TrainerConfig,
    WandbConfig,
    WatchdogConfig,
)

__all__ = ["SECTIONS", "KEYWORD_KEYS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "MlflowConfig",
           "ModelConfig", "RopeScaling", "RunConfig", "StreamConfig", "TelemetryConfig", "TrainerConfig",
           "WandbConfig", "WatchdogConfig", "check_world", "from_dict", "load", "parse_override", "parse_size",
           "read_yaml", "validate"]

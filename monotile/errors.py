"""User-facing errors: each message names the bad value and the fix, in one line.

The CLI prints `error: <message>` for any `MonotileError` and exits with status 2; nothing
already on disk is touched on the way out.
"""


class MonotileError(Exception):
    """A mistake in what the user asked for (bad setting, missing file, foreign checkpoint)."""


class ConfigError(MonotileError):
    """An unknown setting, or a value a config refuses."""


class DataError(MonotileError):
    """A data set that is missing, empty or unreadable."""


class CheckpointError(MonotileError):
    """A run directory or checkpoint that is missing, corrupt, truncated or foreign."""


def invalid(config, name: str, fix: str):
    """Refuse config.name with the one-line `name=value is invalid: fix`."""
    raise ConfigError(f"{name}={getattr(config, name)!r} is invalid: {fix}")


def check_positive(config, names) -> None:
    """Refuse any of config's `names` that is not > 0."""
    for name in names:
        if getattr(config, name) <= 0:
            invalid(config, name, "it must be a positive integer")

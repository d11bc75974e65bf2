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

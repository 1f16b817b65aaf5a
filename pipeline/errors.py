"""The errors a user can cause.

Every message is one line: what was wrong (naming the file or value), what was expected, and how
to fix it. `cli.main` prints them without a traceback and exits with status 2. Each subclass also
inherits the matching built-in so callers can catch what they already know.
"""


class PipelineError(Exception):
    """A mistake in the input or the environment that the user can fix."""


class ConfigError(PipelineError, ValueError):
    """An option or config-file value that is not allowed."""


class DataError(PipelineError, ValueError):
    """A data source that does not hold what a classifier needs."""


class MissingError(PipelineError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class BadImageError(DataError):
    """An image file that cannot be decoded."""


class WeightsError(PipelineError, RuntimeError):
    """Weights that cannot be found, downloaded or loaded into the chosen backbone."""


class DeviceError(PipelineError, RuntimeError):
    """A compute device that was asked for but is not available."""


class WorkerError(PipelineError, RuntimeError):
    """A DataLoader worker that died or could not hand over its batch (memory, limits, a signal)."""


class CacheError(PipelineError, RuntimeError):
    """A cache file that is incomplete, from another schema, busy, or from another setup."""


class Interrupted(PipelineError):
    """Ctrl-C during a long run; what was finished is kept for the next run to resume."""

    exit_code = 130

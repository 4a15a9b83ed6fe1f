"""User-facing errors.

Everything that is the user's fault (a missing folder, a corrupt image, a mistyped config key)
raises a subclass of :class:`AnoSegError` whose message names the file or key and says what was
expected. The command-line tools print these messages without a traceback.
"""


class AnoSegError(Exception):
    """Base class of all errors caused by bad input."""


class ConfigError(AnoSegError, ValueError):
    """An unknown, mistyped or out-of-range configuration value."""


class DataError(AnoSegError, ValueError):
    """A dataset folder, image or mask that is missing or not what was expected."""


class CheckpointError(AnoSegError, ValueError):
    """A checkpoint or run folder that is missing, corrupt or incompatible."""


class TrainingDivergedError(AnoSegError, RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class MetricsInputError(AnoSegError, ValueError):
    """Anomaly maps, masks, labels or scores that the metrics cannot use (NaN, wrong shape, ...)."""


class OutputError(AnoSegError, OSError):
    """An output folder or file that cannot be written: the path is a file, the disk is full,
    permission is denied. The message names the path; files already written are kept."""


class RunInUseError(AnoSegError, RuntimeError):
    """Another training process holds the folder's lock file (two writers on one checkpoint)."""


class MissingExtraError(AnoSegError, ImportError):
    """An optional feature whose packages are not installed (``pip install
    'anoseg-torch[<extra>]'``); the message names the package and the command."""


class ExportError(AnoSegError, RuntimeError):
    """An exported model file that does not reproduce PyTorch's outputs, or that holds no
    anoseg metadata."""

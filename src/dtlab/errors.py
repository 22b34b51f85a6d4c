"""One exception type per failure family. The CLI prints the message (no traceback), exit code 2."""


class DtlabError(Exception):
    """Base class of every error dtlab raises on bad input."""


class DatasetError(DtlabError):
    """A dataset file is missing, unreadable, or its contents are invalid."""


class CheckpointError(DtlabError):
    """A checkpoint directory is missing, corrupt, or inconsistent."""


class EnvError(DtlabError):
    """An environment id is unknown or its spaces do not match the data or checkpoint."""


class ConfigError(DtlabError):
    """A configuration value is invalid."""


class TrainingError(DtlabError):
    """Training cannot continue (e.g. a non-finite loss or gradient)."""


class DtlabWarning(UserWarning):
    """Suspicious but usable input (e.g. actions outside the action space bounds)."""


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for the command line: ``dtlab: warning: <message>``, one line
    (the CLI sets it)."""
    return f"dtlab: warning: {message}\n"

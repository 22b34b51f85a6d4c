"""The runtime's exception families: dtlab's own (dtlab.errors) where dtlab is installed, so that
``except dtlab.errors.ConfigError`` catches them; classes of the same names and meaning where the
runtime is installed alone (the ``dtlab-deploy`` distribution, deploy/pyproject.toml)."""

try:
    from dtlab.errors import ConfigError, DtlabError, DtlabWarning, EnvError, TrainingError
except ImportError:  # dtlab-deploy alone: no dtlab package
    class DtlabError(Exception):  # type: ignore[no-redef]
        """Base class of every error the runtime raises on bad input."""

    class ConfigError(DtlabError):  # type: ignore[no-redef]
        """An artifact or a value passed to the runtime is invalid."""

    class EnvError(DtlabError):  # type: ignore[no-redef]
        """An observation does not fit the artifact's observation space."""

    class TrainingError(DtlabError):  # type: ignore[no-redef]
        """The model produced a non-finite action."""

    class DtlabWarning(UserWarning):  # type: ignore[no-redef]
        """Suspicious but usable input (a target above the reliable range, an observation far
        outside the training data)."""

__all__ = ["ConfigError", "DtlabError", "DtlabWarning", "EnvError", "TrainingError"]

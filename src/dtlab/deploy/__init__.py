"""The torch-free runtime of a deploy artifact (``dtlab export``): numpy and onnxruntime only.

``DeployedPolicy(DIR)`` has ``DTPolicy``'s interface and semantics: ``reset(target_return)``,
``act(observation, last_reward)``, ``steer(target)``, batched over episodes. Installed with dtlab
it is ``dtlab.deploy``; installed alone (``pip install ./deploy``, no torch) it is
``dtlab_deploy``, built from these same files.
"""

from typing import Any

from .errors import ConfigError, DtlabError, DtlabWarning, EnvError, TrainingError


def __getattr__(name: str) -> Any:
    """``DeployedPolicy`` is imported when first asked for, so that ``dtlab.deploy.inputs`` (the
    input rules DTPolicy shares) imports without onnxruntime."""
    if name == "DeployedPolicy":
        from .runtime import DeployedPolicy

        return DeployedPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["DeployedPolicy", "ConfigError", "DtlabError", "DtlabWarning", "EnvError",
           "TrainingError"]

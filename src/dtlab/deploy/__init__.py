"""The torch-free runtime of a deploy artifact (``dtlab export``): numpy and onnxruntime only.

``DeployedPolicy(DIR)`` has ``DTPolicy``'s interface and semantics: ``reset(target_return)``,
``act(observation, last_reward)``, ``steer(target)``, batched over episodes. Installed with dtlab
it is ``dtlab.deploy``; installed alone (``pip install ./deploy``, no torch) it is
``dtlab_deploy``, built from these same files.
"""

from .errors import ConfigError, DtlabError, DtlabWarning, EnvError, TrainingError
from .runtime import DeployedPolicy

__all__ = ["DeployedPolicy", "ConfigError", "DtlabError", "DtlabWarning", "EnvError",
           "TrainingError"]

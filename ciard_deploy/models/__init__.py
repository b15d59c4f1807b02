"""Model architectures and their registry. Importing this package registers every model."""

from ciard_deploy.models import cifar_resnet, mobilenetv2, tiny, wideresnet  # noqa: F401  (registration)
from ciard_deploy.models.normalize import Normalized
from ciard_deploy.models.registry import MODELS, create_model, list_models

__all__ = ["MODELS", "Normalized", "create_model", "list_models"]

"""Model zoo, training and checkpoints.

``create_model(name, ...)`` is the one entry point: it looks ``name`` up in ``MODELS`` (or passes
``tv:<name>`` to torchvision) and puts a ``Normalize`` layer in front, so every model takes
[0, 1] images. Each family lives in its own module and registers itself on import.
"""

# importing a family module registers it in MODELS
from quantpatch.models import lenet, mobilenetv2, resnet, vgg, vit  # noqa: F401
from quantpatch.models._base import MODELS, Normalize, NormalizedClassifier
from quantpatch.models._factory import (
    check_model_name,
    create_model,
    load_weights,
    model_choices,
)
from quantpatch.models.checkpoint import load_checkpoint, save_checkpoint
from quantpatch.models.determinism import (
    TRAINING_THREADS,
    deterministic_training,
    training_numerics,
)
from quantpatch.models.fast import fast_frozen_copy
from quantpatch.models.train import TrainConfig, evaluate_accuracy, predict_logits, train_model

__all__ = [
    "MODELS",
    "TRAINING_THREADS",
    "Normalize",
    "NormalizedClassifier",
    "TrainConfig",
    "check_model_name",
    "create_model",
    "deterministic_training",
    "evaluate_accuracy",
    "fast_frozen_copy",
    "load_checkpoint",
    "load_weights",
    "model_choices",
    "predict_logits",
    "save_checkpoint",
    "train_model",
    "training_numerics",
]

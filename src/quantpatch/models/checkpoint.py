"""Checkpoints: a safetensors state dict plus JSON metadata, written atomically."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from quantpatch._io import load_tensors, save_tensors
from quantpatch.models._factory import assign_state


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Write ``model.state_dict()`` and ``metadata`` (any JSON value) to ``path`` atomically.

    Tensors are cloned so weights that share storage (tied layers) still save; safetensors
    refuses shared storage. Nothing is pickled.
    """
    state = {
        k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
    }
    save_tensors(path, state, metadata)


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Strictly load a checkpoint into ``model`` and return its metadata.

    Raises ``DataNotFoundError`` if missing, ``CorruptFileError`` if truncated, not safetensors,
    or if its keys/shapes do not match ``model`` (the model is left untouched then).
    """
    tensors, metadata = load_tensors(path)
    assign_state(model, tensors, source=str(path))
    return metadata

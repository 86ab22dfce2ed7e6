"""Device selection and seeding, shared by every stage."""

from __future__ import annotations

import random

import numpy as np
import torch

from quantpatch.errors import QuantpatchError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else must be a valid torch device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise QuantpatchError(f"invalid device '{device}': {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise QuantpatchError(f"device '{device}' requested but CUDA is not available")
    return resolved


def restart_draws(module: object) -> None:
    """Restart the random draws of every submodule that makes them (``reseed()``: a model
    served at a random precision), so what a caller measures does not depend on what ran
    before it in this process: a resumed run or a Ray worker gets the same numbers."""
    if isinstance(module, torch.nn.Module):
        for sub in module.modules():
            reseed = getattr(sub, "reseed", None)
            if callable(reseed):
                reseed()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

"""Defence registry and the wrapper that puts a defence in front of a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantpatch._registry import Registry
from quantpatch.errors import ConfigError

Defense = Callable[[torch.Tensor], torch.Tensor]
DEFENSES: Registry = Registry("defense")


def create_defense(name: str, **params: Any) -> nn.Module:
    factory = DEFENSES.get(name)
    try:
        return factory(**params)
    except TypeError as exc:
        raise ConfigError(f"defense '{name}': {exc}") from None


class DefendedModel(nn.Module):
    """``model(defense(x))``: evaluate or attack a model behind a preprocessing defence."""

    def __init__(self, model: nn.Module, defense: nn.Module) -> None:
        super().__init__()
        self.defense = defense
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.defense(images))

"""One set of float weights run at several precisions (switchable precision).

The quantization-aware training defences (``quantpatch.defenses.training``) train one model at
several bit-widths at once: every precision's convolution and linear weights are the *same*
parameters, while each precision keeps its own quantizer ranges and its own BatchNorm
(switchable BatchNorm: a 2-bit network's activation statistics are not an 8-bit one's). DWQ
(Fu et al., ICML 2021) runs such a model at a random precision per input batch.
"""

from __future__ import annotations

import torch
from torch import nn

from quantpatch.errors import ConfigError
from quantpatch.quant.layers import FakeQuantizer
from quantpatch.quant.quantize import quantize
from quantpatch.quant.spec import QuantSpec

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class SwitchablePrecision(nn.Module):
    """Members (one per precision, by name) sharing their conv/linear weights and biases.

    ``active`` names the member that runs; ``None`` is random-precision inference: each image
    gets a precision drawn uniformly from a seeded generator (deterministic for a given order
    of calls; every member runs, the drawn one's logits are kept). Attacks crafted on it in
    that mode directly see a fresh draw at every step (each image's gradient through the
    precision it drew); a study attacks it through ``attack_members`` instead, the exact
    expectation over the members.
    """

    def __init__(self, members: dict[str, nn.Module], seed: int = 0) -> None:
        super().__init__()
        if not members:
            raise ConfigError("a switchable-precision model needs at least one precision")
        self.members = nn.ModuleDict(members)
        self.names = list(members)
        self.active: str | None = self.names[0]
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        _tie(list(self.members.values()))

    @classmethod
    def from_float(
        cls, model: nn.Module, specs: list[QuantSpec], *, first_last_bits: int | None = 8
    ) -> SwitchablePrecision:
        """Members ``quantize(model, spec)`` for each spec (uncalibrated), weights tied."""
        return cls({spec.name: quantize(model, spec, first_last_bits=first_last_bits)
                    for spec in specs})  # fmt: skip

    def member(self, name: str) -> nn.Module:
        if name not in self.members:
            raise ConfigError(f"no precision {name!r} in this model; it has {self.names}")
        return self.members[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is not None:
            return self.members[self.active](x)
        if isinstance(x, torch.fx.Proxy):  # a traced graph would freeze one draw
            raise TypeError("random-precision inference cannot be traced")
        choice = torch.randint(len(self.names), (len(x),), generator=self.generator)
        logits = torch.stack([self.members[name](x) for name in self.names])
        return logits[choice.to(x.device), torch.arange(len(x), device=x.device)]

    def reseed(self) -> None:
        """Restart the random choice of precisions (the same draws again)."""
        self.generator.manual_seed(self.seed)


def attack_members(module: nn.Module) -> list[nn.Module]:
    """The modules a gradient attack on ``module`` averages its loss over: a random-precision
    model's members (the exact expectation over the draws it serves, and success only where
    every member is fooled), anything else itself. A wrapper around a random model (e.g. an
    input defence) is attacked as it is: through its own draws."""
    if isinstance(module, SwitchablePrecision) and module.active is None:
        return [module.member(name) for name in module.names]
    return [module]


def _tie(members: list[nn.Module]) -> None:
    """Make every member's conv/linear weights and biases the first member's parameters; norm
    layers and quantizer ranges stay per member. Refuses models whose layers do not line up
    (e.g. attention, whose float and quantized forms hold their weights differently)."""
    owner, *others = members
    shared = {
        name: param
        for name, param in owner.named_parameters()
        if not isinstance(_owning(owner, name), (*_NORMS, FakeQuantizer))
    }
    for other in others:
        for name, param in list(other.named_parameters()):
            module = _owning(other, name)
            if isinstance(module, (*_NORMS, FakeQuantizer)):
                continue
            source = shared.get(name)
            if source is None or source.shape != param.shape:
                raise ConfigError(
                    f"cannot share weight {name!r} between precisions of this architecture "
                    "(switchable precision needs conv/linear layers quantized in place)"
                )
            setattr(module, name.rpartition(".")[2], source)


def _owning(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])

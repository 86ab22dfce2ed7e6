"""``create_model``: registry lookup (or torchvision passthrough), normaliser, local weights."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from quantpatch._io import load_tensors
from quantpatch.errors import CorruptFileError, DataNotFoundError, ShapeError, UnknownNameError
from quantpatch.models._base import MODELS, Normalize, NormalizedClassifier

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def model_choices() -> list[tuple[str, str]]:
    """Registered models plus the ``tv:<name>`` passthrough, for CLI help."""
    return [
        *MODELS.describe(),
        (f"{TV_PREFIX}<name>", "any torchvision classifier, e.g. tv:resnet18 (random init)"),
        (f"{TIMM_PREFIX}<name>", "any timm architecture, e.g. timm:resnet18 (random init; "
         "pip install timm)"),
    ]  # fmt: skip


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    weights: str | os.PathLike | None = None,
) -> NormalizedClassifier:
    """Build ``Normalize(mean, std)`` + the named network; load ``weights`` from a local file.

    ``mean``/``std`` default to 0.5 (maps [0, 1] to [-1, 1]). ``weights`` is a safetensors file
    (e.g. written by ``save_checkpoint``) or a ``.pt``/``.pth`` state dict; nothing is downloaded.
    """
    if name.startswith(TV_PREFIX):
        net = _torchvision_net(name[len(TV_PREFIX) :], in_channels, num_classes, image_size)
    elif name.startswith(TIMM_PREFIX):
        net = _timm_net(name[len(TIMM_PREFIX) :], in_channels, num_classes, image_size)
    else:
        net = MODELS.get(name)(in_channels, num_classes, image_size)
    normalize = Normalize(0.5 if mean is None else mean, 0.5 if std is None else std, in_channels)
    model = NormalizedClassifier(normalize, net)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: NormalizedClassifier, path: str | os.PathLike) -> None:
    """Load a full-model or bare-network state dict from ``path`` into ``model`` (strict).

    A full-model file (from ``save_checkpoint``) carries ``normalize.*`` and replaces the
    normalisation too; a bare-network file (e.g. a torchvision ``.pth``) keeps the model's own.
    """
    state = _read_state(Path(path))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "normalize.mean" in state:
        target: nn.Module = model
    else:
        target = model.net.net if isinstance(model.net, _GrayToRGB) else model.net
    assign_state(target, state, source=str(path))


def assign_state(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strict ``load_state_dict`` that checks keys and shapes first, so a bad file leaves the
    model untouched and raises ``CorruptFileError`` instead of a long RuntimeError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if problems:
        raise CorruptFileError(f"{source} does not fit this model: " + "; ".join(problems))
    module.load_state_dict(dict(state), strict=True)


def _few(items: list[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataNotFoundError(f"weights file not found: {path}")
    if path.suffix.lower() not in _TORCH_SUFFIXES:
        tensors, _ = load_tensors(path)
        return tensors
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a malformed pickle fails in many ways (struct.error, KeyError...)
        raise CorruptFileError(f"cannot read weights {path}: {exc}".splitlines()[0]) from None
    for key in ("state_dict", "model"):  # common training-script wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CorruptFileError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


class _GrayToRGB(nn.Module):
    """Feeds 1-channel images to a 3-channel torchvision network by repeating the channel."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1))


def check_model_name(name: str) -> None:
    """Raise ``UnknownNameError`` for a name ``create_model`` cannot build (cheap: builds
    nothing), so a study fails before any work."""
    if name.startswith(TV_PREFIX):
        _check_torchvision_name(name[len(TV_PREFIX) :])
    elif name.startswith(TIMM_PREFIX):
        _check_timm_name(name[len(TIMM_PREFIX) :])
    else:
        MODELS.get(name)


def _check_torchvision_name(name: str) -> None:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownNameError(
            f"unknown torchvision classifier '{name}'; e.g. {', '.join(known[:8])}, ..."
        )


def _torchvision_net(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None)``; 1-channel input is repeated to 3."""
    import torchvision

    _check_torchvision_name(name)
    if in_channels not in (1, 3):
        raise ShapeError(f"tv:{name}: torchvision models take 1 or 3 channels, got {in_channels}")
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels == 1:
        net = _GrayToRGB(net)
    _dry_run(net, f"tv:{name}", in_channels, image_size)
    return net


def _timm():
    try:
        import timm
    except ImportError:
        raise UnknownNameError(
            "timm: models need the timm package (pip install timm or quantpatch[timm])"
        ) from None
    return timm


def _check_timm_name(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:8] or timm.list_models()[:8]
        raise UnknownNameError(f"unknown timm architecture '{name}'; e.g. {', '.join(close)}, ...")


def _timm_net(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` with this dataset's channels and classes
    (nothing is downloaded: weights come only from a local file)."""
    _check_timm_name(name)
    net = _timm().create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_channels
    )
    _dry_run(net, f"timm:{name}", in_channels, image_size)
    return net


def _dry_run(net: nn.Module, label: str, in_channels: int, image_size: int) -> None:
    """Fail at build time, not mid-study, when a network cannot take this image size."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ShapeError(f"{label} cannot take {image_size}px images: {msg}") from None
    finally:
        net.train(was_training)

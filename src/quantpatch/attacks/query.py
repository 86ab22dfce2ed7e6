"""What the query (score-based) attacks share: models as query functions, the margin loss,
and the Sparse-RS random-search proposals and schedules (Croce et al., AAAI 2022).

A query attack never asks for a gradient: a model is anything that maps a float image batch
to logits (an ``nn.Module``, a lambda, an ONNX Runtime session such as ``OrtModel``), called
under ``torch.inference_mode()``. All proposals are drawn from a seeded CPU generator and
built for a whole batch at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from quantpatch._runtime import restart_draws
from quantpatch.errors import ConfigError
from quantpatch.models.train import predict_logits

Predictor = Callable[[torch.Tensor], torch.Tensor]

# Sparse-RS's schedule of the resampled share of the patch, written for 10,000 iterations and
# rescaled to the budget: it halves after each of these iterations.
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SCHEDULE_LENGTH = 10_000
# The largest location move, as a share of the image side; it shrinks linearly to 0.
MAX_SHIFT = 0.75


def query_functions(models: Sequence[Predictor], device: torch.device) -> list[Predictor]:
    """Each model as ``images -> float logits on the images' device``, evaluated in eval and
    inference mode (a module's own mode is restored; nothing is copied or traced, so the
    queried function is exactly the one given)."""
    models = list(models)
    if not models:
        raise ConfigError("a query attack needs at least one model")
    for model in models:
        if not callable(model):
            raise ConfigError(f"a query attack needs callables, got {type(model).__name__}")
        restart_draws(model)  # a random-precision model: the same draws attack after attack

    def wrap(model: Predictor) -> Predictor:
        def query(images: torch.Tensor) -> torch.Tensor:
            logits = predict_logits(model, images, device, batch_size=max(len(images), 1))
            return logits.to(images.device)

        return query

    return [wrap(m) for m in models]


@contextmanager
def runtime_threads(models: Sequence[Predictor]) -> Iterator[None]:
    """Within the block, the attack's own tensor work runs on one torch thread when every
    queried model is an integer runtime with its own thread pool (``own_thread_pool``).

    After each parallel op, torch's OpenMP workers busy-wait on the cores that the runtime's
    next call needs; a query attack alternates the two every iteration. Its own work (proposals,
    pastes, margins) is a few small ops on at most a batch of images, so one thread costs it
    little. With a torch model among the targets nothing changes.
    (benchmarks/query_speed.py measures it.)
    """
    if not models or not all(getattr(m, "own_thread_pool", False) for m in models):
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def margin_and_success(
    logits: torch.Tensor, labels: torch.Tensor, targeted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image margin to minimise and success.

    Untargeted: true-class logit minus the best other one, success = prediction is not the
    label; targeted (``labels`` are the target): best other minus the target logit, success =
    prediction is the target. The margin is negative exactly when the attack succeeds (up to
    argmax ties), and it needs no probabilities, so logits from any runtime will do.
    """
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -torch.inf).amax(dim=1)
    hit = logits.argmax(dim=1) == labels
    if targeted:
        return others - own, hit
    return own - others, ~hit


def score(
    query: Sequence[Predictor], images: torch.Tensor, labels: torch.Tensor, targeted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin (mean over the models) and success (every model fooled): one query per image
    and model."""
    margin = images.new_zeros(len(images))
    success = torch.ones(len(images), dtype=torch.bool, device=images.device)
    for model in query:
        logits = model(images).float()
        if len(labels) and int(labels.max()) >= logits.shape[1]:
            what = "target_class" if targeted else "label"
            raise ConfigError(
                f"{what} {int(labels.max())} but the model has {logits.shape[1]} classes"
            )
        m, s = margin_and_success(logits, labels, targeted)
        margin, success = margin + m, success & s
    return margin / len(query), success


def square_side(progress: float, patch_size: int, p_init: float) -> int:
    """Side of the square resampled in a pixel update: the share ``p_init`` of the patch's
    pixels at the start, halved along Sparse-RS's schedule (``progress`` in [0, 1])."""
    step = int(progress * SCHEDULE_LENGTH)
    share = p_init / 2 ** sum(step > t for t in HALVINGS)
    return max(int(share**0.5 * patch_size), 1)


def max_shift(progress: float, side: int) -> int:
    """Largest location move (px) along an image side of ``side`` pixels: wide early, none at
    the end of the budget."""
    return int(MAX_SHIFT * max(1.0 - progress, 0.0) * side)


def corner_colours(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random corners of the colour cube ({0, 1} per channel): Sparse-RS's values, the most
    salient a bounded pixel can take."""
    return torch.randint(0, 2, shape, generator=generator).float()


def stripe_patches(n: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, C, p, p) Sparse-RS starts: every column one random corner colour."""
    return corner_colours((n, channels, 1, size), generator).expand(-1, -1, size, -1).clone()


def resample_squares(patches: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """Copies of ``patches`` (N, C, p, p) with one ``side`` x ``side`` square per row, at a
    random position, set to a random corner colour (one batched ``where``)."""
    n, channels, size, _ = patches.shape
    corner = torch.randint(0, size - side + 1, (2, n, 1, 1), generator=generator)
    colour = corner_colours((n, channels, 1, 1), generator).to(patches.device)
    grid = torch.arange(size)
    rows = (grid[:, None] >= corner[0]) & (grid[:, None] < corner[0] + side)
    cols = (grid[None, :] >= corner[1]) & (grid[None, :] < corner[1] + side)
    inside = (rows & cols).unsqueeze(1).to(patches.device)  # (N, 1, p, p)
    return torch.where(inside, colour, patches)


def shift_corners(
    corners: torch.Tensor, shift: int, limit: int, generator: torch.Generator
) -> torch.Tensor:
    """``corners`` (N,) moved by a uniform integer in [-shift, shift], kept in [0, limit]."""
    step = torch.randint(-shift, shift + 1, corners.shape, generator=generator)
    return (corners + step.to(corners.device)).clamp(0, limit)

"""Defended targets: every model of the study behind every defence, and their certificates.

Each (model x defence) is one more target of the grid, so the cells' adversarial images are
scored on it like on any model: crafted on an undefended source, that is the non-adaptive
threat model. An input defence in front of a PyTorch model is also an attack source (BPDA
where it is not differentiable), for the adaptive cells. PatchCleanser needs forward passes
only: it wraps ORT int8 sessions as well, and it certifies each model's clean images.
Defences are found through their contract (``defenses.Defense``, ``defenses.Certifier``)."""

from __future__ import annotations

import torch
from torch import nn

from quantpatch._io import content_key
from quantpatch.defenses import Certifier, DefendedModel, Defense, InputDefense
from quantpatch.defenses.certifiable import PlainInputAdapter
from quantpatch.metrics import accuracy
from quantpatch.models import predict_logits
from quantpatch.results import CertifiedPoint, CertifiedRecord, RateRecord
from quantpatch.study.settings.config import DefenseSettings
from quantpatch.study.settings.names import INDEPENDENT_TAG
from quantpatch.study.store.cache import EVAL_CODE, code_fingerprint
from quantpatch.study.zoo.certified import certifiable_targets, takes_encoded_input
from quantpatch.study.zoo.context import Predictor, PreparedModel, StudyContext, Target
from quantpatch.study.zoo.targets import add_target


def prepare_defended_targets(context: StudyContext) -> None:
    """Put every target built so far (each precision, ORT int8 included; not the independent
    fp32 model, which is there as a transfer source) behind every defence of the study; the
    undefended targets stay in the grid."""
    undefended = [t for t in context.targets if t.defense is None
                  and not (t.model is not None and t.model.tag == INDEPENDENT_TAG)]  # fmt: skip
    for settings in context.config.defenses:
        defense = settings.create()
        certifiable = settings.certifiable
        bases = certifiable_targets(context, settings, defense) if certifiable else undefended
        for base in bases:
            target = defended_target(context, base, settings, defense)
            add_target(context, target)
            certified = certify(context, base, target, settings, defense)
            record = context.model_records[-1]
            context.model_records[-1] = record.model_copy(
                update={"defense": settings.label, "certified": certified}
            )
            through = _differentiable(base, settings, defense)
            if through is not None:
                context.adaptive_sources[target.name] = adaptive_source(base.model, target, through)


def defended_target(
    context: StudyContext, base: Target, settings: DefenseSettings, defense: Defense
) -> Target:
    """``base`` behind ``defense``: the same images in, the defended labels out."""
    key = content_key({"model": base.key, "defense": settings.model_dump()})
    if isinstance(defense, InputDefense):
        predict = _transformed_predictor(base, defense, context.device)
    else:
        predict = _certifier_predictor(_seen_by(defense, settings, base.predict), defense,
                                       _device(context, base),
                                       context.dataset.num_classes)  # fmt: skip
    return Target(
        base.arch, base.precision, base.spec, base.runtime, predict, key, base.model,
        defense=settings.label, adaptive_via=defense.adaptive_via,
    )  # fmt: skip


def _transformed_predictor(base: Target, defense: InputDefense, device: torch.device):
    def predict(images: torch.Tensor) -> torch.Tensor:
        # the transform is batched like a model (predict_logits: chunks, inference mode)
        return base.predict(predict_logits(defense, images, device))

    return predict


def _certifier_predictor(
    base_predict: Predictor, defense: Defense, device: torch.device, num_classes: int
) -> Predictor:
    """A defence that gives labels, not logits, scored by its ``scores`` (argmax: its label;
    graded by its margin, for query attacks through it)."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        return defense.scores(base_predict, images, num_classes, device)

    return predict


def _seen_by(defense: Defense, settings: DefenseSettings, model):
    """``model`` as the defence feeds it: a plain model behind smoothing takes the kept
    pixels of the 2C encoding (``PlainInputAdapter``); anything else as it is."""
    if takes_encoded_input(defense) and not settings.certifiable:
        return PlainInputAdapter(model)
    return model


def _device(context: StudyContext, base: Target) -> torch.device:
    """Where masked images are built: ONNX Runtime sessions take CPU tensors."""
    return context.device if base.runtime == "torch" else torch.device("cpu")


def _differentiable(base: Target, settings: DefenseSettings, defense: Defense) -> nn.Module | None:
    """The defended PyTorch model as a module an attack can be crafted through: the model
    behind an input defence (BPDA where it is not differentiable) or a certifier's surrogate
    around it; None for other runtimes and defences without one."""
    if base.model is None:
        return None
    if isinstance(defense, InputDefense):
        return DefendedModel(base.model.module, defense)
    if isinstance(defense, Certifier) and defense.adaptive_via == "surrogate":
        return defense.surrogate(_seen_by(defense, settings, base.model.module))
    return None


def adaptive_source(model: PreparedModel, target: Target, module: nn.Module) -> PreparedModel:
    """``module`` (``model`` behind the target's defence) as an attack source."""
    return PreparedModel(model.arch, model.spec, module, target.key, model.tag,
                         defense=target.defense)  # fmt: skip


def certify(
    context: StudyContext, base: Target, target: Target, settings: DefenseSettings,
    defense: Defense,
) -> CertifiedRecord | None:  # fmt: skip
    """A certifier's certified accuracy of ``base`` on the evaluation images, at its patch
    size and at each of ``certify_sizes`` (cached: it classifies many masked or ablated copies
    of each image, and the key holds every size); None for other defences."""
    if not isinstance(defense, Certifier):
        return None
    parts = {"target": target.key, "n_eval": len(context.eval_labels),
             "sizes": settings.certify_sizes, "data": context.data_identity(),
             "code": code_fingerprint(*EVAL_CODE)}  # fmt: skip

    return context.cache.record("certified", parts, CertifiedRecord,
                                lambda: _certified_record(context, base, settings, defense))  # fmt: skip


def _certified_record(
    context: StudyContext, base: Target, settings: DefenseSettings, defense: Certifier
) -> CertifiedRecord:
    images, labels, device = context.eval_images, context.eval_labels, _device(context, base)
    predict = _seen_by(defense, settings, base.predict)
    sizes = sorted({defense.patch_size, *settings.certify_sizes})
    if settings.certify_sizes:
        pred, by_size = defense.certify_sizes(predict, images, labels, sizes, device)
    else:
        pred, certified = defense.certify(predict, images, labels, device)
        by_size = {defense.patch_size: certified}

    def rate(certified: torch.Tensor) -> RateRecord:
        return RateRecord.of(accuracy(torch.where(certified, labels, -1), labels))

    curve = [CertifiedPoint(patch_size=s, certified=rate(by_size[s])) for s in sizes]
    return CertifiedRecord(
        patch_size=defense.patch_size,
        method=defense.method(tuple(images.shape[-2:])),
        clean=RateRecord.of(accuracy(pred, labels)),
        certified=rate(by_size[defense.patch_size]),
        base_training="certifiable" if settings.certifiable else "plain",
        curve=curve if settings.certify_sizes else [],
    )

"""Every rule for naming a study's models, in one place.

A model of a study is ``<arch>/<precision>``, where the precision label is a ``QuantSpec`` name
(``w4a4``), a tagged one (``fp32-ft``: a control; ``w2a2-<recipe>``: a training defence's
member; ``random-<recipe>``: one served at a random precision; ``w8a8-cert``: trained for a
certified defence), a deployment (``ort-int8``) or ``onnx`` for a user's file; behind a defence it is ``<arch>/<precision>+<defence label>``.
The results and the report only ever read these names back; they never build them.
"""

from __future__ import annotations

from collections.abc import Iterable

from quantpatch.quant import QuantSpec
from quantpatch.results import INDEPENDENT_FP32, precision_order

USER_ONNX = "onnx"
"""The precision label of a user's ONNX file ('<name>/onnx')."""

CONTROL_TAG = "ft"
"""The tag of the fp32 model fine-tuned on the default QAT schedule ('fp32-ft')."""

FP32 = "fp32"

INDEPENDENT_TAG = INDEPENDENT_FP32.removeprefix(f"{FP32}-")
"""The tag of the independently trained fp32 model ('indep'): the similarity lenses'
reference, and a transfer source where an attack names 'fp32-indep'."""

CERTIFIABLE_TAG = "cert"
"""The tag of a model trained on a certified defence's own inputs ('w8a8-cert'): it is only
ever evaluated behind that defence ('<arch>/w8a8-cert+<label>')."""


def model_name(arch: str, precision: str) -> str:
    return f"{arch}/{precision}"


def defended_name(model: str, defense: str | None) -> str:
    """'<arch>/<precision>' behind a defence: '<arch>/<precision>+<defence label>'."""
    return f"{model}+{defense}" if defense else model


def tagged(precision: str, tag: str) -> str:
    """A precision label with a tag: a control ('fp32-ft') or a recipe member ('w2a2-dwq')."""
    return f"{precision}-{tag}" if tag else precision


def control_tag(spec: QuantSpec, default_schedule: bool) -> str:
    """'ft' for the default QAT schedule's control, 'ft-<precision>' for a precision's own."""
    return CONTROL_TAG if default_schedule else f"{CONTROL_TAG}-{spec.name}"


def is_control(precision: str) -> bool:
    """A control's label ('fp32-ft', 'fp32-ft-w2a2'): named after the schedule it repeats."""
    return precision.startswith(tagged(FP32, CONTROL_TAG))


def is_reserved(precision: str) -> bool:
    """Labels no recipe may take: the controls', the independent fp32 model's and the
    certifiably trained models'."""
    return (
        is_control(precision)
        or precision.startswith(tagged(FP32, INDEPENDENT_TAG))
        or precision.endswith(f"-{CERTIFIABLE_TAG}")
    )


def random_precision(recipe_label: str) -> str:
    """The label of a recipe's model served at a random precision per image."""
    return f"random-{recipe_label}"


def user_onnx_name(name: str) -> str:
    return model_name(name, USER_ONNX)


def lowest_precision(specs: Iterable[QuantSpec]) -> QuantSpec:
    """The quantized precision with the fewest bits (``precision_order``), else the first
    given: the study's 'lowest precision' wherever it is used."""
    specs = list(specs)
    quantized = [s for s in specs if not s.is_float] or specs
    return min(quantized, key=lambda s: precision_order(s.weight_bits, s.act_bits))

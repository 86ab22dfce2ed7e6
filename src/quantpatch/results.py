"""The results contract: typed records that results.json, results.csv and the report share.

A study writes these records; the report and any downstream tool read them back with
``load_results``. Every field is declared once, here: the JSON Schema (``quantpatch schema
results``), the CSV columns and the report's inputs are all derived from these models, and
``FORMAT_VERSION`` changes whenever a field changes meaning, so an old file is refused rather
than misread. This module depends only on pydantic and the metrics (never on the study).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantpatch._io import read_json
from quantpatch.errors import CorruptFileError
from quantpatch.metrics import Rate

FORMAT_VERSION = 5
"""Bumped whenever a record gains, loses or redefines a field."""

READABLE_VERSIONS = (FORMAT_VERSION,)
"""Formats this version reads. Format 5 made certificates and deployments generic (any
certifying defence, any runtime) and dropped ``white_box`` (``threat`` says it): rerun older
studies."""

PATCH_EXAMPLES = "examples"
"""Folder under a run's ``patches/``: per patch PNG, the first evaluation image with the patch
applied (``<cell>.png``) and a JSON note of its true class and the source model's prediction
(``<cell>.json``), for the report's gallery."""

INDEPENDENT_FP32 = "fp32-indep"
"""The precision label of an fp32 model trained from another seed, independent of every other
model of the study (``<arch>/fp32-indep``): a transfer source that shares nothing with them."""


def precision_order(weight_bits: int | None, act_bits: int | None) -> tuple[int, int]:
    """The one order of precisions, fewest bits first: by weight bits, then activation bits
    (float counts as 32). "The lowest precision" of a study is the first in this order, for
    the study and the report alike (w2a8 before w4a4)."""
    return (weight_bits or 32, act_bits or 32)


class Record(BaseModel):
    """Strict, immutable base: unknown fields are refused, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- shared value records ----------------------------------------------------------------------


class RateRecord(Record):
    """k successes out of n with the 95 % Wilson interval (``Rate`` as data)."""

    successes: int = Field(ge=0)
    n: int = Field(ge=0)
    rate: float
    ci_low: float
    ci_high: float

    @model_validator(mode="after")
    def _consistent(self) -> RateRecord:
        if self.successes > self.n:
            raise ValueError(f"successes ({self.successes}) exceed n ({self.n})")
        if self.n and not math.isclose(self.rate, self.successes / self.n, abs_tol=1e-9):
            raise ValueError(f"rate {self.rate} is not successes / n")
        return self

    @classmethod
    def of(cls, rate: Rate) -> RateRecord:
        return cls(**rate.to_dict())


class MeanCI(Record):
    """Mean of per-image values with its sample std, n and 95 % Student-t interval."""

    mean: float
    std: float
    n: int = Field(ge=0)
    half_width: float
    ci_low: float
    ci_high: float


LayerValues = list[tuple[str, float]]
"""(layer name, value) in forward order."""


# -- models -------------------------------------------------------------------------------------


class MatchRecord(Record):
    """ONNX Runtime int8 against one reference model on one kind of input."""

    agreement: RateRecord = Field(description="images where both predict the same class")
    logit_error: float = Field(
        description="mean over images of ||logits_int8 - logits_ref|| / ||logits_ref||"
    )
    reference_accuracy: RateRecord = Field(description="the reference's own top-1 accuracy")


class InputCheckRecord(Record):
    """The deployed int8 model on clean or on adversarial images, against the simulation that
    should predict it and against fp32 (the null a simulation must beat to mean anything)."""

    int8_accuracy: RateRecord
    simulation: MatchRecord
    fp32: MatchRecord
    simulation_closer: bool = Field(
        description="the simulation's logit error is below fp32's: it models the runtime"
    )


class DeploymentRecord(Record):
    """A deployed integer model checked against the fake-quant model that should reproduce it,
    with the runtime's fp32 network as the null, and what it buys in speed."""

    deployment: str = Field(description="the registered deployment, e.g. 'ort-int8'")
    kind: str = Field(
        description="'ptq': the runtime's own int8 of the fp32 model, against its simulation "
        "by the runtime's rules on the same calibration images; 'qat-qdq': a QAT model exported "
        "with its learned scales, against the trained model itself"
    )
    reference: str = Field(description="the simulated (fake-quant) model compared with")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="what else the deployed file depends on, e.g. ORT's reduce_range "
        "([-64, 64] weight codes on x86 without VNNI)",
    )
    clean: InputCheckRecord
    adversarial: InputCheckRecord | None
    adversarial_attack: str | None = Field(
        description="how the adversarial images were made (crafted on the fp32 model)"
    )
    patched: InputCheckRecord | None = Field(
        None,
        description="the same check on patch images crafted on the simulation: saturated "
        "patch pixels test the activation ranges the runtime clips to (None: not run)",
    )
    patched_attack: str | None = Field(None, description="how the patch images were made")
    int8_img_per_s: float
    fp32_img_per_s: float
    speedup_vs_fp32: float


class CertifiedPoint(Record):
    """Certified accuracy against one patch side: a point of the certified-accuracy curve."""

    patch_size: int = Field(ge=1, description="side (px) of the patch certified against")
    certified: RateRecord = Field(description="certified robust accuracy at that side")


class CertifiedRecord(Record):
    """A certifying defence's certificate on the clean evaluation images: a certified image
    keeps its true label under every patch of ``patch_size`` anywhere, whatever its content."""

    patch_size: int = Field(ge=1, description="side (px) of the patch certified against")
    method: str = Field(description="how it certifies, in words (e.g. '36 masks of 12x12 px')")
    clean: RateRecord = Field(description="the defended model's accuracy on the clean images")
    certified: RateRecord = Field(description="certified robust accuracy")
    base_training: Literal["plain", "certifiable"] = Field(
        "plain",
        description="how the model behind the defence was trained: on whole images ('plain') "
        "or on the defence's own ablated or masked inputs ('certifiable')",
    )
    curve: list[CertifiedPoint] = Field(
        default_factory=list,
        description="certified accuracy against other patch sides from the same votes "
        "(the defence's certify_sizes), ascending; empty where none were asked for",
    )


class ModelRecord(Record):
    """One evaluated model (a target of the grid): its clean accuracy on the evaluation images."""

    name: str = Field(description="'<arch>/<precision>', e.g. 'lenet/w4a4' or 'lenet/ort-int8'")
    replicate: int = Field(0, ge=0, description="which trained replicate of the model")
    arch: str
    precision: str = Field(
        description="a QuantSpec name such as 'w4a4'; 'ort-int8' (ORT static int8 of fp32) or "
        "'ort-w8a8' (the QAT w8a8 model deployed on ORT as trained)"
    )
    runtime: str = Field(description="what runs it: 'torch', or a deployment's runtime")
    weight_bits: int | None = Field(description="None: float weights")
    weight_levels: int | None = Field(
        description="distinct weight values per channel: 3 for 2-bit narrow (ternary) weights, "
        "4 for the full 2-bit grid (w2a2-full); first and last layers keep their own bits"
    )
    act_bits: int | None = Field(description="None: float activations")
    key: str = Field(description="content key of the cached artifact")
    clean: RateRecord
    control_of: list[str] = Field(
        default_factory=list,
        description="for an fp32 control fine-tuned on a QAT schedule: the quantized models "
        "that got the same extra training",
    )
    defense: str | None = Field(
        None, description="label of the defence in front of the model; None: undefended"
    )
    certified: CertifiedRecord | None = Field(None, description="for a patchcleanser target")
    deployment: DeploymentRecord | None = None
    recipe: str | None = Field(
        None,
        description="label of the training defence that trained the model (one model at "
        "every precision); None: plain training and QAT",
    )


# -- cells --------------------------------------------------------------------------------------


class Timings(Record):
    """Seconds spent on one cell (fit is 0 when the patch came from the cache)."""

    fit_s: float = Field(ge=0)
    perturb_s: float = Field(ge=0)
    eval_s: float = Field(ge=0)
    wall_s: float | None = Field(None, ge=0, description="the whole cell, on its worker")
    executor: Literal["local", "ray"] | None = Field(None, description="what ran the cell")
    node: str | None = Field(None, description="host (and Ray node id) the cell ran on")


class CurvePoint(Record):
    """One point of a universal patch's fit curve, averaged over the steps since the last one."""

    step: int = Field(ge=1, description="optimisation steps done")
    loss: float = Field(description="mean batch cross-entropy (maximised unless targeted)")
    success: float = Field(
        ge=0, le=1, description="share of the patched training images fooling every source model"
    )


class CellRecord(RateRecord):
    """One (source, attack, patch size, seed) cell evaluated on one target model.

    Untargeted ASR counts only images the target classifies correctly when clean; targeted ASR
    only images whose true class is not the target."""

    study: str
    dataset: str
    cell: str = Field(description="id of the cell file under cells/")
    source: str = Field(description="'<arch>/<precision>' the attack was crafted on, 'none'")
    source_arch: str | None
    source_precision: str | None
    target: str
    target_arch: str
    target_precision: str
    defense: str | None = Field(
        None, description="label of the target's defence; None: an undefended target"
    )
    threat: Literal["white-box", "white-box ensemble", "query-only", "transfer", "source-free"] = (
        Field(
            description="'white-box ensemble': crafted on several models, the target among "
            "them (multibit); 'query-only': a score-based attack that saw only the target's "
            "logits (sparse-rs); 'source-free': needs no model (random patch)"
        )
    )
    mean_queries: float | None = Field(
        None, description="query attacks: model queries per image, mean over the images"
    )
    adaptive: bool = Field(
        False,
        description="crafted knowing the target's defence: white-box through it; False on a "
        "defended target: crafted on an undefended model (non-adaptive)",
    )
    adaptive_via: Literal["exact", "bpda", "surrogate", "underlying-model", "queries"] | None = (
        Field(
            None,
            description="how an adaptive attack saw the defence: exact gradients, "
            "straight-through (BPDA) ones, a certified defence's differentiable 'surrogate' "
            "(soft vote, mean over masks), or none: a forward-only defence without a surrogate "
            "is attacked white-box on the model behind it; 'queries': a query attack that saw "
            "only the defended model's outputs",
        )
    )
    attack: str = Field(description="label: attack name plus the settings that set it apart")
    attack_name: str
    attack_kind: Literal["patch", "pixel"]
    targeted: bool
    target_class: int | None
    patch_size: int | None = Field(description="patch side in pixels (None for pixel attacks)")
    patch_area: float | None = Field(description="patch area as a share of the image")
    seed: int
    replicate: int = Field(
        0, ge=0, description="the trained replicate: source and target models are its own"
    )
    target_clean_accuracy: float
    timings: Timings
    # Optional, JSON only (not CSV columns): results written before them load with None.
    fit_curve: list[CurvePoint] | None = Field(
        None, description="the universal patch's fit curve (None: nothing fitted or not recorded)"
    )
    patch_location: tuple[int, int] | None = Field(
        None, description="(top, left) a location search chose for the patch (lavan 'search')"
    )
    robust_accuracy: RateRecord | None = Field(
        None,
        description="share of all evaluation images the target still classifies correctly "
        "after the attack (unconditional: unlike ASR it counts images wrong when clean, so a "
        "defence that costs clean accuracy cannot hide behind a smaller eligible subset)",
    )
    outcomes: str | None = Field(
        None,
        pattern=r"^[.01]*$",
        description="per evaluation image, in order: '.' not counted (wrong when clean, or "
        "already the target), '0' counted and resisted, '1' counted and fooled; what paired "
        "tests between cells on the same images and models need",
    )

    @model_validator(mode="after")
    def _outcomes_match(self) -> CellRecord:
        if self.outcomes is not None and (
            self.outcomes.count("1") != self.successes
            or len(self.outcomes) - self.outcomes.count(".") != self.n
        ):
            raise ValueError("outcomes do not match successes and n")
        return self


JSON_ONLY = ("fit_curve", "patch_location", "outcomes")
"""CellRecord fields kept out of the CSV table (curves do not fit a cell of it)."""


def csv_columns() -> list[str]:
    """CellRecord's fields: what the cell is, then its rate, then the flattened timings."""
    rate = list(RateRecord.model_fields)
    skip = {*rate, "timings", *JSON_ONLY}
    identity = [f for f in CellRecord.model_fields if f not in skip]
    return identity + rate + list(Timings.model_fields)


def cells_to_csv(cells: list[CellRecord]) -> str:
    """The cell records as one flat CSV table (header from ``csv_columns``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(), lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        row = cell.model_dump(exclude=set(JSON_ONLY))
        timings = row.pop("timings")
        writer.writerow({**row, **timings})
    return buffer.getvalue()


# -- analyses -----------------------------------------------------------------------------------


class AlignmentPair(Record):
    """Input-gradient agreement of two models on the same images, with two references:
    ``_chance`` pairs image i of a with image i-1 of b (any class), ``_same_class`` with
    another image of the same class, so "the models agree" is told apart from "the images have
    structure"."""

    a: str
    b: str
    input: Literal["clean", "patched"]
    cosine: MeanCI
    cosine_chance: MeanCI
    cosine_same_class: MeanCI
    edge_iou: MeanCI
    edge_iou_chance: MeanCI
    edge_iou_same_class: MeanCI
    hog_cosine: MeanCI
    hog_cosine_chance: MeanCI
    hog_cosine_same_class: MeanCI


class GradientAlignment(Record):
    n_images: int
    patch_size: int
    pairs: list[AlignmentPair]
    controls: list[AlignmentPair] = Field(
        description="each architecture's fp32 model vs an independently trained fp32 model "
        "(another seed): the agreement two unrelated models of the same kind reach"
    )


class FeatureLenses(Record):
    """CKA against fp32, patch dominance and Grad-CAM mass of one model."""

    cka_clean: LayerValues
    cka_patched: LayerValues
    dominance: LayerValues
    gradcam_layer: str
    gradcam_mass_clean_class: MeanCI
    gradcam_mass_patched_class: MeanCI
    patch_area_share: float


class ArchFeatures(Record):
    n_images: int
    cka: Literal["linear", "debiased"] = Field(
        description="linear CKA, or its debiased estimate (unbiased HSIC; plain CKA is biased "
        "towards 1 when there are few images next to the feature width)"
    )
    cka_independent: LayerValues = Field(
        description="CKA of the fp32 model with an independently trained fp32 model: the level "
        "two unrelated models of this architecture reach"
    )
    precisions: dict[str, FeatureLenses]


class SpatialMap(Record):
    """ASR of a fixed patch at every grid position (rows: top, columns: left)."""

    source: str
    rates: list[list[float]]
    n: int


class SpatialSensitivity(Record):
    patch_size: int
    stride: int
    maps: dict[str, SpatialMap]


class SizeRow(RateRecord):
    arch: str
    kind: str = Field(description="'white-box fp32' or 'fp32 → <precision>'")
    fraction: float
    patch_size: int


class SizeCurve(Record):
    rows: list[SizeRow]


class StrengthRow(Record):
    """One precision of the quantization-strength lens (weights, activations or both)."""

    axis: Literal["weights", "activations", "both"]
    bits: int
    precision: str
    clean_accuracy: float
    white_box: RateRecord
    fp32_transfer: RateRecord
    layer_error: LayerValues


class ArchStrength(Record):
    patch_size: int
    rows: list[StrengthRow]


class Analyses(Record):
    """The four "why" lenses; each is absent when switched off."""

    gradient_alignment: GradientAlignment | None = None
    features: dict[str, ArchFeatures] | None = None
    sensitivity: SpatialSensitivity | None = None
    size_curve: SizeCurve | None = None
    quant_strength: dict[str, ArchStrength] | None = None


# -- the file -----------------------------------------------------------------------------------


class ResultsFile(Record):
    """The whole of results.json."""

    format_version: Literal[READABLE_VERSIONS] = FORMAT_VERSION  # type: ignore[valid-type]
    study: str
    dataset: str
    config: dict[str, Any] = Field(description="the resolved study configuration, verbatim")
    versions: dict[str, str]
    training_numerics: dict[str, Any] = Field(
        default_factory=dict,
        description="what decides trained weights bit-for-bit: torch and its math libraries, "
        "the CPU kernels, training threads and determinism settings (models.training_numerics)",
    )
    device: str
    models: list[ModelRecord]
    cells: list[CellRecord]
    analyses: Analyses = Field(default_factory=Analyses)

    def model(self, name: str) -> ModelRecord:
        return next(m for m in self.models if m.name == name)


def results_schema() -> dict[str, Any]:
    """JSON Schema of results.json."""
    return ResultsFile.model_json_schema()


def load_results(path: str | Path) -> ResultsFile:
    """Read and validate ``results.json`` (or a run folder holding one).

    Raises ``DataNotFoundError`` when missing and ``CorruptFileError`` (naming the first bad
    field) when the file is not a results file of this format version."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return parse_results(read_json(path), str(path))


def parse_results(data: Any, source: str = "results") -> ResultsFile:
    if isinstance(data, dict) and data.get("format_version") not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise CorruptFileError(
            f"{source}: results format {data.get('format_version')!r}, this quantpatch reads "
            f"formats {readable}; rerun the study to regenerate it"
        )
    try:
        return ResultsFile.model_validate(data)
    except ValidationError as exc:
        raise CorruptFileError(f"{source}: {first_error(exc)}") from None


def first_error(exc: ValidationError) -> str:
    """The first validation error as 'field.path: message'."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{where}: {err['msg']}"

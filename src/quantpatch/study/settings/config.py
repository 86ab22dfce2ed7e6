"""The study description: one validated pydantic model, loadable from YAML.

Everything that changes a number in the results lives here, so a config plus the package
version fully determines a run (and the cache keys derived from it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from quantpatch._io import content_key
from quantpatch._registry import Registry
from quantpatch._yaml import load_yaml_mapping
from quantpatch.attacks import ATTACKS
from quantpatch.defenses import DEFENSES
from quantpatch.defenses.training import RECIPES
from quantpatch.deployments import DEPLOYMENTS
from quantpatch.errors import ConfigError, ShapeError
from quantpatch.models import TrainConfig
from quantpatch.quant import CALIBRATIONS, QuantSpec
from quantpatch.study.settings.limits import MAX_REPLICATES
from quantpatch.study.settings.names import (
    FP32,
    INDEPENDENT_FP32,
    USER_ONNX,
    is_control,
    is_reserved,
    lowest_precision,
    random_precision,
    tagged,
    user_onnx_name,
)


def _as_spec(value: Any) -> QuantSpec:
    return value if isinstance(value, QuantSpec) else QuantSpec.parse(value)


Precision = Annotated[
    QuantSpec,
    PlainValidator(_as_spec),
    PlainSerializer(lambda spec: spec.name, return_type=str),
    WithJsonSchema({"type": "string", "description": "a precision name: fp32, w8a8, w4a4-ptq..."}),
]
"""A ``QuantSpec`` in the config, written as its name in YAML and JSON."""


class _Strict(BaseModel):
    # NaN or inf in a setting (a YAML `.nan`, a std of `.inf`) is refused like any bad value
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, lt=2**63)]
"""Seeds are non-negative and fit in 64 bits (torch.Generator.manual_seed)."""

STUDY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""A study name becomes a folder under runs/: no separators, no leading dot."""


LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,79}$"
"""A results label of an attack, defence or recipe (it names files and table columns)."""


class AttackSettings(_Strict):
    """One attack of the grid; ``params`` go to the attack's constructor.

    ``label`` names it in results; left out, the study derives a label from the name and the
    settings that set it apart from the study's other attacks of the same name."""

    name: str = Field(description="a registered attack (`quantpatch list attacks`)")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the attack's constructor arguments (e.g. steps, eps, batch_size); "
        "patch_size comes from the study's patch_sizes",
    )
    label: str | None = Field(
        None,
        pattern=LABEL_PATTERN,
        description="its name in results (letters, digits, . _ = -; up to 80 chars); default: "
        "the name plus the params that set it apart from same-named attacks",
    )
    sources: list[str] | None = Field(
        None,
        min_length=1,
        description="precisions to craft on (e.g. [fp32, w2a2]; controls as fp32-ft; fp32-indep: "
        "an fp32 model trained from another seed, independent of every model of the study, "
        "trained on the study's schedule even where `weights` loads fp32); default: every "
        "model. The adversarial images of each source are still scored on every target.",
    )
    adaptive: bool = Field(
        True,
        description="when the study has defences: also craft this attack white-box through each "
        "input defence (BPDA where it is not differentiable) and score it on that defended "
        "target; a certified defence is attacked through its differentiable surrogate",
    )

    def base_label(self) -> str:
        mode = self.params.get("mode")
        targeted = "-targeted" if self.params.get("targeted") else ""
        return f"{self.name}{f'-{mode}' if mode else ''}{targeted}"

    def create(self, patch_size: int | None, seed: int, progress: bool) -> Any:
        """The attack for one patch size and seed; a bad parameter names this attack."""
        params: dict[str, Any] = {"seed": seed, "progress": progress, **self.params}
        if ATTACKS.get(self.name).kind == "patch":
            params["patch_size"] = patch_size
        return _created(ATTACKS, self.name, self.label or self.name, params)


class _RegisteredSettings(_Strict):
    """A registered name, its constructor ``params`` and a results ``label`` (derived like an
    attack's when left out); an unknown name fails the config, listing the registry."""

    _registry: ClassVar[Registry]
    name: str = Field(description="a registered name")
    params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of its constructor"
    )
    label: str | None = Field(
        None,
        pattern=LABEL_PATTERN,
        description="its name in results (letters, digits, . _ = -; up to 80 chars); default: "
        "the name plus the params that set it apart from same-named entries",
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        cls._registry.get(value)
        return value

    def base_label(self) -> str:
        return self.name

    def create(self) -> Any:
        """The defence or recipe itself; a bad parameter names this entry's label."""
        return _created(self._registry, self.name, self.label or self.name, self.params)


def _created(registry: Registry, name: str, label: str, params: dict[str, Any]) -> Any:
    try:
        return registry.create(name, **params)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{registry.kind} '{name}' ")
        raise ConfigError(f"{registry.kind} '{label}': {message}") from None


class DefenseSettings(_RegisteredSettings):
    """One defence of the grid; ``params`` go to the defence's constructor. Every model (each
    precision, ORT int8 included) is also evaluated behind it, named '<model>+<label>'.

    ``label`` names it in results; left out, it is derived like an attack's (name, plus the
    settings that set it apart from the study's other defences of the same name)."""

    _registry: ClassVar[Registry] = DEFENSES
    name: str = Field(description="a registered defence (`quantpatch list defenses`)")
    certifiable: bool = Field(
        False,
        description="a certified defence only: put it in front of models trained for it, on "
        "its own ablated or masked inputs (fp32, then every quantized precision by QAT or "
        "PTQ on the same inputs, and each deployment of that fp32 model), named "
        "'<arch>/<precision>-cert+<label>'; false: in front of the study's plain models",
    )
    train: TrainConfig | None = Field(
        None,
        description="with certifiable: the schedule of its fp32 models; default: the "
        "study's train (QAT follows the study's qat and qat_overrides)",
    )
    certify_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="more patch sides (px) to certify against, for the certified-accuracy "
        "curve; only for a defence that certifies every side from one vote "
        "(derandomized-smoothing)",
    )

    @field_validator("certify_sizes")
    @classmethod
    def _ascending_sizes(cls, sizes: list[int]) -> list[int]:
        return sorted(set(sizes))

    def base_label(self) -> str:
        return f"{self.name}-cert" if self.certifiable else self.name


class RecipeSettings(_RegisteredSettings):
    """A quantization-aware training defence (``quantpatch.defenses.training``): per
    architecture, one model trained at fp32 and every quantized precision of the study at once
    (shared weights); each precision joins the grid as '<arch>/<precision>-<label>', next to
    plain QAT. A recipe that serves a random precision also adds '<arch>/random-<label>'.

    ``qat``: its training schedule; left out, the QAT schedule of the study's lowest
    precision (the longest plain QAT gets), so the recipe trains no longer than plain QAT."""

    _registry: ClassVar[Registry] = RECIPES
    name: str = Field(description="a registered training defence (`quantpatch list recipes`)")
    qat: TrainConfig | None = Field(
        None,
        description="its training schedule; default: the QAT schedule of the study's lowest "
        "precision",
    )


Labelled = TypeVar("Labelled", AttackSettings, DefenseSettings, RecipeSettings)


def _unique_labels(attacks: list[Labelled]) -> list[Labelled]:
    """Fill in missing labels: the base label, plus ``-<param><value>`` for every parameter
    whose value differs among attacks sharing that base label, so settings that change results
    never merge into one label (and are never pooled as seeds)."""
    groups: dict[str, list[AttackSettings]] = {}
    for attack in attacks:
        groups.setdefault(attack.base_label(), []).append(attack)
    labelled = []
    for attack in attacks:
        if attack.label is None:
            peers = groups[attack.base_label()]
            differing = sorted(
                {k for peer in peers for k in {*peer.params, *attack.params}
                 if peer.params.get(k) != attack.params.get(k)}
            )  # fmt: skip
            suffix = "".join(f"-{k}{_compact(attack.params[k])}" for k in differing
                             if k in attack.params)  # fmt: skip
            attack = attack.model_copy(update={"label": attack.base_label() + suffix})
        labelled.append(attack)
    return labelled


def _compact(value: Any) -> str:
    text = str(value)
    return re.sub(r"[^A-Za-z0-9.=-]+", "", text.replace(" ", "")) or "x"


class OnnxModelSettings(_Strict):
    """A user's ONNX file (fp32, or QDQ int8) as a target of the grid, run by ONNX Runtime.

    Its input size, channels and classes are read from the file and checked against the
    dataset; ``mean``/``std`` are the normalisation the file expects (left out: it takes the
    [0, 1] images as they are). It is evaluated on every attack's images, and query attacks
    can be crafted on the users' files (``sources: [onnx]``)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="names the target '<name>/onnx' (letters, digits, . _ -; up to 64 chars)",
    )
    path: Path = Field(description="the .onnx file (fp32, or QDQ int8)")
    mean: list[float] | None = Field(
        None,
        min_length=1,
        description="per-channel mean the file expects on [0, 1] images (one value or one per "
        "channel); give with std, or neither",
    )
    std: list[float] | None = Field(
        None,
        min_length=1,
        description="per-channel std the file expects (positive; one value or one per "
        "channel); left out with mean: the [0, 1] images as they are",
    )

    @model_validator(mode="after")
    def _normalisation(self) -> OnnxModelSettings:
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"onnx model '{self.name}': give both mean and std, or neither")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"onnx model '{self.name}': std must be positive")
        return self

    @property
    def label(self) -> str:
        return user_onnx_name(self.name)

    def normalisation(self, channels: int) -> tuple[Any, Any]:
        """(mean, std) as (1, C, 1, 1) tensors for ``channels``-channel images (0 and 1 when
        the file takes [0, 1] images as they are)."""
        import torch

        if self.mean is None or self.std is None:
            return torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ShapeError(f"onnx model '{self.name}': {len(values)} {what} values for "
                                 f"{channels}-channel images")  # fmt: skip

        def per_channel(values: list[float]) -> Any:
            return torch.tensor(values).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)

        return per_channel(self.mean), per_channel(self.std)


class AnalysisSettings(_Strict):
    """Which "why" analyses run; each is cheap next to training and can be switched off."""

    gradient_alignment: bool = Field(
        True,
        description="input-gradient alignment (cosine, edge IoU, HOG) of every pair of models",
    )
    features: bool = Field(
        True, description="layer-wise CKA to fp32, patch dominance and Grad-CAM patch mass"
    )
    spatial: bool = Field(
        True, description="ASR map of each architecture's fp32 patch over patch locations"
    )
    spatial_stride: int = Field(2, ge=1, description="pixels between locations of the ASR map")
    size_curve: bool = Field(
        True, description="ASR vs patch area: white-box fp32 and fp32 → lowest precision"
    )
    size_fractions: list[float] = Field(
        default_factory=lambda: [0.02, 0.04, 0.06, 0.10, 0.16],
        description="patch areas of the size curve, as shares of the image area, in (0, 1)",
    )
    quant_strength: bool = Field(
        True,
        description="weights-only, activations-only and both quantized at each strength_bits: "
        "clean accuracy, white-box and fp32-transfer ASR",
    )
    strength_bits: list[int] = Field(
        default_factory=lambda: [2, 4, 8],
        description="bit-widths (1-8) of the quantization-strength lens",
    )
    models: list[str] | None = Field(
        None,
        description="architectures for the costly lenses (size curve, quantization strength); "
        "default: the study's first",
    )
    n_images: int = Field(256, ge=8, description="images used by the gradient/feature analyses")
    cka: Literal["linear", "debiased"] = Field(
        "debiased", description="CKA estimator; debiased suits few images and wide layers"
    )
    spatial_images: int = Field(64, ge=8, description="images per location in spatial maps")

    @field_validator("size_fractions")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        if any(not 0 < v < 1 for v in values):
            raise ValueError("size fractions are shares of the image area, in (0, 1)")
        return _distinct(values, "size fraction")

    @field_validator("strength_bits")
    @classmethod
    def _bits(cls, values: list[int]) -> list[int]:
        if any(not 1 <= v <= 8 for v in values):
            raise ValueError("strength bits must be in 1..8")
        return _distinct(values, "bit-width")


def _distinct(values: list, what: str) -> list:
    seen = set()
    for value in values:
        key = value.name if isinstance(value, QuantSpec) else value
        if key in seen:
            raise ValueError(f"{what} {key} is listed twice")
        seen.add(key)
    return values


DEFAULT_PRECISIONS = tuple(QuantSpec.parse(p) for p in ("fp32", "w8a8", "w4a4", "w2a2"))


def default_attacks(precisions: list[QuantSpec] | tuple[QuantSpec, ...]) -> list[AttackSettings]:
    """The demo's attacks: the universal patch (EOT placement), a per-image patch and pixel
    PGD (the contrast case), and the random-patch baseline. Per-image attacks cost a full
    attack per image and source, so they are crafted on fp32 and the lowest bit-width only;
    every target still scores their images."""
    lowest = lowest_precision(precisions)
    ends = [FP32] + ([lowest.name] if not lowest.is_float else [])
    return [
        AttackSettings(name="universal", params={"steps": 100, "batch_size": 64}),
        # batch 32: the first round of the placement search runs 9 copies of each batch (memory)
        AttackSettings(name="patch-pgd", params={"steps": 50, "batch_size": 32}, sources=ends),
        AttackSettings(name="pgd-linf", params={"eps": 0.1, "steps": 20}, sources=ends),
        AttackSettings(name="random"),
    ]


class StudyConfig(_Strict):
    """A full study: dataset x models x precisions x attacks x patch sizes x seeds."""

    name: str = Field(
        "demo",
        pattern=STUDY_NAME,
        description="the study's name, its folder under runs/ (letters, digits, . _ -; "
        "no leading dot or separator)",
    )
    dataset: str = Field(
        "mnist5k",
        description="a registered dataset (`quantpatch list datasets`); mnist5k is embedded",
    )
    data_root: Path | None = Field(
        None,
        description="folder holding the dataset's files in their standard layout "
        "(not needed for mnist5k)",
    )
    download: bool = Field(
        False, description="allow downloading missing dataset files into data_root"
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="at most this many images per split (train, test), a seeded subset; "
        "default: all",
    )
    data_seed: Seed = Field(
        0, description="seeds the dataset split and the evaluation and calibration subsets"
    )
    models: list[str] = Field(
        default_factory=lambda: ["lenet", "resnet20"],
        min_length=1,
        description="architectures (`quantpatch list models`, or timm:<name> / tv:<name>)",
    )
    precisions: list[Precision] = Field(
        default_factory=lambda: list(DEFAULT_PRECISIONS),
        min_length=1,
        description="precisions to train and attack: fp32, or wXaY (weight/activation bits 1-8, "
        "32 = float; QAT) with suffixes -ptq (post-training), -pt (per-tensor weights), "
        "-full, -asym or -reduced (weight grid), e.g. w8a8, w2a2-full, w4a4-ptq",
    )
    deployments: list[str] = Field(
        default_factory=lambda: ["ort-int8", "ort-w8a8"],
        description="integer runtimes each model also ships on, each a target "
        "('<arch>/<deployment>'; `quantpatch list deployments`); a deployment of a QAT "
        "precision (ort-w8a8) joins only when the study trains that precision",
    )
    weights: dict[str, Path] = Field(
        default_factory=dict,
        description="fp32 weights per model from a local file (safetensors or a .pt state "
        "dict), e.g. {'timm:resnet18': w.safetensors}: that model is loaded, not trained",
    )
    onnx_models: list[OnnxModelSettings] = Field(
        default_factory=list,
        description="users' ONNX files evaluated as targets (named <name>/onnx)",
    )
    controls: bool = Field(
        True,
        description="add, per architecture and QAT schedule, the fp32 model fine-tuned on that "
        "schedule ('fp32-ft'), so differences to the quantized models are quantization's alone",
    )
    attacks: list[AttackSettings] = Field(
        default_factory=lambda: default_attacks(DEFAULT_PRECISIONS),
        min_length=1,
        validate_default=True,
        description="attacks of the grid, each crafted on its sources and scored on every "
        "target; default: universal, patch-pgd, pgd-linf and random",
    )
    defenses: list[DefenseSettings] = Field(
        default_factory=list,
        description="defences every model is also evaluated behind (opt-in; none by default)",
    )
    recipes: list[RecipeSettings] = Field(
        default_factory=list,
        description="quantization-aware training defences whose models join the grid at every "
        "precision (opt-in; none by default)",
    )
    patch_sizes: list[int] = Field(
        default_factory=lambda: [7],
        min_length=1,
        description="patch side lengths in pixels; each patch attack runs at every size "
        "(the analyses but the size curve use the first)",
    )
    seeds: list[Seed] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="attack seeds: each cell is crafted once per seed on the same images",
    )
    replicates: int = Field(
        1,
        ge=1,
        le=MAX_REPLICATES,
        description="trained replicates: every model of the study (fp32, each precision, "
        "controls, recipes) is trained this many times from independent seeds, QAT replicate "
        "k from fp32 replicate k, and every cell runs on each; intervals then cover the "
        "trained model as well as the images",
    )
    n_eval: int = Field(500, ge=1, description="test images every patch is evaluated on")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=3, lr=0.05),
        description="fp32 training schedule of every architecture (see train_overrides)",
    )
    train_overrides: dict[str, TrainConfig] = Field(
        default_factory=dict, description="training settings per architecture, replacing `train`"
    )
    qat: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=1, lr=0.01),
        description="QAT schedule of every QAT precision and of its fp32-ft control "
        "(see qat_overrides)",
    )
    qat_overrides: dict[Precision, TrainConfig] = Field(
        # 2-bit needs a longer, hotter QAT: resnet20 on mnist5k reaches 26 % after 1 epoch at
        # lr 0.01 and 96 % after 3 epochs at lr 0.05 (MSE calibration)
        default_factory=lambda: {QuantSpec.parse("w2a2"): TrainConfig(epochs=3, lr=0.05)},
        description="QAT settings per precision name (e.g. w2a2), replacing `qat`",
    )
    calibration: str = Field("mse", description="a registered calibration method")
    first_last_bits: int | None = Field(
        8,
        ge=1,
        le=8,
        description="bits (1-8) of the first and last quantized layers (stem, classifier); "
        "null: the precision's own",
    )
    analyses: AnalysisSettings = Field(
        default_factory=AnalysisSettings,
        description='the "why" analyses, driven by the study\'s first universal attack',
    )
    device: str = Field(
        "auto", description="torch device: auto (CUDA, then MPS, then CPU), cpu, cuda[:N], mps"
    )
    cache_dir: Path = Field(
        Path("runs/.cache"),
        description="content-keyed cache of models, patches, ONNX files and deployment checks "
        "(in a study file: a relative path inside the working folder)",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="where models and cells run: this process, or the tasks of a Ray cluster "
        "(cache_dir and the run folder must then be on a filesystem every node shares)",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'HOST:PORT'); default: start a local one"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_attacks_for_precisions(cls, data: Any) -> Any:
        """Left out, ``attacks`` are the defaults, crafted on this study's precisions."""
        if isinstance(data, dict) and "attacks" not in data and "precisions" in data:
            try:
                precisions = [_as_spec(p) for p in data["precisions"]]
            except (ConfigError, TypeError, ValueError):
                return data  # the precisions' own validation reports it
            data = {**data, "attacks": default_attacks(precisions)}
        return data

    @field_validator("patch_sizes")
    @classmethod
    def _positive_sizes(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError("patch sizes are side lengths in pixels and must be >= 1")
        return _distinct(values, "patch size")

    @field_validator("calibration")
    @classmethod
    def _known_calibration(cls, value: str) -> str:
        CALIBRATIONS.get(value)
        return value

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, values: list[str]) -> list[str]:
        return _distinct(values, "model")

    @field_validator("onnx_models")
    @classmethod
    def _distinct_onnx(cls, values: list[OnnxModelSettings]) -> list[OnnxModelSettings]:
        _distinct([v.name for v in values], "onnx model name")
        return values

    @field_validator("precisions")
    @classmethod
    def _distinct_precisions(cls, values: list[QuantSpec]) -> list[QuantSpec]:
        return _distinct(values, "precision")

    @field_validator("deployments")
    @classmethod
    def _known_deployments(cls, values: list[str]) -> list[str]:
        for name in values:
            DEPLOYMENTS.get(name)
        return _distinct(values, "deployment")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, values: list[int]) -> list[int]:
        return _distinct(values, "seed")

    @field_validator("attacks", "defenses", "recipes")
    @classmethod
    def _labelled(cls, values: list[Labelled], info: ValidationInfo) -> list[Labelled]:
        labelled = _unique_labels(values)
        _distinct([entry.label for entry in labelled], f"{info.field_name[:-1]} (label)")
        return labelled

    @model_validator(mode="after")
    def _recipes_fit_the_grid(self) -> StudyConfig:
        """A recipe trains quantized precisions next to fp32, and its models' names must not
        be any other model's (a control's 'fp32-ft', a precision named like one)."""
        if self.recipes and all(p.is_float for p in self.precisions):
            raise ValueError("recipes train quantized precisions; the study has none")
        taken = {p.name for p in self.precisions} | {"fp32"}
        clashes = [n for n in self.recipe_precisions if n in taken or is_reserved(n)]
        if clashes or len(set(self.recipe_precisions)) != len(self.recipe_precisions):
            raise ValueError(f"recipe labels give model names already taken: "
                             f"{', '.join(clashes) or 'two recipes alike'}; choose another label")  # fmt: skip
        return self

    @property
    def recipe_precisions(self) -> list[str]:
        """The precision labels the recipes' models get ('w2a2-patch-at', 'random-...')."""
        names = [FP32, *(p.name for p in self.precisions if not p.is_float)]
        labels = []
        for recipe in self.recipes:
            labels += [tagged(name, recipe.label) for name in names]
            if RECIPES.get(recipe.name).random_inference:
                labels.append(random_precision(recipe.label))
        return labels

    def recipe_schedule(self, recipe: RecipeSettings) -> TrainConfig:
        """A recipe's schedule: its own, else the lowest precision's plain QAT schedule."""
        if recipe.qat is not None:
            return recipe.qat
        return self.qat_config_for(self.lowest_precision)

    @property
    def lowest_precision(self) -> QuantSpec:
        """The quantized precision with the fewest bits (fp32 when there is none)."""
        return lowest_precision(self.precisions)

    @property
    def deployed_precisions(self) -> list[str]:
        """The deployments that join this study: each one whose source it trains."""
        return [name for name in self.deployments
                if DEPLOYMENTS.get(name).source in (None, *self.precisions)]  # fmt: skip

    @model_validator(mode="after")
    def _known_sources(self) -> StudyConfig:
        """Sources name models of the study; deployed runtimes and users' ONNX files give only
        their outputs, so only query attacks may be crafted on them."""
        known = {p.name for p in self.precisions} | {FP32, INDEPENDENT_FP32}
        known |= set(self.recipe_precisions)
        deployed = set(self.deployed_precisions) | ({USER_ONNX} if self.onnx_models else set())
        for attack in self.attacks:
            queries_only = attack.name in ATTACKS and not ATTACKS.get(attack.name).needs_gradients
            allowed = known | deployed if queries_only else known
            unknown = [s for s in attack.sources or [] if s not in allowed and not is_control(s)]
            if unknown:
                hint = (" (runtime targets only take query attacks such as sparse-rs)"
                        if set(unknown) & deployed else "")  # fmt: skip
                raise ValueError(
                    f"attack '{attack.label}' sources name {', '.join(unknown)}, not a source "
                    f"of the study ({', '.join(sorted(allowed))}){hint}"
                )
        return self

    @model_validator(mode="after")
    def _known_keys(self) -> StudyConfig:
        """Override tables and analysis lists may only name what the study has (a typo
        would otherwise be ignored silently)."""
        checks = (
            ("train_overrides", list(self.train_overrides), self.models),
            ("qat_overrides", [s.name for s in self.qat_overrides], [p.name for p in self.precisions]),
            ("analyses.models", self.analyses.models or [], self.models),
            ("weights", list(self.weights), self.models),
        )  # fmt: skip
        for where, names, known in checks:
            if where.partition(".")[0] not in self.model_fields_set:
                continue  # defaults may name what this study leaves out
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"{where} names {', '.join(unknown)}, not in the study ({', '.join(known)})"
                )
        return self

    @property
    def independent_source(self) -> bool:
        """Whether an attack is crafted on the independent fp32 model ('fp32-indep')."""
        return any(INDEPENDENT_FP32 in (attack.sources or []) for attack in self.attacks)

    def train_config_for(self, arch: str) -> TrainConfig:
        return self.train_overrides.get(arch, self.train)

    @property
    def lens_models(self) -> list[str]:
        """Architectures of the costly lenses."""
        return self.analyses.models if self.analyses.models is not None else self.models[:1]

    def qat_config_for(self, spec: QuantSpec) -> TrainConfig:
        return self.qat_overrides.get(spec, self.qat)

    def fingerprint(self) -> tuple[str, dict[str, Any]]:
        """(key, settings) of everything that changes a number: what a run folder belongs to.
        Where and how fast it runs (device, cache, executor) is left out."""
        settings = self.model_dump(mode="json", exclude=set(RUN_ONLY))
        return content_key(settings), settings


RUN_ONLY = ("device", "cache_dir", "executor", "ray_address")
"""Settings that change where and how fast a study runs, never its numbers."""


class Shortcuts(_Strict):
    """Command-line shortcuts that change many settings at once (``None``: leave as set).

    ``epochs``: fp32 training epochs of every architecture; ``qat_epochs``: QAT epochs of
    every precision and of every recipe's own ``qat``; ``steps``: the step budget of every attack that takes one;
    ``analyses``: the "why" analyses that run (``[]``: none, ``["all"]``: every one), the
    others switched off. ``quick``: a smoke run of the whole pipeline (1 replicate, 100
    images, 1 epoch, 10 steps, no analyses) whose figures are not findings; the other
    shortcuts, when given, win over it."""

    epochs: int | None = Field(None, ge=0)
    qat_epochs: int | None = Field(None, ge=0)
    steps: int | None = Field(None, ge=1)
    analyses: list[str] | None = None
    quick: bool = False

    @classmethod
    def of(cls, **values: Any) -> Shortcuts:
        """Validated shortcuts; a bad one is a ``ConfigError`` in one line, like a study's."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from None

    @field_validator("analyses")
    @classmethod
    def _known_analyses(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        names = [n.replace("-", "_") for n in names]
        if names == ["none"]:
            return []
        if names == ["all"]:
            return list(ANALYSIS_SWITCHES)
        unknown = sorted(set(names) - set(ANALYSIS_SWITCHES))
        if unknown:
            raise ValueError(f"unknown analysis {', '.join(unknown)}; known: none, all, "
                             f"{', '.join(ANALYSIS_SWITCHES)}")  # fmt: skip
        return names

    def apply(self, data: dict[str, Any], keep: set[str] = frozenset()) -> dict[str, Any]:
        """``data`` (a study mapping, before validation) with the shortcuts applied; the
        settings named in ``keep`` (given explicitly) are left as they are."""
        if self.quick:
            n_eval = data.get("n_eval")
            n_eval = min(n_eval, 100) if isinstance(n_eval, int) else 100
            quick = {"replicates": 1, "n_eval": n_eval}
            data = {**data, **{k: v for k, v in quick.items() if k not in keep}}
        epochs, qat_epochs = _quick(self.epochs, self), _quick(self.qat_epochs, self)
        steps = self.steps if self.steps is not None else (10 if self.quick else None)
        analyses = self.analyses if self.analyses is not None else ([] if self.quick else None)
        if epochs is not None:
            data = _with_epochs(data, "train", "train_overrides", epochs)
        if qat_epochs is not None:
            data = _with_epochs(data, "qat", "qat_overrides", qat_epochs)
            data = _with_recipe_epochs(data, qat_epochs)
        if steps is not None:
            data = {**data, "attacks": [_with_steps(a, steps) for a in _attacks(data)]}
        if analyses is not None:
            switches = {name: name in analyses for name in ANALYSIS_SWITCHES}
            data = {**data, "analyses": {**_as_dict(data.get("analyses")), **switches}}
        return data


ANALYSIS_SWITCHES = ("gradient_alignment", "features", "spatial", "size_curve", "quant_strength")
"""The booleans of ``AnalysisSettings``, one per "why" analysis."""


def _quick(value: int | None, shortcuts: Shortcuts) -> int | None:
    return value if value is not None else (1 if shortcuts.quick else None)


def _as_dict(value: Any) -> dict[str, Any]:
    """A settings object or mapping as a plain mapping (anything else is left to validation)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    return dict(value) if isinstance(value, dict) else {}


def _with_epochs(data: dict[str, Any], field: str, overrides: str, epochs: int) -> dict[str, Any]:
    """``epochs`` for the schedule ``field`` and every entry of its per-name ``overrides``
    (their defaults included: a 2-bit QAT keeps its own learning rate)."""
    base = data.get(field, StudyConfig.model_fields[field].default_factory())
    given = overrides in data
    per_name = data.get(overrides, StudyConfig.model_fields[overrides].default_factory())
    if not isinstance(per_name, dict):
        return data  # validation reports it
    changed = {str(getattr(k, "name", k)): {**_as_dict(v), "epochs": epochs}
               for k, v in per_name.items()}  # fmt: skip
    if not given:  # a default entry joins only where the study has its name (w2a2's QAT)
        known = _names(data, "models" if field == "train" else "precisions")
        changed = {k: v for k, v in changed.items() if k in known}
    data = {**data, field: {**_as_dict(base), "epochs": epochs}}
    return {**data, overrides: changed} if changed or given else data


def _names(data: dict[str, Any], field: str) -> set[str]:
    """The model or precision names a study mapping lists (its defaults where unset)."""
    values = data.get(field, StudyConfig.model_fields[field].default_factory())
    values = values if isinstance(values, list) else []
    return {str(getattr(v, "name", v)) for v in values}


def _with_recipe_epochs(data: dict[str, Any], epochs: int) -> dict[str, Any]:
    """``epochs`` in every recipe's own ``qat`` schedule (the others follow the study's)."""
    recipes = data.get("recipes")
    if not isinstance(recipes, list):
        return data
    changed = []
    for recipe in recipes:
        recipe = _as_dict(recipe) or recipe
        if isinstance(recipe, dict) and recipe.get("qat") is not None:
            recipe = {**recipe, "qat": {**_as_dict(recipe["qat"]), "epochs": epochs}}
        changed.append(recipe)
    return {**data, "recipes": changed}


def _attacks(data: dict[str, Any]) -> list[Any]:
    if "attacks" in data:
        return list(data["attacks"]) if isinstance(data["attacks"], list) else []
    precisions = [_as_spec(p) for p in data.get("precisions", DEFAULT_PRECISIONS)]
    return [a.model_dump(exclude_defaults=True) for a in default_attacks(precisions)]


def _with_steps(attack: Any, steps: int) -> Any:
    """``attack`` with ``steps`` where its attack spends a step budget: gradient steps, or
    sparse-rs-universal's passes (a random patch takes none; sparse-rs counts queries)."""
    attack = _as_dict(attack) or attack
    if not isinstance(attack, dict) or attack.get("name") not in ATTACKS:
        return attack  # validation reports it
    if not getattr(ATTACKS.get(attack["name"]), "default_steps", 0):
        return attack
    return {**attack, "params": {**attack.get("params", {}), "steps": steps}}


def load_study(
    path: str | Path | None = None, *, shortcuts: Shortcuts | None = None, **overrides: Any
) -> StudyConfig:
    """Read a study YAML (or the defaults), apply the CLI overrides (``None`` means unset),
    then the ``shortcuts`` (an explicit ``--n-eval`` or ``--replicates`` wins over
    ``--quick``).

    The file is read within limits (``quantpatch._yaml``). A study file is often shared, so
    where it may write is bounded: its ``cache_dir`` must be a relative path inside the working
    folder (give ``--cache-dir`` to put the cache elsewhere); its ``data_root`` is only read."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml_mapping(path)
        _check_cache_dir(data.get("cache_dir"), path)
    explicit = {k: v for k, v in overrides.items() if v is not None}
    data.update(explicit)
    try:
        if shortcuts is not None:  # an explicit --n-eval or --replicates wins over --quick
            data = shortcuts.apply(data, keep=set(explicit))
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _check_cache_dir(value: Any, source: str | Path) -> None:
    if value is None:
        return
    cache = Path(str(value))
    if cache.is_absolute() or ".." in cache.parts or str(value).startswith("~"):
        raise ConfigError(
            f"{source}: cache_dir {value!r} must be a relative path inside the working folder "
            "(a study file may not write elsewhere; pass --cache-dir to choose another place)"
        )


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "study"
        parts.append(f"{where}: {err['msg']}")
    return "invalid study config: " + "; ".join(parts)

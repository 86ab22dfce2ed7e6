"""The study description: one validated pydantic model, loadable from YAML.

Everything that changes a number in the results lives here, so a config plus the package
version fully determines a run (and the cache keys derived from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from quantpatch.errors import ConfigError, DataNotFoundError
from quantpatch.models import TrainConfig
from quantpatch.quant import QuantSpec

ORT_INT8 = "ort-int8"


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
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttackSettings(_Strict):
    """One attack of the grid; ``params`` go to the attack's constructor."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        targeted = self.params.get("targeted")
        mode = self.params.get("mode")
        suffix = "".join(f"-{v}" for v in (mode,) if v)
        return f"{self.name}{suffix}{'-targeted' if targeted else ''}"


class AnalysisSettings(_Strict):
    """Which "why" analyses run; each is cheap next to training and can be switched off."""

    gradient_alignment: bool = True
    features: bool = True
    spatial: bool = True
    spatial_stride: int = Field(2, ge=1)
    size_curve: bool = True
    size_fractions: list[float] = Field(default_factory=lambda: [0.02, 0.04, 0.06, 0.10, 0.16])
    quant_strength: bool = True
    strength_bits: list[int] = Field(default_factory=lambda: [2, 4, 8])
    models: list[str] = Field(
        default_factory=lambda: ["lenet"],
        description="architectures for the costly lenses (size curve, quantization strength)",
    )
    n_images: int = Field(256, ge=8, description="images used by the gradient/feature analyses")
    spatial_images: int = Field(64, ge=8, description="images per location in spatial maps")


class StudyConfig(_Strict):
    """A full study: dataset x models x precisions x attacks x patch sizes x seeds."""

    name: str = "demo"
    dataset: str = "mnist5k"
    data_root: Path | None = None
    download: bool = False
    limit: int | None = Field(None, ge=1)
    models: list[str] = Field(default_factory=lambda: ["lenet", "resnet20"], min_length=1)
    precisions: list[Precision] = Field(
        default_factory=lambda: [QuantSpec.parse(p) for p in ("fp32", "w8a8", "w4a4", "w2a2")],
        min_length=1,
    )
    ort_int8: bool = True
    attacks: list[AttackSettings] = Field(
        default_factory=lambda: [
            AttackSettings(name="universal", params={"steps": 100, "batch_size": 64}),
            AttackSettings(name="random"),
        ]
    )
    patch_sizes: list[int] = Field(default_factory=lambda: [7], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    n_eval: int = Field(500, ge=1, description="test images every patch is evaluated on")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, lr=0.05))
    train_overrides: dict[str, TrainConfig] = Field(default_factory=dict)
    qat: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, lr=0.01))
    qat_overrides: dict[Precision, TrainConfig] = Field(
        # 2-bit needs a longer, hotter QAT: resnet20 on mnist5k reaches 26 % after 1 epoch at
        # lr 0.01 and 96 % after 3 epochs at lr 0.05 (MSE calibration)
        default_factory=lambda: {QuantSpec.parse("w2a2"): TrainConfig(epochs=3, lr=0.05)},
        description="QAT settings per precision name (e.g. w2a2), replacing `qat`",
    )
    calibration: Literal["minmax", "percentile", "mse"] = "mse"
    first_last_bits: int | None = Field(8, ge=1, le=8)
    analyses: AnalysisSettings = Field(default_factory=AnalysisSettings)
    device: str = "auto"
    cache_dir: Path = Path("runs/.cache")

    @field_validator("patch_sizes")
    @classmethod
    def _positive_sizes(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError("patch sizes are side lengths in pixels and must be >= 1")
        return values

    def train_config_for(self, arch: str) -> TrainConfig:
        return self.train_overrides.get(arch, self.train)

    def qat_config_for(self, spec: QuantSpec) -> TrainConfig:
        return self.qat_overrides.get(spec, self.qat)


def load_study(path: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """Read a study YAML (or the defaults) and apply CLI overrides (``None`` means unset)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"study file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a study file must be a mapping of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "study"
        parts.append(f"{where}: {err['msg']}")
    return "invalid study config: " + "; ".join(parts)

"""The results schema as pydantic models: documents results.json and validates it on read.

``quantpatch schema results`` prints it as JSON Schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RateFields(BaseModel):
    """A rate with its evidence: successes out of n and the 95 % Wilson interval."""

    successes: int = Field(ge=0)
    n: int = Field(ge=0)
    rate: float
    ci_low: float
    ci_high: float


class ModelRecord(BaseModel):
    """One evaluated model (a target): clean accuracy on the evaluation images."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="'<arch>/<precision>', e.g. 'lenet/w4a4' or 'lenet/ort-int8'")
    arch: str
    precision: str
    key: str = Field(description="content key of the cached artifact")
    clean: RateFields
    deployment: dict[str, Any] | None = Field(
        None, description="ORT int8 only: agreement with simulated w8a8 and speed vs ORT fp32"
    )


class CellRecord(RateFields):
    """One (source, attack, patch size, seed) cell evaluated on one target model.

    Untargeted ASR counts only images the target classifies correctly when clean; targeted ASR
    only images whose true class is not the target."""

    model_config = ConfigDict(extra="allow")
    study: str
    dataset: str
    cell: str
    source: str = Field(description="model the attack was crafted on ('none' for random)")
    target: str
    white_box: bool
    attack: str
    attack_name: str
    attack_kind: str = Field(description="'patch' or 'pixel'")
    targeted: bool
    target_class: int | None
    patch_size: int | None = Field(description="patch side in pixels (None for pixel attacks)")
    patch_area: float | None
    seed: int
    target_clean_accuracy: float
    timings: dict[str, float]


class ResultsFile(BaseModel):
    """The whole of results.json."""

    model_config = ConfigDict(extra="allow")
    study: str
    dataset: str
    config: dict[str, Any]
    versions: dict[str, str]
    device: str
    models: list[ModelRecord]
    cells: list[CellRecord]
    analyses: dict[str, Any] = Field(
        default_factory=dict,
        description="sensitivity, size curve, gradient alignment, features, quantization strength",
    )

"""Checks that fail a study in seconds, before any file is written or any model trained."""

from __future__ import annotations

from quantpatch._runtime import resolve_device
from quantpatch.attacks import ATTACKS
from quantpatch.data import Dataset
from quantpatch.deployments import create_deployment
from quantpatch.errors import ConfigError, DataNotFoundError, PatchTooLargeError
from quantpatch.models import check_model_name, create_model
from quantpatch.quant import FP32
from quantpatch.quant.switchable import SwitchablePrecision
from quantpatch.study.settings.config import DefenseSettings, StudyConfig
from quantpatch.study.zoo.targets import check_onnx_model


def validate_study(config: StudyConfig) -> None:
    """Names, every attack parameter (by building each attack once per patch size), every
    defence parameter (by building each defence) and the device; raises the specific ``QuantpatchError`` naming what is wrong."""
    for arch in config.models:
        check_model_name(arch)
    files = [("weights", path) for path in config.weights.values()]
    files += [("onnx model", m.path) for m in config.onnx_models]
    for what, path in files:
        if not path.is_file():
            raise DataNotFoundError(f"{what} file not found: {path}")
    for settings in config.attacks:
        cls = ATTACKS.get(settings.name)
        for size in config.patch_sizes if cls.kind == "patch" else [None]:
            settings.create(size, config.seeds[0], progress=False)
    for entry in (*config.defenses, *config.recipes):
        entry.create()
    for settings in config.defenses:
        _check_certified_settings(settings)
    for name in config.deployed_precisions:
        create_deployment(name)  # a runtime that is not installed is refused here
    resolve_device(config.device)


def _check_certified_settings(settings: DefenseSettings) -> None:
    """``certifiable`` and ``certify_sizes`` only where the defence supports them."""
    defense = settings.create()
    if settings.certifiable and not hasattr(defense, "train_transform"):
        raise ConfigError(
            f"defense '{settings.label}': certifiable training needs a certified defence "
            f"(derandomized-smoothing, patchcleanser); {settings.name} has none"
        )
    if settings.train is not None and not settings.certifiable:
        raise ConfigError(
            f"defense '{settings.label}': train is the schedule of certifiable models; set "
            "certifiable: true or leave train out"
        )
    if settings.certify_sizes and not hasattr(defense, "certify_sizes"):
        raise ConfigError(
            f"defense '{settings.label}': certify_sizes needs a defence that certifies every "
            f"patch side from one vote (derandomized-smoothing); {settings.name} certifies "
            "its own patch_size only"
        )


def validate_against_data(config: StudyConfig, dataset: Dataset) -> None:
    """What needs the data: enough images, evaluation size, patch sizes and target classes."""
    if len(dataset.train) < 2 or len(dataset.test) < 1:
        raise ConfigError(
            f"{dataset.name} has {len(dataset.train)} training and {len(dataset.test)} test "
            "images; a study needs at least 2 and 1"
        )
    if "n_eval" in config.model_fields_set and config.n_eval > len(dataset.test):
        raise ConfigError(
            f"n_eval {config.n_eval} is more than the {len(dataset.test)} test images of "
            f"{dataset.name}"
        )
    side = min(dataset.train.images.shape[-2:])
    too_big = [p for p in config.patch_sizes if p > side]
    if too_big:
        raise PatchTooLargeError(
            f"patch size {too_big[0]} px is larger than the {side} px images of {dataset.name}"
        )
    _check_user_models(config, dataset)
    _check_recipes(config, dataset)
    image_hw = tuple(dataset.train.images.shape[-2:])
    for defense in config.defenses:
        created = defense.create()
        try:
            created.check_image_size(image_hw)
            for size in defense.certify_sizes:
                created.check_patch_size(size, image_hw)
        except (PatchTooLargeError, ConfigError) as exc:
            raise type(exc)(f"defense '{defense.label}': {exc}") from None
    for settings in config.attacks:
        target_class = settings.params.get("target_class")
        if isinstance(target_class, int) and target_class >= dataset.num_classes:
            raise ConfigError(
                f"attack '{settings.label}': target_class {target_class} but {dataset.name} has "
                f"{dataset.num_classes} classes"
            )


def _check_user_models(config: StudyConfig, dataset: Dataset) -> None:
    """Users' weights load into their architecture for this dataset, and users' ONNX files
    take its images and give one logit per class (both cheap next to training)."""
    for arch, path in config.weights.items():
        create_model(arch, in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                     image_size=dataset.image_size, weights=path)  # fmt: skip
    for settings in config.onnx_models:
        check_onnx_model(settings, dataset.test.images[:2], dataset.num_classes)


def _check_recipes(config: StudyConfig, dataset: Dataset) -> None:
    """Training defences share weights across precisions: every architecture must allow it,
    and a recipe's patch must fit the images."""
    if not config.recipes:
        return
    specs = [FP32, *(p for p in config.precisions if not p.is_float)]
    for arch in config.models:
        model = create_model(arch, in_channels=dataset.in_channels,
                             num_classes=dataset.num_classes, image_size=dataset.image_size)  # fmt: skip
        try:
            SwitchablePrecision.from_float(model, specs, first_last_bits=config.first_last_bits)
        except ConfigError as exc:
            raise ConfigError(f"recipes: {arch}: {exc}") from None
    side = min(dataset.train.images.shape[-2:])
    for recipe in config.recipes:
        size = recipe.params.get("patch_size")
        if isinstance(size, int) and size > side:
            raise PatchTooLargeError(
                f"recipe '{recipe.label}': patch size {size} px is larger than the {side} px "
                f"images of {dataset.name}"
            )

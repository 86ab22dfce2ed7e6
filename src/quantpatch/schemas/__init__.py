"""The JSON Schemas of study configs and results, shipped with the package.

``quantpatch schema`` prints the shipped file, so it answers without importing torch (the
config's validators reach the registries, and they import it). The files are generated from
``StudyConfig`` and ``results_schema``; ``python -m quantpatch.schemas`` rewrites them, and a
test fails when they fall behind the code.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Literal

from quantpatch.errors import CorruptFileError

Kind = Literal["study", "results"]
KINDS: tuple[Kind, ...] = ("study", "results")


def shipped(kind: Kind) -> dict[str, Any]:
    """The schema as shipped with this version (no torch)."""
    text = resources.files(__name__).joinpath(f"{kind}.schema.json").read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"the shipped {kind} schema is not JSON: {exc}") from exc


def generate(kind: Kind) -> dict[str, Any]:
    """The schema the code defines now (imports the study and results models)."""
    if kind == "study":
        from quantpatch.study import StudyConfig

        return StudyConfig.model_json_schema()
    from quantpatch.results import results_schema

    return results_schema()

"""The dataset registry (kept in its own module so loaders can import it without cycles)."""

from __future__ import annotations

from quantpatch._registry import Registry

DATASETS: Registry = Registry("dataset")

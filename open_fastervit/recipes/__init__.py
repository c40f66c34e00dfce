"""Training recipes: one YAML file per published FasterViT run, keys named as ``TrainConfig`` fields.

A recipe may name a ``base`` recipe whose keys it extends (``_in1k_base`` holds what all ImageNet-1K
runs share). Names starting with ``_`` are bases, not listed as runnable recipes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["list_recipes", "load_recipe", "recipe_task"]

RECIPE_DIR = Path(__file__).resolve().parent
MAX_DEPTH = 8


def recipe_task(name_or_path: str) -> str:
    """The task a recipe is for: its ``task`` key (``detection``, ``segmentation``), else ``classification``."""
    settings = yaml.safe_load(_recipe_path(name_or_path).read_text()) or {}
    return str(settings.get("task", "classification")) if isinstance(settings, dict) else "classification"


def list_recipes(task: str = "classification") -> list[str]:
    """Names of the runnable recipes shipped with the package for ``task``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")
                  if not p.stem.startswith("_") and recipe_task(str(p)) == task)


def _recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"unknown recipe {name_or_path!r}: not a YAML file; known recipes {list_recipes()}")


def load_recipe(name_or_path: str, _depth: int = 0) -> dict[str, Any]:
    """Settings of a shipped recipe (by name) or a YAML file, with its ``base`` chain resolved."""
    if _depth > MAX_DEPTH:
        raise ValueError(f"recipe {name_or_path!r}: 'base' chain deeper than {MAX_DEPTH} (a cycle?)")
    path = _recipe_path(name_or_path)
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"recipe {path} must be a mapping of TrainConfig fields, got {type(settings).__name__}")
    settings.pop("task", None)
    base = settings.pop("base", None)
    if base is None:
        return settings
    parent = RECIPE_DIR / f"{base}.yaml" if not Path(base).suffix else path.parent / base
    return {**load_recipe(str(parent), _depth + 1), **settings}

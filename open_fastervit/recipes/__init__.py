"""Training recipes: one YAML file per published FasterViT run, keys named as ``TrainConfig`` fields.

A recipe may name a ``base`` recipe whose keys it extends (``_in1k_base`` holds what all ImageNet-1K
runs share). Names starting with ``_`` are bases, not listed as runnable recipes.

A recipe is an optimisation schedule (model, optimizer, lr, epochs, augmentation), never a description of a dataset:
where the data is, its splits, its class count and label conventions (``DATASET_KEYS``) come from the data itself
or from the command line, so a recipe of one dataset trains correctly on another. A recipe file that sets one of
them is refused with the options to use instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["DATASET_KEYS", "list_recipes", "load_recipe", "recipe_task"]

RECIPE_DIR = Path(__file__).resolve().parent
MAX_DEPTH = 8
#: Settings that describe a dataset, not a schedule (config field -> what to pass instead): a recipe never sets them.
DATASET_KEYS: dict[str, str] = {
    "data": "--data",
    "data_dir": "--data-dir",
    "train_split": "--train-split",
    "val_split": "--val-split",
    "images": "--images",
    "masks": "--masks",
    "train_ann": "--train-ann",
    "val_ann": "--val-ann",
    "num_classes": "--num-classes (default: inferred from the train split)",
    "reduce_zero_label": "--reduce-zero-label (ADE20K)",
    "ignore_index": "--ignore-index",
    "class_names": "a classes.txt beside the data (segmentation) or the COCO json's categories (detection)",
    "category_ids": "the COCO json's categories",
}


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
    """Settings of a shipped recipe (by name) or a YAML file, with its ``base`` chain resolved.

    Raises:
        FileNotFoundError: no such recipe. ValueError: not a mapping, a ``base`` cycle, or a file that sets one of
            the ``DATASET_KEYS`` (the message names the options to pass instead).
    """
    if _depth > MAX_DEPTH:
        raise ValueError(f"recipe {name_or_path!r}: 'base' chain deeper than {MAX_DEPTH} (a cycle?)")
    path = _recipe_path(name_or_path)
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"recipe {path} must be a mapping of TrainConfig fields, got {type(settings).__name__}")
    dataset_keys = [key for key in settings if key in DATASET_KEYS]
    if dataset_keys:
        instead = "; ".join(f"{key}: {DATASET_KEYS[key]}" for key in dataset_keys)
        raise ValueError(f"recipe {path} sets dataset keys {dataset_keys}: a recipe is the optimisation schedule, "
                         f"the dataset's settings come from the data or the command line ({instead})")
    settings.pop("task", None)
    base = settings.pop("base", None)
    if base is None:
        return settings
    parent = RECIPE_DIR / f"{base}.yaml" if not Path(base).suffix else path.parent / base
    return {**load_recipe(str(parent), _depth + 1), **settings}

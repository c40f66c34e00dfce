"""``fastervit train``: options generated from ``open_fastervit.train.TrainConfig``, over ``train()``.

Runs under ``torchrun`` as one DDP rank per process (``torchrun --nproc-per-node N -m open_fastervit.cli train ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from open_fastervit.cli._common import AMP_CHOICES, amp_word
from open_fastervit.data import DatasetError
from open_fastervit.recipes import list_recipes, load_recipe, recipe_task
from open_fastervit.train import TrainConfig, TrainingDiverged, train

__all__ = ["build_parser", "config_from_args", "main"]


def _arg_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` and extra kwargs for a TrainConfig annotation."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if base is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if base is dict:
        return json.loads, {"metavar": "JSON"}
    if base is list:
        return float, {"nargs": "+"}
    if optional:
        return (lambda text: None if text.lower() == "none" else base(text)), {"metavar": base.__name__.upper()}
    return base, {}


#: Fields whose option takes a value of the shared vocabulary instead of their annotation's type.
_FIELD_TYPES: dict[str, tuple[Any, dict[str, Any]]] = {
    "amp": (amp_word, {"metavar": "{" + ",".join(AMP_CHOICES) + "}"}),
}


DESCRIPTION = ("Train or fine-tune FasterViT with the published recipe (DDP under torchrun). "
               "Options override the recipe, which overrides the defaults. Example: fastervit train --recipe "
               "fastervit_0_in1k --data /data/imagenet --batch-size 128; fine-tune: fastervit train --data PATH "
               "--official-checkpoint fastervit_0_224_1k.pth.tar --lr 1e-4 --layer-decay 0.8 --epochs 30.")


def build_parser(config_cls: type = TrainConfig, prog: str = "fastervit train",
                 description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """A training parser: one option per field of ``config_cls`` (a ``RunConfig`` dataclass), plus ``--recipe``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    task = getattr(config_cls, "TASK", "classification")
    parser.add_argument("--recipe", default=None,
                        help=f"recipe name or YAML file; shipped: {', '.join(list_recipes(task))}")
    hints = typing.get_type_hints(config_cls)
    for item in dataclasses.fields(config_cls):
        kind, extra = _FIELD_TYPES.get(item.name) or _arg_type(hints[item.name])
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        options = {"type": kind} if kind is not None else {}
        text = item.metadata.get("help", "")
        text = text if "default" in text else f"{text} (default: {default})"
        text = text.replace("%", "%%")  # argparse formats help strings with %
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, default=argparse.SUPPRESS,
                            help=text, **options, **extra)
    return parser


def config_from_args(argv: list[str] | None = None, config_cls: type = TrainConfig,
                     parser: argparse.ArgumentParser | None = None) -> Any:
    """A config (default ``TrainConfig``) from defaults < recipe < command-line options.

    Raises:
        ValueError: a recipe with keys the config does not have.
        SystemExit: bad options (argparse).
    """
    args = vars((parser or build_parser(config_cls)).parse_args(argv))
    recipe = args.pop("recipe", None)
    settings = load_recipe(recipe) if recipe else {}
    task = getattr(config_cls, "TASK", "classification")
    if recipe and recipe_task(recipe) != task:
        raise ValueError(f"recipe {recipe!r} is a {recipe_task(recipe)} recipe; this command trains {task} "
                         f"(its recipes: {', '.join(list_recipes(task))})")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"recipe {recipe!r} has unknown keys {unknown}")
    if "amp" in settings:
        settings["amp"] = amp_word(str(settings["amp"]), "amp:")
    return config_cls(**{**settings, **args})


def main(argv: list[str] | None = None) -> int:
    """``fastervit train``: returns 0 on success, 1 with a one-line message on a data/argument/NaN error."""
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except (DatasetError, TrainingDiverged, ValueError, FileNotFoundError) as err:  # CheckpointError: ValueError
        print(f"fastervit train: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "final"}, indent=2))
    return 0

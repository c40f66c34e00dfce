"""``fastervit train``: options generated from ``open_fastervit.train.TrainConfig``, over ``train()``.

Runs under ``torchrun`` as one DDP rank per process (``torchrun --nproc-per-node N -m open_fastervit.cli train ...``).
``--resume RUN`` alone continues a run with its saved settings (options given override them); Ctrl-C ends with one
line saying how to continue, and exit status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from open_fastervit.cli._common import AMP_CHOICES, amp_word
from open_fastervit.data import DatasetError
from open_fastervit.recipes import list_recipes, load_recipe, recipe_task
from open_fastervit.tasks.classification import TrainConfig
from open_fastervit.train import TrainingDiverged, TrainingInterrupted, train
from open_fastervit.train.checkpoint import ResumeMismatchError, read_training_state

__all__ = ["build_parser", "config_from_args", "interrupted_exit", "main", "saved_settings"]

#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED_EXIT = 130
#: Exit status when ``--resume`` meets a checkpoint of another model than the one asked for (a usage error).
MISMATCH_EXIT = 2
#: Saved settings that are not carried over by ``--resume RUN`` (the run folder becomes the output).
NOT_RESUMED = ("resume", "overwrite", "output")


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
               "--official-checkpoint fastervit_0_224_1k.pth.tar --lr 1e-4 --layer-decay 0.8 --epochs 30; continue a "
               "stopped run with its saved settings: fastervit train --resume runs/train.")


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


def saved_settings(resume: str, config_cls: type = TrainConfig) -> tuple[dict[str, Any], Path, str]:
    """The settings a run was trained with, for ``--resume RESUME`` (a run folder or a checkpoint file in one):
    the folder's ``config.json`` (written at every start, auto settings resolved), else the ``config`` stored in
    the checkpoint. Returns ``(settings without NOT_RESUMED, run folder, where they were read)``.

    Raises:
        FileNotFoundError: ``resume`` does not exist.
        ValueError: no saved settings, or settings that ``config_cls`` does not have (a run of another task).
    """
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such run folder or checkpoint")
    folder = path if path.is_dir() else path.parent
    checkpoint = path / "last.pt" if path.is_dir() else path
    settings, source = None, folder / "config.json"
    if source.is_file():
        try:
            settings = json.loads(source.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--resume {resume}: cannot read {source} ({err})") from None
    else:
        settings, source = (read_training_state(checkpoint) or {}).get("config"), checkpoint
    if not isinstance(settings, dict):
        raise ValueError(f"--resume {resume}: no saved settings (config.json or a training checkpoint) in {folder}")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        task = getattr(config_cls, "TASK", "classification")
        raise ValueError(f"--resume {resume}: {source} has settings a {task} run does not have {unknown[:6]} "
                         "(a run of another task?)")
    return {k: v for k, v in settings.items() if k not in NOT_RESUMED}, folder, str(source)


def _resume_note(folder: Path, source: str, saved: dict[str, Any], merged: dict[str, Any]) -> str:
    """One line: the run resumed, where its settings came from and the ones changed here (old -> new)."""
    changed = [f"{k} {saved[k]!r} -> {merged[k]!r}" for k in saved if k in merged and merged[k] != saved[k]]
    overridden = f"; overridden: {', '.join(changed)}" if changed else "; nothing overridden"
    return f"resuming {folder} with its saved settings ({source}){overridden}"


def config_from_args(argv: list[str] | None = None, config_cls: type = TrainConfig,
                     parser: argparse.ArgumentParser | None = None) -> Any:
    """A config (default ``TrainConfig``) from defaults < the resumed run's saved settings (``--resume RUN``, see
    ``saved_settings``; the output becomes the run folder) < recipe < command-line options. With ``--resume``
    one line on stderr (rank 0) names the settings that differ from the saved ones.

    Raises:
        ValueError: a recipe with keys the config does not have; unusable saved settings.
        FileNotFoundError: a ``--resume`` path that does not exist.
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
    if not args.get("resume"):
        return config_cls(**{**settings, **args})
    saved, folder, source = saved_settings(args["resume"], config_cls)
    merged = {**saved, "output": str(folder), **settings, **args}
    if int(os.environ.get("RANK", "0")) == 0:
        print(_resume_note(folder, source, saved, merged), file=sys.stderr)
    return config_cls(**merged)


def interrupted_exit(err: KeyboardInterrupt, command: str = "fastervit train") -> int:
    """Ctrl-C during a training command: one line on stderr (rank 0), where training stopped, the last checkpoint
    and the ``--resume`` command that continues it (``TrainingInterrupted.hint``); returns ``INTERRUPTED_EXIT``."""
    if int(os.environ.get("RANK", "0")) == 0:
        hint = err.hint(command) if isinstance(err, TrainingInterrupted) else "interrupted"
        print(f"{command}: {hint}", file=sys.stderr)
    return INTERRUPTED_EXIT


def main(argv: list[str] | None = None) -> int:
    """``fastervit train``: returns 0 on success, 1 with a one-line message on a data/argument/NaN error or an
    output folder holding another run, 2 when ``--resume`` meets a checkpoint of another model, 130 with a
    one-line ``--resume`` hint on Ctrl-C."""
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except ResumeMismatchError as err:
        print(f"fastervit train: error: {err}", file=sys.stderr)
        return MISMATCH_EXIT
    except (DatasetError, TrainingDiverged, ValueError, FileNotFoundError) as err:  # CheckpointError, RunExistsError
        print(f"fastervit train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # TrainingInterrupted from the trainer, or Ctrl-C before it started
        return interrupted_exit(err)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "final"}, indent=2))
    return 0

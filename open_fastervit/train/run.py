"""A run's folder and how a run ends: refusing to overwrite another run, replacing one on request, and the
errors that stop training (a diverged loss, Ctrl-C) with what to do next.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .checkpoint import read_progress

__all__ = ["RUN_OUTPUTS", "RunExistsError", "TrainingDiverged", "TrainingInterrupted", "check_output",
           "remove_run_outputs"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class RunExistsError(ValueError):
    """The output folder already holds a training run (``last.pt``) and neither ``resume`` nor ``overwrite`` is set."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C / SIGINT (a ``KeyboardInterrupt``, so ``except KeyboardInterrupt`` still catches it),
    with where it stopped and the checkpoint to continue from.

    Attributes:
        output: the run folder (what ``--resume`` takes).
        epoch: 1-based epoch in progress; ``None`` when interrupted before training started.
        step: optimizer steps done in that epoch.
        steps_per_epoch: optimizer steps per epoch (``None`` when unknown).
        checkpoint: the last resumable checkpoint written (or resumed from), ``None`` when there is none.
    """

    def __init__(self, output: str, epoch: int | None, step: int, steps_per_epoch: int | None,
                 checkpoint: str | None) -> None:
        self.output, self.epoch, self.step = output, epoch, step
        self.steps_per_epoch, self.checkpoint = steps_per_epoch, checkpoint
        super().__init__(self.hint())

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:  # picklable despite the extra constructor arguments
        return type(self), (self.output, self.epoch, self.step, self.steps_per_epoch, self.checkpoint)

    def hint(self, command: str = "fastervit train") -> str:
        """One line: where training stopped, the last checkpoint and the command that continues the run."""
        if self.epoch is None:
            where = "interrupted before training started"
        else:
            of = f"/{self.steps_per_epoch}" if self.steps_per_epoch else ""
            where = f"interrupted at epoch {self.epoch}, step {self.step}{of}"
        if self.checkpoint is None:
            return f"{where}; no checkpoint written yet (nothing to resume): start the run again"
        in_output = Path(self.checkpoint) in (Path(self.output), Path(self.output) / "last.pt")
        # resumed from elsewhere and interrupted before the first checkpoint here: continue from that one
        target = self.output if in_output else f"{self.checkpoint} --output {self.output}"
        return f"{where}; last checkpoint: {self.checkpoint}; continue with: {command} --resume {target}"


#: What a training run writes into its output folder (files, and the TensorBoard folder ``tb``).
RUN_OUTPUTS = ("last.pt", "last.safetensors", "last_ema.safetensors", "best.safetensors", "results.json",
               "summary.csv", "curves.png", "config.json", "tb")


def remove_run_outputs(folder: Path) -> list[str]:
    """Delete the outputs of a run (:data:`RUN_OUTPUTS`) from ``folder``, nothing else; returns the names removed.
    Used by ``overwrite``, so that e.g. an old ``last_ema.safetensors`` or old TensorBoard events cannot pass for the
    new run's."""
    removed = []
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_output(cfg: Any) -> None:
    """Refuse to start a new run in a folder that holds another run's ``last.pt`` (it would be overwritten at the
    first checkpoint): allowed with ``resume`` continuing that very file or with ``overwrite``.

    Raises:
        RunExistsError: one line naming the run, the epoch its ``last.pt`` reached, ``--resume`` and ``--output``.
    """
    last = Path(cfg.output).expanduser() / "last.pt"
    if getattr(cfg, "overwrite", False) or not last.is_file():
        return
    if cfg.resume:
        source = Path(cfg.resume).expanduser()
        source = source / "last.pt" if source.is_dir() else source
        if source.exists() and source.resolve() == last.resolve():
            return
    progress = read_progress(last)
    if progress is None:
        reached = "unreadable"
    elif progress.get("step_in_epoch"):
        reached = f"from epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']}"
    else:
        reached = f"from epoch {progress.get('epoch', 0)}"
    run = cfg.output
    raise RunExistsError(f"{run} already holds a training run (last.pt {reached}): continue it with resume={run!r} "
                         f"(command line: --resume {run}), or choose another output (--output), or replace it with "
                         "overwrite=True (--overwrite)")

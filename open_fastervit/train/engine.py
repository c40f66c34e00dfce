"""The training engine: the loop every task shares (``Trainer``) and the entry points ``train`` / ``run_training``.

Built on timm (optimizers, schedulers, ``ModelEmaV3``, BatchNorm averaging) and torch (DDP, AMP, ``torch.compile``);
tqdm, TensorBoard and matplotlib report. What is trained comes from a task object
(``open_fastervit.train.task.Task``): the engine never names a loss, a dataset or a metric.

A run writes into ``output``: ``last.pt`` (resumable state, every epoch and every ``checkpoint_steps`` optimizer
steps, written atomically; a folder already holding one is refused unless ``resume`` continues it or
``overwrite`` is set), ``last.safetensors`` / ``last_ema.safetensors`` (weights), ``best.safetensors`` (the best
validation metric over epochs of the raw and the EMA weights, whichever scored higher; ``results.json`` says which
as ``best_weights``), ``summary.csv``, ``curves.png``, ``tb/`` (TensorBoard), ``config.json`` (the settings used,
auto ones resolved) and ``results.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..runtime import amp_dtype
from ..serialization import CheckpointError, check_fit, remove_stale_temporaries, save_weights
from .auto import cpu_threads, describe_auto_settings, resolve_schedule_settings
from .checkpoint import ResumeMismatchError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import RunConfig, absolute_paths
from .distributed import average_bn_stats, cleanup, init_distributed, rank_divergence, reduce_sums
from .loader import LoaderOptions, build_eval_loader, build_train_loader, shutdown_workers
from .optim import create_optimizer, create_schedule, effective_lr, global_batch
from .reporting import log, plot_curves, write_json, write_summary_csv
from .run import RUN_OUTPUTS, TrainingDiverged, TrainingInterrupted, check_output, remove_run_outputs
from .task import LoaderSpec, Task, task_for_config

__all__ = ["Progress", "Trainer", "run_training", "seed_everything", "train"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (every device) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Progress:
    """Position in training, saved in every checkpoint."""

    epoch: int = 0  # current (0-based) epoch
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    best_top1: float = -math.inf  # the selection score of best.safetensors (top-1 of the better weights)
    best_epoch: int = -1
    best_weights: str = ""  # "raw" or "ema": which weights best.safetensors holds
    best_raw_top1: float = math.nan  # raw and EMA top-1 of the best epoch
    best_ema_top1: float = math.nan
    loss_sum: float = 0.0  # running sums of the current epoch (for the CSV)
    loss_count: int = 0
    history: list = field(default_factory=list)  # one dict per epoch (summary.csv)
    curve: list = field(default_factory=list)  # [global_step, train loss, lr] every log_interval steps


class Trainer:
    """The training engine: one run of a :class:`~open_fastervit.train.task.Task`, built from a config, then
    ``fit()``.

    It owns what every task shares: the process group (DDP), AMP, the optimizer and lr schedule, gradient
    accumulation and clipping, the EMA of the weights, exact resume with atomic checkpoints, the stop on a NaN loss,
    the progress bar, TensorBoard, ``summary.csv``, ``curves.png`` and ``results.json``. What is trained, on which
    data, with which loss and metric, is the task's (composition: ``self.task``); the engine keeps no task state.
    """

    def __init__(self, task: Task) -> None:
        self.task, self.info, self.device = task, task.info, task.info.device
        self.cfg: RunConfig = task.cfg
        self.out = Path(self.cfg.output)
        check_output(self.cfg)
        if task.info.is_primary:  # temporary files of a write killed in an earlier start of this run
            for name in RUN_OUTPUTS:
                for tmp in remove_stale_temporaries(self.out / name):
                    log(self.info, f"removed {tmp.name}, left by an interrupted write of {name}")
        self.started = time.perf_counter()
        self.progress = Progress()
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # any NaN/inf loss unchecked
        self._setup_determinism()
        self._setup_data_and_model()
        self._setup_optimization()
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None  # the newest resumable state: written here, or resumed from
        if self.cfg.resume:
            self._resume(self.cfg.resume)
        if self.info.is_primary:
            if self.cfg.overwrite and not self.cfg.resume:
                remove_run_outputs(self.out)  # no file of the replaced run survives to be mistaken for this one's
            self.out.mkdir(parents=True, exist_ok=True)
            settings = absolute_paths(asdict(self.cfg))  # `--resume RUN` works from any working directory
            (self.out / "config.json").write_text(json.dumps(settings, indent=2))  # auto fields resolved
        self.writer = self._tensorboard()

    # -- set-up

    def _setup_determinism(self) -> None:
        cfg = self.cfg
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp = cfg.amp
        if self.amp == "fp16" and self.device.type != "cuda":
            log(self.info, "note: fp16 AMP needs a GPU; training in float32 on CPU (use --amp bf16 to try bf16)")
            self.amp = "none"
        self.amp_dtype = amp_dtype(self.amp)

    def _setup_data_and_model(self) -> None:
        task, info = self.task, self.info
        task.open_data()
        seed_everything(task.cfg.seed)  # same initial weights on every rank
        model = task.build_model()
        spec = task.loaders(model)
        self.train_set, self.val_set, self.input_size = spec.train_set, spec.val_set, spec.input_size
        self._build_loaders(spec)
        cfg, reasons = resolve_schedule_settings(task.cfg, self.steps_per_epoch)
        task.cfg, task.auto_reasons = cfg, {**task.auto_reasons, **reasons}
        self.cfg = cfg
        if task.auto_reasons:
            log(info, describe_auto_settings(cfg, task.auto_reasons))
        self.model = self._place_model(model)
        self.ema = None
        if cfg.model_ema:
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        self.train_model = self._wrap_model(self.model)
        seed_everything(cfg.seed + info.rank)  # per-rank augmentation / drop-path randomness

    def _build_loaders(self, spec: LoaderSpec) -> None:
        cfg, info = self.task.cfg, self.info
        options = LoaderOptions(workers=cfg.workers, pin_memory=self.device.type == "cuda")
        self.train_loader = build_train_loader(
            spec.train_set, spec.train_transform, cfg.batch_size, options, world_size=info.world_size,
            rank=info.rank, accum_steps=cfg.accum_steps, seed=cfg.seed, indices=spec.train_indices,
            collate_fn=spec.collate_fn)
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.val_loader = None
        if spec.val_set is not None:
            self.val_loader = build_eval_loader(
                spec.val_set, spec.eval_transform, spec.eval_batch_size or cfg.batch_size, options,
                world_size=info.world_size, rank=info.rank, indices=spec.val_indices,
                collate_fn=spec.eval_collate_fn or spec.collate_fn)

    def _place_model(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        if cfg.sync_bn and self.info.distributed:
            if self.device.type != "cuda":
                raise ValueError("sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            self.task.enable_grad_checkpointing(model)
        return model

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """DDP and/or torch.compile around the model (EMA, eval and checkpoints use the bare model)."""
        wrapped = model
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            unused = self.task.ddp_unused_parameters(model, self.input_size, self.device)
            if unused:
                log(self.info, f"{len(unused)} parameter tensors may get no gradient (e.g. {unused[0]}); "
                               "DDP will skip them")
            wrapped = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(unused))
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _setup_optimization(self) -> None:
        cfg, info = self.cfg, self.info
        self.global_batch = global_batch(cfg, info.world_size)
        self.lr = effective_lr(cfg, info.world_size)
        self.optimizer = create_optimizer(self.task.optimizer_params(self.model, self.lr), cfg, self.lr)
        self.scheduler, self.num_epochs = create_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.task.start(self.num_epochs, self.ema.module if self.ema is not None else None)
        log(info, self._describe_run())

    def _describe_run(self) -> str:
        cfg, info = self.cfg, self.info
        return (f"{self.task.describe(self.model)}: {info.world_size} process(es) x batch {cfg.batch_size} x accum "
                f"{cfg.accum_steps} = global batch {self.global_batch}, lr {self.lr:.3g}, {self.steps_per_epoch} "
                f"steps/epoch, {self.num_epochs} epochs, "
                + (f"input {tuple(self.input_size)}, " if self.task.fixed_input_size else "")
                + f"device {self.device}"
                + (f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""))

    def _tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.info.is_primary):
            return None
        from torch.utils.tensorboard import SummaryWriter  # here: importing TensorBoard takes seconds

        return SummaryWriter(log_dir=str(self.out / "tb"), purge_step=self.progress.global_step or None)

    def autocast(self) -> Any:
        """The run's autocast context (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    # -- checkpoints

    def _state(self) -> dict[str, Any]:
        p = self.progress
        return {
            "arch": self.cfg.model,
            "state_dict": self.model.state_dict(),
            "state_dict_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(p),
            "global_batch": self.global_batch,
            "world_size": self.info.world_size,
            "config": asdict(self.cfg),
            "class_names": self.task.class_names,
            "epoch": p.epoch,
            **self.task.checkpoint_metadata(),
        }

    def _gather_rng(self) -> list[dict[str, Any]]:
        """RNG state of every rank (rank order), for exact resume."""
        state = capture_rng()
        if not self.info.distributed:
            return [state]
        states: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(states, state)
        return states

    def save(self) -> None:
        """Write ``last.pt`` atomically (all ranks take part in gathering RNG; rank 0 writes)."""
        self._raise_if_diverged()
        rng = self._gather_rng()
        if self.info.is_primary:
            save_checkpoint(self.out / "last.pt", {**self._state(), "rng": rng})
        self.last_checkpoint = str(self.out / "last.pt")

    def _save_weights(self, name: str, model: nn.Module, weights: str | None = None) -> str:
        path = self.out / name
        if self.info.is_primary:
            meta: dict[str, Any] = {"epoch": str(self.progress.epoch), **self.task.weights_metadata()}
            if weights:
                meta["selected_weights"] = weights  # "raw" or "ema"
            if self.task.class_names:
                meta["class_names"] = list(self.task.class_names)
            save_weights(model, path, metadata=meta)
        return str(path)

    def _check_same_model(self, source: str, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model than the configured one, naming the differing settings (model,
        model_kwargs, num_classes) or else the first mismatched tensors.

        Raises:
            ResumeMismatchError: the message says to resume with the run's own settings.
        """
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        differing = [f"{key} {saved[key]!r} (checkpoint) vs {getattr(self.cfg, key)!r} (now)"
                     for key in ("model", "model_kwargs", "num_classes")
                     if key in saved and saved[key] != getattr(self.cfg, key, None)]
        detail = ""
        try:
            check_fit(self.model, state["state_dict"], what="checkpoint")
        except CheckpointError as e:
            detail = str(e).split(": ", 1)[-1]
        if not detail:
            return
        what = "; ".join(differing) if differing else detail
        raise ResumeMismatchError(
            f"{source} was trained with another model than the one configured now: {what}. Resume with the run's "
            "own settings (leave --model / --model-kwargs unset, or restore them in its config.json)"
        )

    def _resume(self, source: str) -> None:
        state = load_checkpoint(source)
        self._check_same_model(source, state)
        self.model.load_state_dict(state["state_dict"])
        if self.ema is not None:
            if state.get("state_dict_ema") is None:
                raise ValueError(f"{source} has no EMA weights but model_ema is on")
            self.ema.module.load_state_dict(state["state_dict_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        if self.progress.step_in_epoch and state["global_batch"] != self.global_batch:
            raise ValueError(
                f"{source} stopped mid-epoch with global batch {state['global_batch']}; resume with the same "
                f"global batch (now {self.global_batch}) so the data order continues"
            )
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            restore_rng(rng[self.info.rank])
        else:
            log(self.info, f"note: checkpoint from {len(rng)} process(es); RNG re-seeded for {self.info.world_size}")
            seed_everything(self.cfg.seed + self.info.rank + self.progress.global_step)
        self.resumed_from = str(source)
        self.last_checkpoint = str(Path(source) / "last.pt" if Path(source).is_dir() else source)
        log(self.info, f"resumed from {source}: epoch {self.progress.epoch + 1}, step {self.progress.step_in_epoch}"
                       f"/{self.steps_per_epoch}, global step {self.progress.global_step}")

    # -- training

    def _raise_if_diverged(self) -> None:
        """Stop on a non-finite loss seen on any rank since the last check (never saving diverged weights).

        Every rank calls this at the same points (log steps, checkpoints, epoch ends), so all stop together.
        """
        if reduce_sums([float(self.nonfinite)], self.info)[0] > 0:
            p = self.progress
            remedy = "a lower lr, a longer warmup, gradient clipping, or bf16 instead of fp16"
            if self.last_checkpoint is not None and Path(self.last_checkpoint).exists():
                where = (f"The last good checkpoint is {self.last_checkpoint}: resume from it (--resume) with "
                         f"{remedy}")
            else:
                where = f"No checkpoint was written before it: start the run again with {remedy}"
            raise TrainingDiverged(
                f"the loss became NaN/inf in epoch {p.epoch + 1}, by optimizer step {p.global_step} (lr "
                f"{self._current_lr():.3g}); training stopped. {where}"
            )

    def _current_lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1
        self.progress.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.global_step)
        self.scheduler.step_update(num_updates=self.progress.global_step)

    def _batches(self, epoch: int) -> Any:
        """This epoch's micro-batches from the resume position, moved to the device."""
        start = self.progress.step_in_epoch * self.cfg.accum_steps
        for batch in self.train_loader.epoch(epoch, start):
            yield self.task.to_device(batch, self.device)

    def train_epoch(self, epoch: int) -> None:
        """The optimizer steps of one (0-based) epoch from the resume position, with a progress bar."""
        cfg, p = self.cfg, self.progress
        self.train_model.train()
        self.task.start_epoch(epoch)
        shown = cfg.progress and self.info.is_primary and sys.stderr.isatty()  # no bar redraws in a log file
        bar = tqdm(total=self.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {epoch + 1}/{self.num_epochs}",
                   unit="step", disable=not shown, dynamic_ncols=True, leave=True)
        try:
            self._train_steps(epoch, bar)
        finally:  # also on Ctrl-C: the bar ends its line before any message
            bar.close()

    def _train_steps(self, epoch: int, bar: Any) -> None:
        """The optimizer steps of ``epoch`` from the resume position (``train_epoch``'s loop)."""
        cfg, p = self.cfg, self.progress
        running = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, count since last log
        tick, tick_step = time.perf_counter(), p.global_step
        for micro, (inputs, targets) in enumerate(self._batches(epoch)):
            last_micro = (micro + 1) % cfg.accum_steps == 0
            sync = nullcontext() if last_micro or not self.info.distributed else self.train_model.no_sync()
            with sync:
                with self.autocast():
                    loss = self.task.loss(self.train_model, inputs, targets)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            loss = loss.detach()
            self.nonfinite |= ~torch.isfinite(loss)
            running += torch.stack([loss.double().nan_to_num(0.0), torch.ones((), dtype=torch.float64,
                                                                              device=self.device)])
            if not last_micro:
                continue
            self._optimizer_step()
            bar.update(1)
            logged = p.global_step % cfg.log_interval == 0 or p.step_in_epoch == self.steps_per_epoch
            if logged:
                tick, tick_step = self._log_step(bar, running, tick, tick_step)
                running.zero_()
            if cfg.checkpoint_steps and p.global_step % cfg.checkpoint_steps == 0 and \
                    p.step_in_epoch < self.steps_per_epoch:
                self.save()

    def _log_step(self, bar: Any, running: torch.Tensor, tick: float, tick_step: int) -> tuple[float, int]:
        """Progress bar, TensorBoard and the NaN check, every ``log_interval`` optimizer steps."""
        self._raise_if_diverged()
        p = self.progress
        loss_sum, count = reduce_sums(running.tolist(), self.info)
        p.loss_sum += loss_sum
        p.loss_count += int(count)
        now = time.perf_counter()
        images_per_s = (p.global_step - tick_step) * self.global_batch / max(now - tick, 1e-9)
        loss, lr = loss_sum / max(count, 1), self._current_lr()
        p.curve.append([p.global_step, loss, lr])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}", refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, p.global_step)
            self.writer.add_scalar("train/lr", lr, p.global_step)
            self.writer.add_scalar("train/images_per_s", images_per_s, p.global_step)
        return now, p.global_step

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """The task's validation metrics of ``model`` (each rank its shard, reduced over ranks)."""
        return self.task.evaluate(model, self.val_loader, self.device, self.amp_dtype)

    def end_epoch(self, epoch: int, epoch_seconds: float, images: int) -> dict[str, Any]:
        """BN averaging, evaluation, history row, checkpoints."""
        p, metric = self.progress, self.task.metric
        average_bn_stats(self.model, self.info)
        if self.ema is not None:
            average_bn_stats(self.ema.module, self.info)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": p.loss_sum / max(p.loss_count, 1),
                               "lr": self._current_lr(), "seconds": epoch_seconds,
                               "images_per_s": images / max(epoch_seconds, 1e-9)}
        last = epoch + 1 == self.num_epochs
        if self.val_loader is not None and ((epoch + 1) % self.cfg.eval_every == 0 or last):
            row.update(self.evaluate(self.model))
            if self.ema is not None:
                row.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()
                            if k not in ("count", "val_skipped") and isinstance(v, (int, float))})
        row["skipped_images"] = self._skipped_count()
        kind, score = self._select(row)
        p.history.append(row)
        p.epoch, p.step_in_epoch, p.loss_sum, p.loss_count = epoch + 1, 0, 0.0, 0
        if not math.isnan(score) and score > p.best_top1:
            p.best_top1, p.best_epoch, p.best_weights = score, epoch + 1, kind
            p.best_raw_top1, p.best_ema_top1 = row.get(metric, math.nan), row.get(f"ema_{metric}", math.nan)
            self._save_weights("best.safetensors", self.ema.module if kind == "ema" else self.model,
                               weights=kind)
        self._save_weights("last.safetensors", self.model)
        if self.ema is not None:
            self._save_weights("last_ema.safetensors", self.ema.module)
        self.save()
        self._report_epoch(row)
        return row

    def _select(self, row: dict[str, Any]) -> tuple[str, float]:
        """The better of this epoch's raw and EMA weights by the task's metric (EMA on a tie): ``("raw" | "ema",
        score)``; also written into ``row`` as ``selected_weights`` / ``selected_<metric>``. Without a val split the
        latest weights (EMA when on) win with score ``-train_loss``; epochs without evaluation score NaN."""
        m = self.task.metric
        candidates = [(name, row[key]) for name, key in (("ema", f"ema_{m}"), ("raw", m)) if key in row]
        candidates = [(name, score) for name, score in candidates if not math.isnan(score)]
        if candidates:
            kind, score = max(candidates, key=lambda item: item[1])  # max keeps the first (EMA) on a tie
            row["selected_weights"], row[f"selected_{m}"] = kind, score
            return kind, score
        kind = "ema" if self.ema is not None else "raw"
        return kind, (-row["train_loss"] if self.val_loader is None else math.nan)

    def _skipped_count(self) -> int:
        bad = getattr(self.train_set, "bad", None)  # SkipUnreadable and the dense datasets: a flag per image
        local = float(bad.sum()) if isinstance(bad, torch.Tensor) else 0.0
        return int(reduce_sums([local], self.info)[0])

    def _skipped_names(self) -> list[str]:
        skipped = getattr(self.train_set, "skipped", None)
        return list(skipped()) if callable(skipped) else []

    def _report_epoch(self, row: dict[str, Any]) -> None:
        if not self.info.is_primary:
            return
        parts = [f"epoch {row['epoch']}/{self.num_epochs}: train loss {row['train_loss']:.4f}",
                 *self.task.describe_metrics(row)]
        if "selected_weights" in row and self.ema is not None:
            parts.append(f"better: {row['selected_weights']}")
        parts.append(f"{row['images_per_s']:.0f} img/s")
        log(self.info, ", ".join(parts))
        if row["skipped_images"]:
            names = self._skipped_names()[:5]
            log(self.info, f"warning: skipped {row['skipped_images']} unreadable training images, e.g. {names}")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "count") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
            self.writer.flush()
        write_summary_csv(self.progress.history, self.out / "summary.csv")

    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule; returns the result summary (also written to ``results.json``).

        Raises:
            TrainingDiverged: a NaN/inf loss (the last good checkpoint is kept).
        """
        p = self.progress
        try:
            while p.epoch < self.num_epochs:
                epoch, start_step, started = p.epoch, p.step_in_epoch, time.perf_counter()
                self.train_epoch(epoch)
                self._raise_if_diverged()
                images = (self.steps_per_epoch - start_step) * self.global_batch
                self.end_epoch(epoch, time.perf_counter() - started, images)
        except BaseException:  # Ctrl-C included: TensorBoard gets what was logged
            if self.writer is not None:
                self.writer.close()
            raise
        finally:  # loader workers stop now, not at some later garbage collection
            shutdown_workers(self.train_loader)
            shutdown_workers(self.val_loader)
        return self._finish()

    def interrupted(self) -> TrainingInterrupted:
        """What a Ctrl-C now means: the position reached and the checkpoint to resume from."""
        p = self.progress
        return TrainingInterrupted(str(self.out), min(p.epoch + 1, self.num_epochs), p.step_in_epoch,
                                   self.steps_per_epoch, self.last_checkpoint)

    def _finish(self) -> dict[str, Any]:
        p, task = self.progress, self.task
        divergence = rank_divergence(self.model, self.info)
        curves = self.out / "curves.png"
        if self.info.is_primary:
            plot_curves(p.history, p.curve, self.steps_per_epoch, curves, task.metric, task.metric_title)
            if self.writer is not None:
                self.writer.close()
        final = p.history[-1] if p.history else {}
        m = task.metric  # the progress fields named *_top1 hold this metric's scores
        result = {
            "metric": m,
            f"best_{m}": p.best_top1 if math.isfinite(p.best_top1) else math.nan,
            "best_epoch": p.best_epoch,
            "best_weights": p.best_weights or None,  # "raw" or "ema": the weights in best.safetensors
            f"best_raw_{m}": p.best_raw_top1,  # raw and EMA scores of the best epoch
            f"best_ema_{m}": p.best_ema_top1,
            f"final_{m}": final.get(f"selected_{m}", math.nan),  # the better of raw and EMA in the last epoch
            "final_weights": final.get("selected_weights"),
            "final": final,
            "best_checkpoint": str(self.out / "best.safetensors"),
            "last_checkpoint": str(self.out / "last.safetensors"),
            "ema_checkpoint": str(self.out / "last_ema.safetensors") if self.ema is not None else None,
            "resume_checkpoint": str(self.out / "last.pt"),
            "summary_csv": str(self.out / "summary.csv"),
            "curves_png": str(curves),
            "tensorboard": str(self.out / "tb") if self.writer is not None else None,
            "seconds": time.perf_counter() - self.started,
            "epochs": self.num_epochs,
            "global_step": p.global_step,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "world_size": self.info.world_size,
            "rank_divergence": divergence,
            "skipped_images": self._skipped_count(),
            "resumed_from": self.resumed_from,
            "auto_settings": {name: {"value": getattr(self.cfg, name), "reason": reason}
                              for name, reason in task.auto_reasons.items()},
            **task.result(),
        }
        if self.info.is_primary:
            write_json(self.out / "results.json", result)
        return result


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or fine-tune / resume) as configured, whatever the task: the config's class names it
    (``TrainConfig``: classification, ``DetectionConfig``, ``SegmentationConfig``). Returns the result summary
    (also in ``results.json``).

    Runs under ``torchrun`` as one DDP rank per process.

    Raises:
        DatasetError, ValueError, CheckpointError: bad data, arguments or weights, before training
            (``RunExistsError`` for an output folder holding another run's ``last.pt`` without ``resume`` /
            ``overwrite``).
        TrainingDiverged: a NaN loss. TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``).
    """
    cfg.check()
    return run_training(task_for_config(cfg), cfg)


def run_training(task_class: type[Task], cfg: RunConfig) -> dict[str, Any]:
    """Run ``Trainer(task_class(cfg, info)).fit()`` in this process (one DDP rank under ``torchrun``): process
    group, CPU threads and determinism set up and restored afterwards whatever happens.

    Raises:
        TrainingInterrupted: on Ctrl-C / SIGINT (a ``KeyboardInterrupt``), naming the epoch and step reached, the
            last checkpoint and the ``--resume`` that continues the run.
        RunExistsError: ``output`` holds another run's ``last.pt`` (see ``check_output``).
    """
    check_output(cfg)  # before the process group: a clear error, not a hang of the other ranks
    info = init_distributed(cfg.device)
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if info.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    ok, run = False, None
    try:
        run = Trainer(task_class(cfg, info))
        result = run.fit()
        ok = True
        return result
    except KeyboardInterrupt as err:
        if isinstance(err, TrainingInterrupted):
            raise
        if run is not None:
            raise run.interrupted() from None
        resumable = str(cfg.resume) if cfg.resume else None
        raise TrainingInterrupted(str(cfg.output), None, 0, None, resumable) from None
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        cleanup(info, barrier=ok)

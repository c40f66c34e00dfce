"""The optimizer and the learning-rate schedule of a run: timm's, with linear lr scaling to the global batch.

timm's ``create_optimizer_v2`` (AdamW, LAMB, SGD, ...; no weight decay on biases, norms and layer scales; layer-wise
lr decay through the model's ``group_matcher``) and ``create_scheduler_v2`` (warmup, cosine / poly / multistep,
stepped every optimizer step); torch's fused Adam/AdamW kernel where every parameter allows it.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

__all__ = ["create_optimizer", "create_schedule", "effective_lr", "fused_optimizer_kwargs", "global_batch"]


def global_batch(cfg: Any, world_size: int) -> int:
    """Images per optimizer step over all processes."""
    return cfg.batch_size * cfg.accum_steps * world_size


def effective_lr(cfg: Any, world_size: int) -> float:
    """``cfg.lr`` if given, else the recipe lr scaled linearly: lr_base * global_batch / lr_base_size."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.lr_base * global_batch(cfg, world_size) / cfg.lr_base_size


def fused_optimizer_kwargs(model: nn.Module | list[torch.Tensor], opt: str) -> dict[str, Any]:
    """``{"fused": True}`` for torch's Adam/AdamW when every parameter is a float tensor on CPU or CUDA, where torch
    has a fused kernel (one kernel for all tensors instead of a loop over them); else ``{}``."""
    if opt.lower() not in ("adam", "adamw"):
        return {}
    params = list(model) if isinstance(model, list) else list(model.parameters())
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if params and ok else {}


def create_optimizer(model: nn.Module | list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    """timm optimizer (AdamW, LAMB, ...) without weight decay on biases, norms and ``no_weight_decay()``
    parameters (layer scales), with layer-wise lr decay through the model's ``group_matcher`` if asked;
    Adam/AdamW use torch's fused kernel where it exists.

    ``model`` may also be a list of parameter groups (``{"params", "weight_decay", "lr_scale"}`` dicts, e.g. a
    detector's groups), used as given: weight decay and layer decay are then the groups' own."""
    groups = isinstance(model, list)
    params = [p for group in model for p in group["params"]] if groups else list(model.parameters())
    extra: dict[str, Any] = fused_optimizer_kwargs(params, cfg.opt)
    if cfg.opt_betas:
        extra["betas"] = tuple(cfg.opt_betas)
    if cfg.opt_eps is not None:
        extra["eps"] = cfg.opt_eps
    return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               filter_bias_and_bn=not groups, layer_decay=None if groups else cfg.layer_decay,
                               **extra)


def create_schedule(optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int) -> tuple[Any, int]:
    """timm lr schedule stepped every optimizer step: linear warmup from ``warmup_lr``, cosine to ``min_lr``
    over ``epochs``, then ``cooldown_epochs`` at ``min_lr``. Returns (scheduler, total epochs)."""
    return create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, cooldown_epochs=cfg.cooldown_epochs, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch, decay_rate=cfg.decay_rate,
        **({"decay_milestones": [int(m) for m in cfg.decay_milestones]} if cfg.decay_milestones else {}),
    )

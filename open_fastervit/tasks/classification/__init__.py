"""Image classification: settings (``TrainConfig``), the task the engine trains (``ClassificationTask``) and MESA.

``open_fastervit.train.train(TrainConfig(...))`` (or ``fastervit train``) trains it.
"""

from .config import PAPER_AUGMENTATION, TrainConfig, auto_augmentation, resolve_augmentation, resolve_auto_settings
from .mesa import MesaLoss
from .task import ClassificationTask

__all__ = ["PAPER_AUGMENTATION", "ClassificationTask", "MesaLoss", "TrainConfig", "auto_augmentation",
           "resolve_augmentation", "resolve_auto_settings"]

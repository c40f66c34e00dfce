"""The tasks the training engine trains, peers of each other: classification, detection, segmentation.

Each registers itself with the engine's task registry (``open_fastervit.train.task.register_task``) when imported;
importing this package imports all three, so ``open_fastervit.train.train(cfg)`` finds the task of any config.
"""

from . import classification, detection, segmentation

__all__ = ["classification", "detection", "segmentation"]

"""``fastervit demo``: end-to-end runs on the demo data, through the package's public API.

- :mod:`~open_fastervit.demos.classification`: train a small FasterViT on tiny-imagenet-10, validate it, classify
  held-out photos, benchmark it and write ``REPORT.md`` (:func:`run_demo`);
- :mod:`~open_fastervit.demos.dense`: detection (tree crowns, Faster R-CNN) or segmentation (nuclei, FPN) from
  scratch, evaluated on held-out images (:func:`run_dense_demo`).
"""

from __future__ import annotations

from open_fastervit.demos.classification import DEMO_MODEL, DEMO_MODEL_KWARGS, DemoConfig, Plan, plan_training, run_demo
from open_fastervit.demos.dense import DenseDemoConfig, run_dense_demo

__all__ = ["DEMO_MODEL", "DEMO_MODEL_KWARGS", "DemoConfig", "DenseDemoConfig", "Plan", "plan_training", "run_demo",
           "run_dense_demo"]

"""``fastervit demo``: end-to-end runs on the demo data, through the package's public API.

- :mod:`~open_fastervit.demos.classification`: train a small FasterViT on tiny-imagenet-10, validate it, classify
  held-out photos, benchmark it and write ``REPORT.md`` (:func:`run_demo`);
- :mod:`~open_fastervit.demos.dense`: detection (tree crowns, Faster R-CNN) or segmentation (nuclei, FPN) from
  scratch, evaluated on held-out images (:func:`run_dense_demo`).

The package itself holds only the demos' defaults, so that ``fastervit demo --help`` does not load what the demos
run (training, detection, the benchmarks).
"""

from __future__ import annotations

__all__ = ["CLASSIFICATION_MINUTES", "DENSE_MINUTES"]

#: Default training budget of the classification demo, minutes (the epochs are chosen to fit it).
CLASSIFICATION_MINUTES = 6.0
#: Default training budget of the detection and segmentation demos, minutes.
DENSE_MINUTES = 10.0

"""Old import paths of modules and names that moved: they keep working, with a ``DeprecationWarning`` naming the
new path.

A name that left a module is listed in :data:`MOVED_NAMES`. A module that moved is listed once in :data:`MOVED`
(old dotted name -> new dotted name); the package installs
:class:`MovedModuleFinder` when it is imported, so ``import open_fastervit.bench_dense`` (or ``from
open_fastervit.detection.data import ...``) returns the very module object of the new path: classes, functions
and module state are shared, never imported twice.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "MOVED_NAMES", "MovedModuleFinder", "install", "moved_attribute"]

#: Old module path -> new module path. A package entry also covers its submodules (``old.x`` -> ``new.x``).
MOVED: dict[str, str] = {
    "open_fastervit.checkpoint": "open_fastervit.train.checkpoint",
    "open_fastervit.distributed": "open_fastervit.train.distributed",
    "open_fastervit.mesa": "open_fastervit.tasks.classification.mesa",
    "open_fastervit.dense": "open_fastervit.tasks.dense",
    "open_fastervit.detection": "open_fastervit.tasks.detection",
    "open_fastervit.segmentation": "open_fastervit.tasks.segmentation",
    "open_fastervit.bench_dense": "open_fastervit.bench.dense",
    "open_fastervit.bench_plots": "open_fastervit.bench.report",
    "open_fastervit.demo": "open_fastervit.demos.classification",
    "open_fastervit.dense_demo": "open_fastervit.demos.dense",
}

#: Names that left a module that still exists: module -> {name: the module that holds it now}. The old module's
#: ``__getattr__`` calls :func:`moved_attribute`.
MOVED_NAMES: dict[str, dict[str, str]] = {
    "open_fastervit.data": {
        **{name: "open_fastervit.train.loader"
           for name in ("LoaderOptions", "ResumableBatchSampler", "SampleKey", "SeededSamples", "ShardSampler",
                        "TrainLoader", "build_eval_loader", "build_train_loader", "sample_rng", "shutdown_workers")},
        "data_config_for": "open_fastervit.inference",
    },
    "open_fastervit.train": {
        **{name: "open_fastervit.tasks.classification.config"
           for name in ("TrainConfig", "PAPER_AUGMENTATION", "LIGHT_AUGMENTATION", "FULL_AUG_MIN_IMAGES",
                        "FULL_AUG_MIN_EPOCHS", "AUTO_FIELDS", "auto_augmentation", "resolve_augmentation",
                        "resolve_auto_settings")},
        **{name: "open_fastervit.tasks.classification.task"
           for name in ("ClassificationTask", "create_classifier", "classification_transforms",
                        "open_classification_data", "probe_unused_parameters", "check_sample")},
        "AMP_DTYPES": "open_fastervit.runtime",
    },
}


def moved_attribute(module: str, name: str) -> object:
    """``name`` from the module that holds it now (with a ``DeprecationWarning``), for the ``__getattr__`` of the
    module it left.

    Raises:
        AttributeError: ``name`` never was in ``module``.
    """
    new = MOVED_NAMES.get(module, {}).get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved to {new}.{name}; import it from there (the old path will be removed)",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new), name)


def _target(fullname: str) -> str | None:
    """The new name of ``fullname`` (itself or a submodule of a moved package), ``None`` when it did not move."""
    if fullname in MOVED:
        return MOVED[fullname]
    for old, new in MOVED.items():
        if fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A meta-path finder answering old module names with the module at the new name (``sys.modules`` then holds
    one module object under both names)."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = _target(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = _target(spec.name)
        assert new is not None
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path will be removed)",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        # the import system overwrites __spec__ on the returned module; exec_module puts the real one back
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)

    def is_package(self, fullname: str) -> bool:
        """Whether the module at the new path is a package (``python -m OLD`` asks)."""
        spec = importlib.util.find_spec(_target(fullname) or fullname)
        return spec is not None and spec.submodule_search_locations is not None

    def get_code(self, fullname: str) -> object:
        """The code of the module at the new path, so ``python -m OLD`` runs what ``python -m NEW`` runs."""
        new = _target(fullname) or fullname
        warnings.warn(f"{fullname} moved to {new}; run python -m {new}", DeprecationWarning, stacklevel=2)
        spec = importlib.util.find_spec(new)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            raise ImportError(f"no code for {new}")
        return spec.loader.get_code(new)


def install() -> None:
    """Put the finder in front of ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


install()

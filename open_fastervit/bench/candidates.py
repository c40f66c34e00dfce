"""Who a benchmark compares: where a candidate name comes from, checking names, pairing ours with official models.

A candidate is one of our models by name (``fastervit_0``), a timm peer (``convnext_tiny``), an official model
(``faster_vit_0_224``, registered with timm when the user adds ``--import fastervit``) or an int8 ONNX file of
``fastervit quantize`` (``model.onnx``). The library never imports the official package itself: ``--import`` is
a generic timm plug-in mechanism (:func:`import_plugins`).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from pathlib import Path

import timm

from open_fastervit import OFFICIAL_NAMES  # importing the package registers fastervit_* with timm
from open_fastervit.bench.timing import BenchError

__all__ = ["OFFICIAL_PREFIX", "check_model_names", "import_plugins", "official_to_ours_name", "pairs_of",
           "source_of"]

#: Name prefix of the official implementation's models in timm.
OFFICIAL_PREFIX = "faster_vit_"


def official_to_ours_name(name: str) -> str | None:
    """``faster_vit_0_224`` -> ``fastervit_0``, ``faster_vit_4_21k_384`` -> ``fastervit_4_21k_384``; None for a name
    that is not an official one."""
    return OFFICIAL_NAMES.get(name)


def source_of(name: str) -> str:
    """Where a candidate comes from: ``official``, ``open_fastervit``, ``timm`` or ``int8`` (a file of
    ``fastervit quantize``)."""
    if name.endswith(".onnx"):
        return "int8"
    if name.startswith(OFFICIAL_PREFIX):
        return "official"
    return "open_fastervit" if name.startswith("fastervit_") else "timm"


def import_plugins(modules: Sequence[str]) -> None:
    """Import user-named modules (timm plug-ins that register models).

    Raises:
        BenchError: a module cannot be imported (naming it and the reason).
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise BenchError(f"--import {module}: cannot import it ({exc})") from exc


def check_model_names(names: Sequence[str]) -> None:
    """Check that every name is a timm model or an existing int8 file.

    Raises:
        BenchError: naming the first unknown model, with close matches (and ``--import fastervit`` for an official
            name).
    """
    known = timm.list_models()
    for name in names:
        if timm.is_model(name):
            continue
        if source_of(name) == "int8":
            if not Path(name).is_file():
                raise BenchError(f"int8 model file {name} does not exist (write one with `fastervit quantize`)")
            continue
        hint = ""
        if name.startswith(OFFICIAL_PREFIX):
            hint = " Official names are registered by the official package: add `--import fastervit`."
        close = difflib.get_close_matches(name, known, n=3)
        if close:
            hint += f" Close matches: {', '.join(close)}."
        raise BenchError(f"unknown model {name!r}.{hint}")


def pairs_of(names: Sequence[str]) -> dict[str, str]:
    """Our candidate -> official candidate of the same architecture, for those present in the run."""
    pairs = {}
    for name in names:
        ours = official_to_ours_name(name) if source_of(name) == "official" else None
        if ours in names:
            pairs[ours] = name
    return pairs

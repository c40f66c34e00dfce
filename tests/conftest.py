"""Shared test fixtures: tiny configurations, the shared data folder, the oracle."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

import open_fastervit  # noqa: F401  (registers the models with timm)

# A tiny FasterViT exercising every path at 64 px: stage 2 holds 2x2 windows of 3 (HAT, padding 4 -> 6),
# stage 3 a single padded window (plain attention); layer scale and propagation on.
TINY = dict(
    dim=16,
    in_dim=8,
    depths=(1, 1, 2, 2),
    num_heads=(1, 2, 2, 4),
    window_size=(7, 7, 3, 3),
    drop_path_rate=0.0,
    layer_scale=1e-5,
    do_propagation=True,
    num_classes=10,
)


# The automatic runtime choice caches per machine; tests (and the commands they start) get a cache of their own, so
# a choice cached by earlier use of this machine never changes what a test sees.
os.environ["FASTERVIT_FORMS_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="fastervit-forms-"), "forms.json")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def oracle():
    """The official `fastervit` package (test-only oracle, installed by `make test`; never skipped).

    Importing it registers ``faster_vit_*`` in timm's registry.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fastervit

    return fastervit


def randomise(model: torch.nn.Module, spread: float = 0.1) -> torch.nn.Module:
    """Give BatchNorm statistics and layer scales (ours ``*.gamma``, official ``gamma1..4``) non-trivial values,
    so that BN folding, scaling and every residual branch show in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, spread)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, spread)
                m.bias.normal_(0, spread)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("gamma"):
                p.normal_(0, 3 * spread)
    return model


def settings_argv(settings: dict) -> list[str]:
    """Command-line flags for a dict of config settings (``--flag value``, ``--flag`` / ``--no-flag``, JSON dicts)."""
    import json

    argv: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def experiment_module(name: str) -> ModuleType:
    """``experiments/NAME.py`` imported as a module (the load-test client and server helpers live there)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "experiments"
                                                      / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

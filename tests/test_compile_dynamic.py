"""``torch.compile(dynamic=True)`` runs every input size of a size class from one graph (issue 12, item 9).

The window geometry is integer arithmetic on symbolic sizes, padding masks and carrier pooling are built from
``arange`` comparisons, and the crop is a gather, so dynamo keeps height and width symbolic. Sizes only recompile
when the window count of a stage crosses 1 on an axis (dynamo specialises sizes of 0 and 1).
"""

from __future__ import annotations

import timm
import torch
from conftest import TINY
from torch._dynamo.utils import counters


def test_three_sizes_compile_once() -> None:
    model = timm.create_model("fastervit_0", **TINY).eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")
    with torch.no_grad():
        for size in [(64, 80), (80, 96), (96, 72)]:  # HAT on, padded and unpadded stage maps, non-square
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_export_keeps_batch_height_and_width_dynamic() -> None:
    """One exported program serves non-square sizes, padded or not, at the eager model's outputs (fp32 1e-5).

    The range starts where every transformer stage holds two or more windows per axis (97 px for this config):
    a stage of one window is a different graph (no carriers), see the module docstring."""
    model = timm.create_model("fastervit_0", **TINY).eval()
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("h", min=97, max=2048),
            3: torch.export.Dim("w", min=97, max=2048)}
    program = torch.export.export(model, (torch.randn(2, 3, 224, 192),), dynamic_shapes={"x": dims})
    with torch.no_grad():
        for batch, size in [(1, (224, 192)), (3, (100, 130)), (2, (97, 203)), (1, (333, 517))]:
            x = torch.randn(batch, 3, *size)
            ref = model(x)
            out = program.module()(x)
            assert out.shape == ref.shape
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5

"""ONNX export (torch's dynamo exporter) of the plain and the fused model, checked with onnxruntime."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from conftest import TINY, randomise


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_onnx_export_with_dynamic_batch_matches_onnxruntime(fused, tmp_path) -> None:
    model = randomise(timm.create_model("fastervit_0", **TINY), spread=0.2).eval()
    exported = copy.deepcopy(model).fuse() if fused else model
    x = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(exported, (x,), dynamic_shapes={"x": {0: batch}}, input_names=["x"],
                                    dynamo=True)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        xb = torch.randn(b, 3, 64, 64)
        with torch.no_grad():
            ref = model(xb).numpy()
        out = session.run(None, {"x": xb.numpy()})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5

"""Export to ONNX and ``torch.export`` with dynamic batch, height and width (issue 10, point 1).

One file serves every size of its stated range (non-square and padded ones included) at the eager model's outputs
(fp32, relative 1e-5); sizes outside the range get a clear error naming it; the ONNX graph stays in the standard
domain; the command line reports errors in one line with exit code 2.
"""

from __future__ import annotations

import json
import math
import warnings

import onnx
import pytest
import timm
import torch
from conftest import TINY, randomise
from PIL import Image

from open_fastervit.cli import main as cli_main
from open_fastervit.deploy import ExportError, export_model, load_exported, min_dynamic_size
from open_fastervit.deploy.export import RANGE_KEY, onnx_domains
from open_fastervit.serialization import save_weights

TINY_BOUND = 97  # stage 3: reduction 32, window 3 -> 32 * 3 + 1
TINY_JSON = json.dumps(TINY)


def _padded(h: int, w: int) -> bool:
    """Whether a tiny-config input pads a transformer stage (window 3 at reductions 16 and 32)."""
    return any(math.ceil(s / r) % 3 for s in (h, w) for r in (16, 32))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise(timm.create_model("fastervit_0", **TINY), spread=0.2).eval()


def test_dynamic_bound_follows_the_window_geometry() -> None:
    with torch.device("meta"):
        assert min_dynamic_size(timm.create_model("fastervit_0")) == 225  # window 7 at stride 32
        assert min_dynamic_size(timm.create_model("fastervit_4_21k_384")) == 385  # windows 24 @ 16, 12 @ 32
        assert min_dynamic_size(timm.create_model("fastervit_0", **TINY)) == TINY_BOUND


def test_pt2_with_dynamic_size_runs_every_size_of_its_range(tiny, tmp_path) -> None:
    path = tmp_path / "tiny.pt2"
    report = export_model(tiny, path, format="torch", dynamic_size=True)
    assert report.size_range == ((TINY_BOUND, None), (TINY_BOUND, None))
    shapes = list(report.errors)
    assert len(shapes) >= 3 and {b for b, _, _ in shapes} == {1, 3}
    assert any(h != w for _, h, w in shapes) and any(_padded(h, w) for _, h, w in shapes)
    assert any(not _padded(h, w) for _, h, w in shapes)
    assert report.max_error <= 1e-5, report.table()

    exported = load_exported(path)
    assert exported.input_range["height"] == [TINY_BOUND, None]
    x = torch.randn(2, 3, 130, 101)  # a size the check did not run
    with torch.no_grad():
        ref = tiny(x)
    assert ((exported(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    with pytest.raises(ExportError, match=rf"H >= {TINY_BOUND}, W >= {TINY_BOUND}.*H=64"):
        exported(torch.randn(1, 3, 64, 200))


def test_cli_exports_onnx_with_dynamic_size_in_the_standard_domain(tmp_path, capsys) -> None:
    path = tmp_path / "tiny.onnx"
    rc = cli_main(["export", "fastervit_0", "--random-weights", "--model-kwargs", TINY_JSON, "--format", "onnx",
                   "--output", str(path), "--fuse", "--dynamic-size"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out
    assert "below this file's range" not in captured.err  # 224 px model, H >= 97: its own size is in range
    rows = [line for line in out.splitlines() if line.startswith("(")]
    assert len(rows) >= 4 and all(float(row.split()[-1]) <= 1e-5 for row in rows), out
    assert "largest relative error" in out and f"H >= {TINY_BOUND}" in out

    assert onnx_domains(path) <= {"", "ai.onnx"}  # TensorRT takes the standard domain only
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[RANGE_KEY])["width"] == [TINY_BOUND, None]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 3 and isinstance(dims[2], str) and isinstance(dims[3], str)

    exported = load_exported(path)
    assert exported(torch.randn(2, 3, 100, 150)).shape == (2, 10)
    with pytest.raises(ExportError, match=rf"W >= {TINY_BOUND}"):
        exported(torch.randn(1, 3, 128, 90))


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if " note: " not in line]  # --random-weights says so on a line
    assert rc == 2
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("fastervit export: error: "), err
    assert match in err, err


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys) -> None:
    base = ["export", "fastervit_0", "--random-weights", "--model-kwargs", TINY_JSON]
    _one_line_error(capsys, [*base, "--format", "tflite", "--output", str(tmp_path / "m.tflite")], "--format")
    _one_line_error(capsys, [*base, "--output", str(tmp_path / "m.bin")], "cannot tell the format")
    _one_line_error(capsys, ["export", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "m.pt2")],
                    "does not exist")
    _one_line_error(capsys, ["export", "fastervit_9", "--output", str(tmp_path / "m.pt2")], "unknown")
    _one_line_error(capsys, [*base, "--output", str(tmp_path / "m.pt2"), "--dynamic-size", "--img-size", "64", "64"],
                    f"H, W >= {TINY_BOUND}")
    assert not list(tmp_path.iterdir())


def test_cli_fixed_size_from_a_weights_file_and_a_failing_check_exits_1(tiny, tmp_path, capsys,
                                                                        monkeypatch) -> None:
    import open_fastervit.deploy.export as export_module

    names = [f"class {i}" for i in range(10)]
    weights = save_weights(tiny, tmp_path / "tiny.safetensors", metadata={"model_kwargs": TINY, "class_names": names})
    path = tmp_path / "fixed.pt2"
    verify = export_module.verify_export
    monkeypatch.setattr(export_module, "verify_export", lambda *a, **k: {(1, 64, 80): 0.5})
    rc = cli_main(["export", str(weights), "--output", str(path), "--img-size", "64", "80"])
    captured = capsys.readouterr()
    assert rc == 1 and "check failed" in captured.err and "FAIL" in captured.out
    assert "was removed" in captured.err and not path.exists()  # no file on disk disagrees with its model

    monkeypatch.setattr(export_module, "verify_export", verify)
    assert cli_main(["export", str(weights), "--output", str(path), "--img-size", "64", "80"]) == 0
    exported = load_exported(path)  # the same export passing its real check stays
    assert exported.input_range["height"] == [64, 64] and exported.input_range["width"] == [80, 80]
    errors = verify(path, tiny)
    assert set(errors) == {(1, 64, 80), (3, 64, 80)} and max(errors.values()) <= 1e-5
    with pytest.raises(ExportError, match="fixed size"):
        exported(torch.randn(1, 3, 64, 96))
    # the file answers with the weights' class names and preprocessing, as the weights file does
    from open_fastervit import Predictor, load_model

    opened = load_model(path)
    assert opened.weights_info["class_names"] == names and opened.pretrained_cfg["input_size"] == (3, 64, 80)
    top = Predictor(path, device="cpu")([Image.new("RGB", (90, 70), (120, 30, 200))], topk=3)[0]
    assert top.labels == [names[i] for i in top.indices]


def test_jit_trace_is_refused_with_a_pointer_to_export(tiny) -> None:
    """``torch.jit.trace`` would bake sizes, dtype and device into the graph; the model says so up front."""
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"(?is)torch\.export.*onnx"):
        warnings.simplefilter("ignore")
        torch.jit.trace(tiny, torch.randn(1, 3, 64, 64))


def test_cli_notes_a_dynamic_range_above_the_models_own_size(tiny, tmp_path, capsys, monkeypatch) -> None:
    """A 64 px model exported with a dynamic size whose range starts above 64 px: the command says how to run it."""
    import open_fastervit.cli.export as export_cli
    from open_fastervit.deploy.export import ExportReport

    weights = save_weights(tiny, tmp_path / "tiny64.safetensors", metadata={"model_kwargs": TINY, "img_size": 64})
    fake = ExportReport(path=tmp_path / "m.onnx", format="onnx", dynamic_size=True, example_size=(225, 225),
                        size_range=((225, None), (225, None)), fused=True, errors={(1, 225, 225): 0.0})
    monkeypatch.setattr(export_cli, "export_model", lambda *a, **k: fake)  # the note, not the export, is tested
    assert cli_main(["export", str(weights), "--output", str(fake.path), "--dynamic-size"]) == 0
    err = capsys.readouterr().err
    assert "own input size 64x64 is below this file's range (B >= 1, H >= 225, W >= 225)" in err
    assert "--img-size 225 or more" in err

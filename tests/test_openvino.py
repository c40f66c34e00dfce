"""OpenVINO as a runtime: IR export and its check, int8 through NNCF, the .xml through load_model / predict /
validate / serve, bad files, precisions, the automatic choice of the fastest form, and export-failure cleanup."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY
from fastapi.testclient import TestClient

import open_fastervit
from open_fastervit.cli import main as cli_main
from open_fastervit.deploy import forms as forms_module
from open_fastervit.deploy.export import ExportError, export_model
from open_fastervit.deploy.forms import ChosenForm, choose_form
from open_fastervit.deploy.openvino import (
    OpenVINOError,
    OpenVINOModel,
    load_openvino,
    quantize_openvino,
    resolve_ov_precision,
)
from open_fastervit.deploy.quantize import calibration_images
from open_fastervit.deploy.serve import create_app, load_for_serving
from open_fastervit.fused import inference_form
from open_fastervit.inference import Predictor
from open_fastervit.paths import data_path
from open_fastervit.predict import predict
from open_fastervit.serialization import save_weights
from open_fastervit.validate import validate

DATA = data_path("tiny-imagenet-10")
SAMPLE = data_path("imagenet-sample-100-s256")
SIZE = 64
CLASSES = sorted(p.name for p in (DATA / "val").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("fastervit_0", **TINY).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, SIZE, SIZE)}
    return model


@pytest.fixture(scope="module")
def weights(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(tiny, path, {"class_names": CLASSES, "img_size": SIZE})
    return path


@pytest.fixture(scope="module")
def ir(weights, tmp_path_factory) -> Path:
    """``fastervit export`` of the tiny model (with class names) to an IR at 64 px."""
    path = tmp_path_factory.mktemp("ir") / "tiny.xml"
    assert cli_main(["export", str(weights), "-o", str(path), "--fuse"]) == 0
    return path


def test_ir_answers_as_torch_at_several_sizes(tiny, ir, tmp_path) -> None:
    # the fixture's fixed 64 px file was checked at batch 1 and 3 by export; here a dynamic height/width file
    # (bound 97) is checked at the bound (square), two non-square padded sizes and an unpadded size, batch 1 and 3
    fixed = load_openvino(ir)
    x = torch.randn(3, 3, SIZE, SIZE)
    assert (fixed(x) - tiny(x)).abs().max().item() <= 1e-5  # measured: about 1e-7
    report = export_model(tiny, tmp_path / "dynamic.xml", dynamic_size=True, fuse=True)
    assert report.format == "openvino" and len(report.errors) == 4 and {b for b, _, _ in report.errors} == {1, 3}
    assert any(h != w for _, h, w in report.errors)
    assert report.max_error <= 1e-5, report.table()
    dynamic = load_openvino(tmp_path / "dynamic.xml")
    assert dynamic.input_range["height"] == [97, None] and dynamic.input_range["batch"] == [1, None]
    with pytest.raises(OpenVINOError, match="H >= 97"):
        dynamic(torch.randn(1, 3, 64, 64))


def test_ir_carries_the_metadata_and_loads_everywhere(ir, weights) -> None:
    model = open_fastervit.load_model(ir)
    assert isinstance(model, OpenVINOModel) and model.precision == "fp32" and not model.int8
    assert model.num_classes == 10 and model.class_names == CLASSES
    assert model.pretrained_cfg["architecture"] == "fastervit_0" and model.data_config["input_size"] == (3, 64, 64)
    assert model.weights_info["weights"] == "openvino fp32" and not list(model.parameters())
    images = sorted((DATA / "val").glob("*/*"))[:6]
    fp32 = predict(images, checkpoint=weights, device="cpu", topk=3)
    got = predict(images, checkpoint=ir, device="cpu", topk=3)
    assert [p.indices for p in got] == [p.indices for p in fp32] and got[0].labels[0] in CLASSES
    assert np.allclose([p.probs for p in got], [p.probs for p in fp32], atol=1e-5)
    summary = validate(None, DATA, checkpoint=ir, device="cpu", batch_size=100, workers=0)
    reference = validate(None, DATA, checkpoint=weights, device="cpu", batch_size=100, workers=0)
    assert summary["top1"] == pytest.approx(reference["top1"]) and summary["count"] == 500
    served = load_for_serving(str(ir))
    with TestClient(create_app(served, topk=3, device="cpu")) as client:
        answer = client.post("/predict", files={"file": (images[0].name, images[0].read_bytes())})
        assert answer.status_code == 200, answer.text
        assert answer.json()["indices"] == fp32[0].indices


def test_bad_files_get_clear_errors(ir, tiny, tmp_path) -> None:
    lone = tmp_path / "lone.xml"
    lone.write_bytes(ir.read_bytes())
    with pytest.raises(OpenVINOError, match=r"no weights file lone\.bin"):
        open_fastervit.load_model(lone)
    junk = tmp_path / "junk.xml"
    junk.write_text("<not an ir/>")
    junk.with_suffix(".bin").write_bytes(b"\0" * 8)
    with pytest.raises(OpenVINOError, match=r"junk\.xml is not an OpenVINO IR \(its \.xml has no <net> element\)"):
        open_fastervit.load_model(junk)
    text = tmp_path / "notes.xml"  # a text file renamed .xml, a .bin beside it: refused before OpenVINO parses it
    text.write_text("just some words\n")
    text.with_suffix(".bin").write_bytes(b"\0" * 8)
    with pytest.raises(OpenVINOError, match=r"notes\.xml is not an OpenVINO IR \(its \.xml has no <net>"):
        open_fastervit.load_model(text)
    broken = tmp_path / "broken.xml"  # looks like an IR, is not one OpenVINO can read
    broken.write_text('<?xml version="1.0"?>\n<net name="x" version="11"><layers><layer id="0"')
    broken.with_suffix(".bin").write_bytes(b"\0" * 8)
    with pytest.raises(OpenVINOError, match=r"broken\.xml is not an OpenVINO IR OpenVINO can read \(.+\)"):
        open_fastervit.load_model(broken)
    foreign = tmp_path / "foreign.xml"  # a valid IR without our rt_info section
    foreign.write_text(re.sub(r"<rt_info>.*</rt_info>", "", ir.read_text(), flags=re.S))
    foreign.with_suffix(".bin").write_bytes(ir.with_suffix(".bin").read_bytes())
    with pytest.raises(OpenVINOError, match="not written by open_fastervit"):
        open_fastervit.load_model(foreign)
    with pytest.raises(OpenVINOError, match="does not exist"):
        load_openvino(tmp_path / "missing.xml")


def test_precisions_follow_the_cpu() -> None:
    assert resolve_ov_precision("fp32", set()) == "fp32"
    assert resolve_ov_precision("auto", {"FP32", "BF16"}) == "bf16"
    assert resolve_ov_precision("auto", {"FP32", "INT8"}) == "fp32"  # falls back, with a note
    assert resolve_ov_precision("fp16", {"FP32", "FP16"}) == "fp16"
    with pytest.raises(OpenVINOError, match="no native bf16"):
        resolve_ov_precision("bf16", {"FP32", "INT8"})
    with pytest.raises(OpenVINOError, match="precision must be one of"):
        resolve_ov_precision("int4", {"FP32"})


def test_quantize_refuses_other_outputs(weights, tmp_path) -> None:
    with pytest.raises(ValueError, match="must be a .xml"):
        quantize_openvino(weights, DATA / "train", tmp_path / "x.bin")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        quantize_openvino(weights, DATA / "train", tmp_path / "no" / "x.xml")


@pytest.mark.parametrize("suffix", [".pt2", ".xml"])  # .onnx takes the same path (remove_written)
def test_a_file_failing_its_check_is_removed(tiny, tmp_path, suffix) -> None:
    path = tmp_path / f"model{suffix}"
    with pytest.raises(ExportError, match="was removed") as info:
        export_model(tiny, path, example_size=(SIZE, SIZE), fuse=True, tolerance=-1.0)  # no error can pass
    assert info.value.report.errors and not path.exists()
    assert not path.with_suffix(".bin").exists() and not list(tmp_path.iterdir())


def test_auto_choice_runs_answers_as_fp32_and_is_cached(tiny, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "forms.json"
    fused = inference_form(copy.deepcopy(tiny))
    fused.weights_info = {"weights": "random"}
    real_time = forms_module._time
    checks = Predictor(tiny, device="cpu").preprocess(calibration_images(SAMPLE, 8).pictures)
    chosen = choose_form(fused, batch_size=4, check_images=checks, cache=cache, rounds=2)
    assert isinstance(chosen, ChosenForm) and not chosen.cached
    assert chosen.name in {"torch fp32", "openvino fp32", "torch bf16", "openvino bf16"}
    assert set(chosen.timings) >= {"torch fp32", "openvino fp32"} and chosen.name in chosen.reason
    with torch.no_grad():
        assert torch.equal(chosen.module(checks).argmax(1), tiny(checks).argmax(1))
    assert chosen.module.weights_info["weights"] == {"torch fp32": "random",
                                                     "openvino fp32": "random (openvino fp32)"}[chosen.name]
    # the cache's logic from here on: the torch model stands in for the OpenVINO candidate (no conversion)
    monkeypatch.setattr(forms_module, "from_torch", lambda model, **kwargs: model)
    timed = []
    monkeypatch.setattr(forms_module, "_time", lambda *a, **k: timed.append(1) or {})
    again = choose_form(fused, batch_size=4, check_images=checks, cache=cache, rounds=2)
    assert again.cached and again.name == chosen.name and not timed and "cached" in again.reason
    monkeypatch.setattr(forms_module, "_time", real_time)
    cache.write_text("{not json")  # a corrupt cache is ignored (and rewritten)
    fresh = choose_form(fused, batch_size=4, check_images=checks, cache=cache, rounds=1)
    assert not fresh.cached and json.loads(cache.read_text())["version"] == 1
    cache.write_text(json.dumps({"version": 1, "entries": {k: {"form": "gone"} for k in
                                                           json.loads(cache.read_text())["entries"]}}))
    assert not choose_form(fused, batch_size=4, check_images=checks, cache=cache, rounds=1).cached  # stale entry
    only_torch = choose_form(tiny, runtime="torch", precision="fp32", cache=False)
    assert only_torch.name == "torch fp32" and only_torch.module is tiny
    with pytest.raises(ValueError, match="runtime must be one of"):
        choose_form(tiny, runtime="tensorflow")


def test_predict_cli_runtime_options(weights, ir, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTERVIT_FORMS_CACHE", str(tmp_path / "forms.json"))
    images = [str(p) for p in sorted((DATA / "val").glob("*/*"))[:2]]
    assert cli_main(["predict", *images, "-c", str(weights), "--runtime", "torch", "--precision", "fp32",
                     "--json"]) == 0
    captured = capsys.readouterr()
    assert "runtime torch fp32 (only candidate" in captured.err and len(captured.out.splitlines()) == 2
    assert cli_main(["predict", *images, "-c", str(ir), "--json"]) == 0
    assert "openvino fp32 (the file's own form)" in capsys.readouterr().err
    assert cli_main(["predict", *images, "-c", str(ir), "--runtime", "onnxruntime"]) == 1
    assert "runs with runtime openvino" in capsys.readouterr().err

"""The one inference path (``open_fastervit.inference.Predictor``): the same answers as the model called by hand, from
every source the loader takes, and a clear error for each bad source or argument."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

import open_fastervit
from open_fastervit import CheckpointError
from open_fastervit.data import read_image
from open_fastervit.deploy.quantize import quantize_model
from open_fastervit.inference import Predictor, TopK, data_config_for
from open_fastervit.loading import file_types, register_file_type
from open_fastervit.paths import data_path

TINY = dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3))
SMALL = dict(dim=32, in_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
SIZE = 64
DATA = data_path("tiny-imagenet-10")


def tiny(seed: int = 0) -> torch.nn.Module:
    """A random 10-class FasterViT with a scaled-up head, so that images get clearly different answers."""
    torch.manual_seed(seed)
    model = open_fastervit.load_model("fastervit_0", pretrained=False, model_kwargs=TINY, num_classes=10)
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            p.mul_(40)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> list[Path]:
    folders = sorted(p for p in (DATA / "val").iterdir() if p.is_dir())
    return [sorted(folder.iterdir())[0] for folder in folders[:6]]


def by_hand(model: torch.nn.Module, images: list[Path], config: dict | None = None) -> torch.Tensor:
    """The logits of ``model`` on ``images`` with timm's evaluation transform (of ``config``, default the model's at
    ``SIZE`` px), written out without the Predictor."""
    transform = create_transform(**(config or resolve_data_config(args={"img_size": SIZE}, model=model)))
    with torch.no_grad():
        return model(torch.stack([transform(read_image(p)) for p in images])).float()


def test_same_answers_as_the_model_called_by_hand(images) -> None:
    model = tiny()
    want = by_hand(model, images)
    predictor = Predictor(model, img_size=SIZE, device="cpu", batch_size=4)
    assert predictor.model is model and not predictor.loaded  # a module is used as given
    assert predictor.data_config["input_size"] == (3, SIZE, SIZE)
    batch = predictor.preprocess(images)
    assert batch.shape == (len(images), 3, SIZE, SIZE) and batch.dtype == torch.float32
    logits = predictor.infer(batch)
    assert logits.shape == (len(images), 10) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, want)
    tops = predictor(images, topk=3)  # two forward passes (batch_size 4)
    probs, indices = want.softmax(-1).topk(3, dim=-1)
    assert all(isinstance(t, TopK) for t in tops)
    assert [t.indices for t in tops] == indices.tolist()
    assert [t.labels for t in tops] == [[str(i) for i in row] for row in indices.tolist()]
    torch.testing.assert_close(torch.tensor([t.probs for t in tops]), probs)
    assert len(predictor(images[:1], topk=50)[0].indices) == 10  # k is capped at the class count
    names = [f"class {i}" for i in range(10)]
    assert Predictor(model, img_size=SIZE, device="cpu", classes=names)(images[:1])[0].labels[0] == \
        names[indices[0, 0]]


def test_precision_and_inference_form(images) -> None:
    model = tiny()
    want = by_hand(model, images)
    bf16 = Predictor(model, img_size=SIZE, device="cpu", amp="bf16")
    assert bf16.amp_dtype == torch.bfloat16
    got = bf16.infer(bf16.preprocess(images))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.1 * want.abs().max().item())
    fused = Predictor("fastervit_0", pretrained=False, model_kwargs=TINY, device="cpu", img_size=SIZE)
    plain = Predictor("fastervit_0", pretrained=False, model_kwargs=TINY, device="cpu", img_size=SIZE, fuse=False)
    assert fused.loaded and not list(fused.model.parameters())  # the inference form: a snapshot
    assert list(plain.model.parameters())
    assert fused.info["weights"] == "random" and fused.model.weights_info["weights"] == "random"


def test_every_source_type(tmp_path: Path, images, oracle) -> None:
    reference = tiny()
    want = by_hand(reference, images)
    meta = {"model_kwargs": TINY, "img_size": SIZE}
    sources: dict[str, Path | str] = {}
    sources["safetensors"] = open_fastervit.save_weights(reference, tmp_path / "w.safetensors", metadata=meta)
    training = tmp_path / "last.pt"  # the layout `fastervit train` writes: arch, config, raw + EMA weights
    torch.save({"format": "open_fastervit.train", "arch": "fastervit_0",
                "config": {"model": "fastervit_0", "model_kwargs": TINY, "img_size": SIZE},
                "state_dict": tiny(seed=1).state_dict(), "state_dict_ema": reference.state_dict()}, training)
    sources["training checkpoint"] = training
    run = tmp_path / "run"  # a run folder: its best.safetensors
    run.mkdir()
    open_fastervit.save_weights(reference, run / "best.safetensors", metadata=meta)
    (run / "config.json").write_text(json.dumps({"model": "fastervit_0", "model_kwargs": TINY, "img_size": SIZE}))
    sources["run folder"] = run
    sources["Hugging Face folder"] = open_fastervit.save_pretrained(reference, tmp_path / "hf", model_card=False,
                                                                    model_args=TINY)
    sources["exported .pt2"] = tmp_path / "m.pt2"
    open_fastervit.export_model(reference, sources["exported .pt2"], example_size=(SIZE, SIZE))
    sources["exported .onnx"] = tmp_path / "m.onnx"
    open_fastervit.export_model(reference, sources["exported .onnx"], example_size=(SIZE, SIZE))
    for name, source in sources.items():
        predictor = Predictor(source, device="cpu", img_size=SIZE)
        assert predictor.num_classes == 10, name
        got = predictor.infer(predictor.preprocess(images))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=name)
        assert [t.indices[0] for t in predictor(images, topk=1)] == want.argmax(-1).tolist(), name
    assert Predictor(sources["exported .pt2"], device="cpu").data_config["input_size"] == (3, SIZE, SIZE)
    assert Predictor(training, device="cpu", use_ema=False, img_size=SIZE).info["weights"] == "raw"

    # an official .pth.tar (the official package builds it), keys converted on load
    torch.manual_seed(0)
    official = timm.create_model("faster_vit_0_224", resolution=224, **SMALL).eval()
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": official.state_dict(), "args": argparse.Namespace(model="faster_vit_0_224")}, path)
    predictor = Predictor(path, device="cpu", model_kwargs=SMALL)  # 224 px: the official model's pooling is fixed
    assert predictor.info["weights"].startswith("official")
    want_official = by_hand(official, images, predictor.data_config)
    torch.testing.assert_close(predictor.infer(predictor.preprocess(images)), want_official, rtol=1e-4,
                               atol=1e-4 * want_official.abs().max().item())

    # the int8 file of `fastervit quantize`: its own preprocessing; answers close to the fp32 model's
    int8 = quantize_model(sources["safetensors"], DATA / "train", tmp_path / "m.int8.onnx", num_calib=16)
    predictor = Predictor(int8, device="cpu")
    assert predictor.info["weights"] == "int8" and predictor.data_config["input_size"] == (3, SIZE, SIZE)
    got = predictor.infer(predictor.preprocess(images))
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_bad_sources_and_arguments_give_clear_errors(tmp_path: Path, images) -> None:
    odd = tmp_path / "weights.xyz"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown file type \.xyz; load_model takes \.safetensors.*\.pt2"):
        Predictor(odd)
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="unknown FasterViT model 'fastervit_99'"):
        Predictor("fastervit_99")
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="onnxruntime cannot open"):
        Predictor(bad_onnx)
    model = tiny()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Predictor(model, batch_size=0)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Predictor(model, device="gpu")
    with pytest.raises(ValueError, match="amp must be one of"):
        Predictor(model, amp="int4")
    predictor = Predictor(model, device="cpu", img_size=SIZE)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        predictor(images, topk=0)
    with pytest.raises(ValueError, match="no images"):
        predictor.preprocess([])
    with pytest.raises(ValueError, match="3 class names given for a model with 10 outputs"):
        _ = Predictor(model, classes=["a", "b", "c"]).class_names
    with pytest.raises(FileNotFoundError):
        predictor.preprocess([tmp_path / "gone.jpg"])
    # a runtime file's head is fixed
    exported = tmp_path / "m.pt2"
    open_fastervit.export_model(model, exported, example_size=(SIZE, SIZE))
    with pytest.raises(CheckpointError, match="fixed 10-class head"):
        open_fastervit.load_model(exported, num_classes=5)


def test_runtimes_register_their_file_types() -> None:
    types = file_types()
    assert list(types)[:2] == [".safetensors", ".pt"] and ".onnx" in types and ".pt2" in types
    with pytest.raises(ValueError, match="starts with '.'"):
        register_file_type("onnx", lambda path: torch.nn.Identity(), "x")
    with pytest.raises(ValueError, match="read by load_model itself"):
        register_file_type(".pt", lambda path: torch.nn.Identity(), "x")


def test_data_config_for_layers_metadata_then_overrides() -> None:
    model = tiny()
    assert data_config_for(model)["input_size"] == (3, 224, 224)
    assert data_config_for(model, {"img_size": SIZE})["input_size"] == (3, SIZE, SIZE)
    stored = {"data_config": {"input_size": [3, 96, 96], "crop_pct": 1.0}}
    assert data_config_for(model, stored)["input_size"] == (3, 96, 96)
    config = data_config_for(model, stored, img_size=SIZE, crop_pct=None)
    assert config["input_size"] == (3, SIZE, SIZE) and config["crop_pct"] == 1.0

"""One way to load a model: ``open_fastervit.load_model`` and every route that leads into it (``load_official``,
``load_weights``, ``timm.create_model`` with a ``file`` overlay or a ``local-dir:`` folder, the commands)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models._manipulate import adapt_input_conv

import open_fastervit
from open_fastervit import CheckpointError, load_model, load_official, load_weights
from open_fastervit.cli import predict as predict_cli
from open_fastervit.cli import validate as validate_cli
from open_fastervit.paths import data_path

SMALL = dict(dim=32, in_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
X = (1, 3, 64, 64)


class NotAllowed:
    """A pickled object outside the allow-list."""


def ours(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_fastervit.create_model("fastervit_0", num_classes=num_classes, **SMALL).eval()


@pytest.fixture()
def official_file(oracle, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """An official-layout .pth.tar (the official package builds it: the oracle), as the authors' files are."""
    torch.manual_seed(0)
    model = timm.create_model("faster_vit_0_224", resolution=224, **SMALL).eval()
    path = tmp_path / "fastervit_small.pth.tar"
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "args": argparse.Namespace(model="faster_vit_0_224")},
               path)
    return path, model


# ---- issue 12 item 5: in_chans adapts the RGB stem as timm's loader does ------------------------------------------


def test_official_file_with_in_chans_adapts_the_stem(official_file, caplog) -> None:
    """Before: load_official("fastervit_0", FILE, in_chans=1) refused the file ("another architecture?")."""
    path, official = official_file
    rgb = official.patch_embed.conv_down[0].weight.detach()
    one = load_official("fastervit_0", path, in_chans=1, **SMALL)
    assert one.stem.conv1.weight.shape == (rgb.shape[0], 1, *rgb.shape[2:])
    torch.testing.assert_close(one.stem.conv1.weight, rgb.sum(dim=1, keepdim=True))  # the sum over the RGB kernels
    assert "adapted from 3 to 1 input channels" in caplog.text
    five = load_official("fastervit_0", path, in_chans=5, **SMALL)
    torch.testing.assert_close(five.stem.conv1.weight, adapt_input_conv(5, rgb.clone()))
    # the same weights, reported, through the one door and through timm's own file route
    door = load_model(path, architecture="fastervit_0", in_chans=1, model_kwargs=SMALL)
    assert door.weights_info["in_chans"] == "3 -> 1" and door.weights_info["weights"] == "official raw"
    via_timm = timm.create_model("fastervit_0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 in_chans=1, **SMALL)
    for model in (door, via_timm):
        torch.testing.assert_close(model.stem.conv1.weight, one.stem.conv1.weight)
    # every other weight is the official one: a grey image gives the RGB model's output for the image repeated
    grey = torch.randn(1, 1, 224, 224)  # the official model is built for its resolution
    with torch.no_grad():
        torch.testing.assert_close(one.eval()(grey), official(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


# ---- issue 12 item 8: corrupt or unsafe files give the same clear message through every route ---------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": ours().state_dict()}, good)
    data = good.read_bytes()
    files = {
        "empty": (b"", "is not a readable PyTorch checkpoint"),
        "truncated zip": (data[: len(data) // 2], "is not a readable PyTorch checkpoint"),
        "random bytes": (bytes(random.Random(0).randrange(256) for _ in range(4096)).replace(b"\x80", b"\x00"),
                         "is not a readable PyTorch checkpoint"),
    }
    out = {}
    for i, (name, (payload, fragment)) in enumerate(files.items()):
        path = tmp_path / f"bad{i}.pth.tar"
        path.write_bytes(payload)
        out[name] = (path, fragment)
    unsafe = tmp_path / "unsafe.pth.tar"
    torch.save({"state_dict": ours().state_dict(), "extra": NotAllowed()}, unsafe)
    out["unsafe global"] = (unsafe, "refusing to load")
    return out


def test_every_route_gives_the_same_clear_error(tmp_path: Path, capsys) -> None:
    """Before: timm's file route raised EOFError('') for the empty file and raw torch errors for the others."""
    image = tmp_path / "cat.png"
    Image.new("RGB", (72, 72), (120, 80, 40)).save(image)
    kwargs = json.dumps(SMALL)
    for name, (path, fragment) in _bad_files(tmp_path).items():
        routes = {
            "load_model": lambda p=path: load_model(p, architecture="fastervit_0", model_kwargs=SMALL),
            "load_official": lambda p=path: load_official("fastervit_0", p, **SMALL),
            "load_weights": lambda p=path: load_weights(ours(), p),
            "timm file": lambda p=path: timm.create_model(
                "fastervit_0", pretrained=True, pretrained_cfg_overlay=dict(file=str(p)), **SMALL),
            "timm file custom_load": lambda p=path: timm.create_model(
                "fastervit_0", pretrained=True, pretrained_cfg_overlay=dict(file=str(p), custom_load=True), **SMALL),
        }
        for route, call in routes.items():
            with pytest.raises(CheckpointError) as err:
                call()
            assert fragment in str(err.value) and str(path) in str(err.value), (name, route, str(err.value))
        assert validate_cli.main([str(data_path("tiny-imagenet-10")), "--checkpoint", str(path),
                                  "--model-kwargs", kwargs]) == 1
        assert fragment in capsys.readouterr().err, (name, "validate")
        assert predict_cli.main([str(image), "--checkpoint", str(path), "--model-kwargs", kwargs]) == 1
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, (name, "predict")


# ---- the sources load_model takes, and the head policy -----------------------------------------------------------


def test_sources_give_the_same_weights(tmp_path: Path) -> None:
    reference = ours()
    x = torch.randn(X)
    want = reference(x)
    safe = open_fastervit.save_weights(reference, tmp_path / "w.safetensors", metadata={"model_kwargs": SMALL})
    run = tmp_path / "last.pt"  # the layout `fastervit train` writes (arch, config, raw + EMA weights)
    torch.save({"format": "open_fastervit.train", "arch": "fastervit_0",
                "config": {"model": "fastervit_0", "model_kwargs": SMALL},
                "state_dict": ours(seed=1).state_dict(), "state_dict_ema": reference.state_dict()}, run)
    folder = tmp_path / "hf"  # the Hugging Face / timm layout: config.json + model.safetensors
    folder.mkdir()
    save_file(reference.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "fastervit_0", "num_classes": 10, "num_features": 256,
        "model_args": {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()},
        "pretrained_cfg": {"input_size": [3, 64, 64], "crop_pct": 1.0, "interpolation": "bicubic",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 10,
                           "classifier": "head.fc", "first_conv": "stem.conv1"},
    }))
    loaded = {
        "safetensors": load_model(safe),
        "training checkpoint (EMA)": load_model(run),
        "folder": load_model(folder),
        "timm local-dir": timm.create_model(f"local-dir:{folder}", pretrained=True).eval(),
    }
    for name, model in loaded.items():
        assert model.num_classes == 10, name
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, msg=name)
    assert loaded["training checkpoint (EMA)"].weights_info["weights"] == "ema"
    raw = load_model(run, use_ema=False)
    with torch.no_grad():
        torch.testing.assert_close(raw(x), ours(seed=1)(x))
    assert loaded["folder"].pretrained_cfg["input_size"] == (3, 64, 64)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown FasterViT model .fastervit_99.; did you mean"):
        load_model("fastervit_99", pretrained=False)


def test_head_policy(tmp_path: Path, caplog) -> None:
    reference = ours()
    path = open_fastervit.save_weights(reference, tmp_path / "w.safetensors", metadata={"model_kwargs": SMALL})
    kept = load_model(path)  # keep: the checkpoint's 10 classes
    assert kept.num_classes == 10 and kept.weights_info["reinitialized"] == []
    torch.testing.assert_close(kept.head.fc.weight, reference.head.fc.weight)
    with pytest.raises(CheckpointError, match="10-class classifier but num_classes=7"):
        load_model(path, num_classes=7)  # keep + another class count: an error, not a silent fresh head
    resized = load_model(path, num_classes=7, head="resize")
    assert resized.num_classes == 7 and resized.weights_info["reinitialized"] == ["head.fc.weight", "head.fc.bias"]
    assert "re-initialised" in caplog.text
    torch.testing.assert_close(resized.stem.conv1.weight, reference.stem.conv1.weight)
    same = load_model(path, num_classes=10, head="resize")  # same count: the checkpoint's head
    torch.testing.assert_close(same.head.fc.weight, reference.head.fc.weight)
    fresh = load_model(path, head="reinit")
    assert fresh.num_classes == 10 and fresh.weights_info["reinitialized"] == ["head.fc.weight", "head.fc.bias"]
    assert not torch.equal(fresh.head.fc.weight, reference.head.fc.weight)
    with pytest.raises(ValueError, match="head must be one of"):
        load_model(path, head="sometimes")


def test_published_weights_offline_say_how_to_pass_a_file(tmp_path: Path, monkeypatch) -> None:
    """Issue 12 item 11, the loader's side: no network and nothing cached -> one clear error, in every route."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for call in (lambda: load_model("fastervit_0"), lambda: timm.create_model("fastervit_0", pretrained=True)):
        with pytest.raises(CheckpointError) as err:
            call()
        text = str(err.value)
        assert "cannot be had: HF_HUB_OFFLINE is set" in text and "--checkpoint FILE" in text
        assert str(tmp_path / "hub") in text and "--random-weights" in text
    model = load_model("fastervit_0", pretrained=False, model_kwargs=SMALL)  # random only when asked by name
    assert model.weights_info["weights"] == "random"


# ---- new-user review: one run's files agree, non-default models round-trip, clear refusals ----------------------


def test_every_file_of_a_training_run_gives_the_same_size_and_labels(tmp_path: Path) -> None:
    """Review item 1: ``last.pt`` gave no img_size / class_names (224 px, indices); expected: 32 and the names of
    the run's classes, as ``best.safetensors`` and ``last_ema.safetensors`` give."""
    from open_fastervit.inference import data_config_for
    from open_fastervit.tasks.classification import TrainConfig
    from open_fastervit.train import train

    data = data_path("tiny-imagenet-10")
    arch = dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3))
    train(TrainConfig(model="fastervit_0", model_kwargs=arch, data=str(data), img_size=32, train_images=16,
                      val_images=8, batch_size=8, epochs=1, warmup_epochs=0, workers=0, threads=1, progress=False,
                      tensorboard=False, model_ema=True, output=str(tmp_path)))
    expected_names = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    for name in ("last.pt", "best.safetensors", "last_ema.safetensors"):
        model = load_model(tmp_path / name)
        info = model.weights_info
        assert int(info["img_size"]) == 32, name
        assert info["class_names"] == expected_names, name
        assert data_config_for(model, info)["input_size"] == (3, 32, 32), name


def test_save_weights_records_the_architecture_arguments(tmp_path: Path) -> None:
    """Review item 2: a non-default model saved without metadata did not load back (shape error); expected: its
    architecture arguments stored as model_kwargs (not num_classes / drop rates) and the same outputs."""
    model = timm.create_model("fastervit_0", dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4),
                              window_size=(7, 7, 3, 3), num_classes=10, drop_path_rate=0.1).eval()
    path = open_fastervit.save_weights(model, tmp_path / "t.safetensors")
    loaded = load_model(path)
    assert loaded.weights_info["model_kwargs"] == {
        "dim": 16, "in_dim": 8, "depths": [1, 1, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": [7, 7, 3, 3]}
    assert loaded.num_classes == 10
    x = torch.randn(X)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_misfit_of_the_named_architecture_suggests_model_kwargs(tmp_path: Path) -> None:
    """Review item 2: 'is it for another architecture?' for a file naming the model's own architecture; expected:
    the hint that its architecture arguments differ, with model_kwargs."""
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in ours().state_dict().items()}, path,
              metadata={"architecture": "fastervit_0"})
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    text = str(err.value)
    assert "architecture arguments differ" in text and "model_kwargs" in text
    assert "another architecture" not in text


def test_save_weights_refuses_the_inference_form(tmp_path: Path) -> None:
    """Review item 3: a fused model was written silently (a file nothing loads); expected: ValueError, no file."""
    from open_fastervit.fused import inference_form

    fused = inference_form(ours())
    with pytest.raises(ValueError, match=r"this is the inference form \(fuse\(\)/inference_form"):
        open_fastervit.save_weights(fused, tmp_path / "fused.safetensors")
    assert not (tmp_path / "fused.safetensors").exists()


def test_unreadable_checkpoint_errors_are_short(tmp_path: Path) -> None:
    """Review item 7: torch's ANSI codes and advice to load untrusted files with weights_only=False, and miniz's
    ~300-character paragraph; expected: the offending global named, one sentence, no advice."""
    files = _bad_files(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model(files["unsafe global"][0], model_kwargs=SMALL)
    text = str(err.value)
    assert "NotAllowed" in text and "\x1b" not in text and "weights_only=False" not in text
    assert "trust" not in text and len(text) < 300
    with pytest.raises(CheckpointError) as err:
        load_model(files["truncated zip"][0], model_kwargs=SMALL)
    text = str(err.value)
    assert text.endswith("failed finding central directory.") and "miniz" not in text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    """Review item 8: files were 0600 (mkstemp); expected: 0666 & ~umask (0644 / 0640), and an existing file's mode
    kept, as open(path, "w") does."""
    import os
    import stat

    from open_fastervit.serialization import atomic_write

    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        os.chmod(path, 0o600)
        atomic_write(path, lambda tmp: Path(tmp).write_text("y"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_architecture_other_than_the_files(tmp_path: Path, caplog, capsys) -> None:
    """Review item 9: --model fastervit_1 with a fastervit_0 file was taken silently; expected: a warning naming
    both when the weights fit, an error naming the file's architecture when they do not."""
    path = open_fastervit.save_weights(ours(), tmp_path / "w.safetensors")
    with caplog.at_level("WARNING", logger="open_fastervit.loading"):
        model = load_model(path, architecture="fastervit_1")
    assert model.weights_info["file_architecture"] == "fastervit_0"
    assert "names architecture fastervit_0 but fastervit_1 was asked for" in caplog.text
    with pytest.raises(CheckpointError, match="holds a fastervit_0 .*not a fastervit_3"):
        load_model(path, architecture="fastervit_3")  # layer scales: the weights do not fit
    assert validate_cli.main([str(data_path("tiny-imagenet-10")), "-c", str(path), "--model", "fastervit_3"]) == 1
    assert "holds a fastervit_0" in capsys.readouterr().err

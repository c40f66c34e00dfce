"""Training API and CLI: recipe features end to end, outputs, fine-tuning, recipes, clear failures."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import timm
import torch
from conftest import TINY, settings_argv
from safetensors.torch import load_file

import open_fastervit
from open_fastervit.cli.train import build_parser, config_from_args, main
from open_fastervit.data import DatasetError
from open_fastervit.paths import data_path
from open_fastervit.recipes import list_recipes, load_recipe
from open_fastervit.tasks.classification import TrainConfig
from open_fastervit.train import TrainingDiverged, effective_lr, train
from open_fastervit.train.checkpoint import load_checkpoint

DATA = str(data_path("tiny-imagenet-10"))
ARCH = {k: v for k, v in TINY.items() if k not in ("num_classes", "drop_path_rate")}
QUICK = dict(
    model="fastervit_0", model_kwargs=ARCH, data=DATA, img_size=32, train_images=64, val_images=32, batch_size=8,
    epochs=1, warmup_epochs=0, lr=1e-3, workers=0, threads=1, progress=False, tensorboard=False,
)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """One epoch with the recipe's machinery on: LAMB + layer decay, accumulation, RandAugment, random
    erasing, mixup/cutmix + smoothing, drop path, EMA, MESA from the start, clipping, bf16 autocast,
    channels_last, gradient checkpointing, TensorBoard and the progress bar."""
    out = tmp_path_factory.mktemp("recipe")
    cfg = TrainConfig(**{
        **QUICK, "output": str(out), "epochs": 2, "warmup_epochs": 1, "accum_steps": 2, "opt": "lamb",
        "layer_decay": 0.8, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0,
        "drop_path": 0.1, "model_ema": True, "ema_decay": 0.9, "mesa": 1.0, "mesa_start": 0.0, "clip_grad": 1.0,
        "amp": "bf16", "channels_last": True, "grad_checkpointing": True, "tensorboard": True, "progress": True,
        "log_interval": 1, "workers": 2,
    })
    return cfg, train(cfg)


def test_recipe_run_writes_every_output(recipe_run, capsys):
    cfg, result = recipe_run
    assert result["epochs"] == 2 and result["global_step"] == 2 * 64 // 16 and result["global_batch"] == 16
    for key in ("best_checkpoint", "last_checkpoint", "ema_checkpoint", "resume_checkpoint", "summary_csv",
                "curves_png"):
        assert open(result[key], "rb").read(4), key
    assert open(result["curves_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = open(result["summary_csv"]).read().splitlines()
    assert rows[0].startswith("epoch,train_loss,lr") and "ema_top1" in rows[0] and len(rows) == 3
    assert 0 <= result["final_top1"] <= 100 and math.isfinite(result["final"]["train_loss"])
    columns = rows[0].split(",")
    top1 = [(float(r.split(",")[columns.index("top1")]), float(r.split(",")[columns.index("ema_top1")]))
            for r in rows[1:]]
    assert result["best_top1"] == max(max(pair) for pair in top1)  # the better of raw and EMA (issue 12)
    assert result["best_weights"] in ("raw", "ema") and "selected_weights" in columns

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(result["tensorboard"])
    events.Reload()
    assert {"train/loss", "train/lr", "epoch/ema_top1"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == result["global_step"]


def test_saved_weights_reproduce_the_reported_accuracy(recipe_run):
    """The EMA weights in last_ema.safetensors score exactly the EMA top-1 of the final epoch."""
    from open_fastervit.data import LoaderOptions, build_eval_loader, open_dataset
    from open_fastervit.tasks.classification.task import classification_transforms as _transforms
    from open_fastervit.train.loader import subset_indices as _subset
    from open_fastervit.validate import evaluate

    cfg, result = recipe_run
    model = timm.create_model("fastervit_0", **ARCH, num_classes=10)
    open_fastervit.load_weights(model, result["ema_checkpoint"])
    val = open_dataset(DATA, "val", is_training=False)
    loader = build_eval_loader(val, _transforms(cfg, model)[1], 8, LoaderOptions(workers=0),
                               indices=_subset(len(val), cfg.val_images, cfg.seed))
    metrics = evaluate(model, loader, amp_dtype=torch.bfloat16)
    assert metrics["count"] == 32
    assert metrics["top1"] == pytest.approx(result["final"]["ema_top1"], abs=1e-6)
    ema, plain = load_file(result["ema_checkpoint"]), load_file(result["last_checkpoint"])
    assert not torch.equal(ema["head.fc.weight"], plain["head.fc.weight"])


def test_finetune_from_own_checkpoint_new_classes_any_size(recipe_run, tmp_path, capsys, monkeypatch):
    """lr 0 keeps the loaded weights: every parameter but the re-initialised 12-class head is the source EMA."""
    _, source = recipe_run
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn on a terminal only
    cfg = TrainConfig(**{**QUICK, "output": str(tmp_path), "pretrained": source["resume_checkpoint"],
                         "num_classes": 12, "img_size": 48, "lr": 0.0, "min_lr": 0.0, "warmup_lr": 0.0,
                         "layer_decay": 0.75, "model_ema": False, "mixup": 0.0, "cutmix": 0.0, "progress": True})
    result = train(cfg)
    log = capsys.readouterr().err
    assert "re-initialised for 12 classes" in log
    assert "epoch 1/1" in log and "8/8" in log and "img_s=" in log and "lr=" in log and "loss=" in log  # tqdm
    assert result["head_reinitialised"] == ["head.fc.weight", "head.fc.bias"]
    tuned, original = load_file(result["last_checkpoint"]), load_file(source["ema_checkpoint"])
    assert tuned["head.fc.weight"].shape == (12, ARCH["dim"] * 8)
    model = timm.create_model("fastervit_0", **ARCH, num_classes=10)
    for name, _ in model.named_parameters():
        if not name.startswith("head.fc"):
            torch.testing.assert_close(tuned[name], original[name], rtol=0, atol=0, msg=name)


def test_finetune_from_official_checkpoint(oracle, tmp_path):
    """An official (NC-licensed layout) checkpoint with 1000 classes fine-tunes into 10 classes."""
    from fastervit.models.faster_vit import FasterViT as OfficialFasterViT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = OfficialFasterViT(dim=16, in_dim=16, depths=[1, 1, 1, 1], window_size=[7, 7, 2, 2], ct_size=2,
                                     mlp_ratio=4, num_heads=[1, 1, 2, 2], resolution=64, drop_path_rate=0.0)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": official.state_dict(), "epoch": 1}, path)
    arch = dict(dim=16, in_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=(7, 7, 2, 2))
    result = train(TrainConfig(**{**QUICK, "model_kwargs": arch, "output": str(tmp_path / "run"),
                                  "official_checkpoint": str(path), "val_images": 8, "train_images": 16}))
    assert result["head_reinitialised"] == ["head.fc.weight", "head.fc.bias"]
    assert load_file(result["last_checkpoint"])["head.fc.weight"].shape == (10, 128)


def test_unreadable_training_images_are_skipped_and_reported(tmp_path, capsys):
    sources = sorted((data_path("tiny-imagenet-10") / "train" / "n01443537").iterdir())
    for split, count in (("train", 12), ("val", 4)):
        for label in ("cat", "dog"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                (tmp_path / "data" / split / label / f"{i}.JPEG").symlink_to(sources[i])
    (tmp_path / "data" / "train" / "dog" / "5.JPEG").unlink()
    (tmp_path / "data" / "train" / "dog" / "5.JPEG").write_bytes(b"\xff\xd8 corrupt")
    result = train(TrainConfig(**{**QUICK, "data": str(tmp_path / "data"), "train_images": 0, "val_images": 0,
                                  "output": str(tmp_path / "run")}))
    assert result["skipped_images"] == 1 and result["final"]["skipped_images"] == 1
    assert "skipped 1 unreadable training images" in capsys.readouterr().err


def test_mesa_distillation_term():
    from open_fastervit.tasks.classification.mesa import MesaLoss, distillation_kl

    student, teacher, targets = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert float(distillation_kl(student, student)) == pytest.approx(0.0, abs=1e-6)
    p_teacher = torch.softmax(teacher / 3, -1)
    manual = (p_teacher * (p_teacher.log() - torch.log_softmax(student / 3, -1))).sum() / 4
    assert float(distillation_kl(student, teacher)) == pytest.approx(float(manual), rel=1e-5)
    loss = MesaLoss(torch.nn.CrossEntropyLoss(), coef=0.5)
    base = torch.nn.functional.cross_entropy(student, targets)
    assert float(loss(student, targets, teacher)) == pytest.approx(float(base))  # not active yet
    loss.active = True
    assert float(loss(student, targets, teacher)) == pytest.approx(float(base + 0.5 * 50 * manual), rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        loss(student, targets)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, capsys):
    argv = ["--model", "fastervit_0", "--model-kwargs", '{"dim": 16, "in_dim": 8, "depths": [1, 1, 1, 1], '
            '"num_heads": [1, 1, 2, 2], "window_size": [7, 7, 2, 2]}', "--data", DATA, "--img-size", "32",
            "--train-images", "64", "--val-images", "8", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0",
            "--lr", "1e30", "--clip-grad", "none", "--checkpoint-steps", "1", "--log-interval", "1", "--workers", "0",
            "--threads", "1", "--no-progress", "--no-tensorboard", "--output", str(tmp_path)]
    assert main(argv) == 1
    message = capsys.readouterr().err
    assert "NaN/inf" in message and "last good checkpoint" in message
    state = load_checkpoint(tmp_path / "last.pt")
    step = state["progress"]["global_step"]
    assert 1 <= step < 8
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    with pytest.raises(TrainingDiverged):
        train(config_from_args(argv + ["--output", str(tmp_path / "again")]))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(data="/nonexistent/tiny"), DatasetError, "does not exist"),
        (dict(train_images=4), DatasetError, "fewer than one global batch"),
        (dict(epochs=0), ValueError, "--epochs must be >= 1, got 0"),
        (dict(img_size=0), ValueError, "--img-size must be >= 1, got 0"),
        (dict(batch_size=-2), ValueError, "--batch-size must be >= 1, got -2"),
        (dict(workers=-1), ValueError, "--workers must be >= 0, got -1"),
        (dict(batch_size=7, mixup=0.8), ValueError, "even batch size"),
        (dict(mesa=0.5, model_ema=False), ValueError, "MESA"),
        (dict(num_classes=5), DatasetError, "10 classes but num_classes=5"),
        (dict(model="fastervit_99"), ValueError, "unknown"),
        (dict(model_kwargs={**ARCH, "depth": 3}), ValueError, "does not accept model_kwargs"),
        (dict(resume="/nonexistent/last.pt"), Exception, "does not exist"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        train(TrainConfig(**{**QUICK, "output": str(tmp_path), **change}))
    assert not (tmp_path / "last.pt").exists()


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--epochs", "many"])


def test_every_recipe_loads_and_matches_the_paper():
    names = list_recipes()
    assert {f"fastervit_{i}_in1k" for i in range(7)} <= set(names)
    assert {f"fastervit_4_21k_{r}_ft_in1k" for r in (224, 384, 512, 768)} <= set(names)
    paper = {0: ("adamw", 0.05, 20, 0.1, 0.2), 1: ("adamw", 0.05, 20, 0.2, 0.2), 2: ("adamw", 0.05, 20, 0.5, 0.2),
             3: ("adamw", 0.075, 35, 0.5, 0.3), 4: ("lamb", 0.12, 20, 5.0, 0.3), 5: ("lamb", 0.12, 20, 5.0, 0.3),
             6: ("lamb", 0.15, 20, 5.0, 0.5)}
    for i, expected in paper.items():
        cfg = config_from_args(["--recipe", f"fastervit_{i}_in1k", "--data", DATA])
        assert (cfg.opt, cfg.weight_decay, cfg.warmup_epochs, cfg.mesa, cfg.drop_path) == expected
        assert (cfg.model, cfg.epochs, cfg.cooldown_epochs, cfg.lr_base, cfg.ema_decay) == (
            f"fastervit_{i}", 300, 10, 5e-3, 0.9998)
        assert cfg.mesa_start == (0.3 if i == 3 else 0.25) and cfg.aa == "rand-m9-mstd0.5-inc1"
    for name in names:
        config_from_args(["--recipe", name])  # every key is a TrainConfig field


def test_recipe_lr_scales_with_global_batch_and_cli_overrides():
    cfg = config_from_args(["--recipe", "fastervit_0_in1k", "--batch-size", "64", "--accum-steps", "2",
                            "--no-model-ema", "--mesa", "0"])
    assert cfg.batch_size == 64 and not cfg.model_ema and cfg.opt == "adamw"
    assert effective_lr(cfg, world_size=4) == pytest.approx(5e-3 * 512 / 4096)
    assert effective_lr(TrainConfig(lr=3e-4), world_size=8) == 3e-4
    with pytest.raises(FileNotFoundError, match="unknown recipe"):
        load_recipe("fastervit_9_in1k")


def test_optimizer_excludes_biases_norms_and_layer_scales_from_weight_decay():
    from open_fastervit.train import create_optimizer

    model = timm.create_model("fastervit_0", **TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    for layer_decay in (None, 0.8):
        cfg = TrainConfig(opt="lamb", weight_decay=0.12, layer_decay=layer_decay)
        optimizer = create_optimizer(model, cfg, lr=1e-3)
        assert type(optimizer).__name__ == "Lamb"
        decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed and all(model.get_parameter(n).ndim > 1 for n in decayed)
        assert not decayed & set(model.no_weight_decay()) and "stem.norm1.weight" not in decayed
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    assert len(scales) > 3 and max(scales) == 1.0  # layer-wise lr decay through group_matcher


def test_schedule_per_step_warmup_cosine_cooldown():
    from open_fastervit.train import create_optimizer, create_schedule

    cfg = TrainConfig(epochs=10, warmup_epochs=2, cooldown_epochs=3, warmup_lr=1e-6, min_lr=5e-6)
    optimizer = create_optimizer(torch.nn.Linear(2, 2), cfg, lr=1e-3)
    scheduler, total = create_schedule(optimizer, cfg, steps_per_epoch=5)
    assert total == 13

    def lr_at(step: int) -> float:
        scheduler.step_update(num_updates=step)
        return optimizer.param_groups[0]["lr"]

    lrs = [lr_at(step) for step in range(65)]
    cosine_at_10 = 5e-6 + 0.5 * (1e-3 - 5e-6) * (1 + math.cos(math.pi * 10 / 50))  # timm: warmup inside the cosine
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(cosine_at_10) and max(lrs) == lrs[10]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises every step, not every epoch
    assert all(a > b for a, b in zip(lrs[10:49], lrs[11:50]))  # cosine falls every step
    assert all(lr == pytest.approx(5e-6) for lr in lrs[50:])  # cooldown at min lr


@pytest.mark.full
def test_torch_compile_trains(tmp_path):
    result = train(TrainConfig(**{**QUICK, "output": str(tmp_path), "compile": True, "train_images": 16,
                                  "val_images": 8}))
    assert math.isfinite(result["final"]["train_loss"])


def test_adam_optimizers_use_torch_fused_kernel():
    from open_fastervit.train import create_optimizer, fused_optimizer_kwargs

    model = timm.create_model("fastervit_0", **TINY)
    adamw = create_optimizer(model, TrainConfig(opt="adamw"), 1e-3)
    assert adamw.defaults.get("fused") is True
    lamb = create_optimizer(model, TrainConfig(opt="lamb"), 1e-3)
    assert not lamb.defaults.get("fused")
    assert fused_optimizer_kwargs(model.to(torch.float64), "adamw") == {"fused": True}
    assert fused_optimizer_kwargs(torch.nn.Linear(2, 2).to("meta"), "adamw") == {}


# ---- --resume RUN alone, Ctrl-C, existing run folders ----------------------------------------------------------


def test_resume_alone_takes_the_saved_settings_and_flags_override_them(tmp_path, capsys):
    """Before: `fastervit train --resume RUN` failed with "no dataset given". Expected: the run's config.json gives
    the defaults (data, model, lr ...), the output is the run folder, flags given win and are named in one line."""
    import dataclasses
    import json

    from open_fastervit.tasks.detection.train import DetectionConfig
    from open_fastervit.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    saved = dataclasses.asdict(TrainConfig(**{**QUICK, "output": "somewhere/else", "lr": 3e-4, "epochs": 2}))
    (run / "config.json").write_text(json.dumps(saved))
    save_checkpoint(run / "last.pt", {"config": {**saved, "batch_size": 4}, "progress": {"epoch": 1}})
    cfg = config_from_args(["--resume", str(run)])
    assert cfg.data == DATA and cfg.model_kwargs == json.loads(json.dumps(ARCH)) and cfg.lr == 3e-4 and cfg.epochs == 2
    assert cfg.output == str(run) and cfg.resume == str(run) and cfg.overwrite is False and cfg.batch_size == 8
    assert capsys.readouterr().err.strip() == (f"resuming {run} with its saved settings ({run / 'config.json'}); "
                                               "nothing overridden")

    cfg = config_from_args(["--resume", str(run / "last.pt"), "--epochs", "4", "--lr", "3e-4"])
    assert cfg.epochs == 4 and cfg.lr == 3e-4 and cfg.output == str(run) and cfg.img_size == 32
    assert capsys.readouterr().err.strip().endswith("; overridden: epochs 2 -> 4")  # lr equals the saved value

    (run / "config.json").unlink()  # a run folder without config.json: the settings stored in last.pt
    assert config_from_args(["--resume", str(run)]).batch_size == 4

    with pytest.raises(ValueError, match="another task"):  # a classification run given to `fastervit detect train`
        config_from_args(["--resume", str(run)], DetectionConfig, build_parser(DetectionConfig))
    assert main(["--resume", str(tmp_path / "missing")]) == 1
    assert "no such run folder or checkpoint" in capsys.readouterr().err


def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(tmp_path, capsys, monkeypatch):
    """Before: Ctrl-C printed an 85-line traceback. Expected: exit status 130 and one line naming the epoch and step
    reached, the last checkpoint and `fastervit train --resume RUN`; no traceback."""
    from open_fastervit.train import Trainer, TrainingInterrupted

    step = Trainer._optimizer_step

    def step_then_ctrl_c(self):
        step(self)
        if self.progress.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_ctrl_c)
    argv = settings_argv({**QUICK, "checkpoint_steps": 2, "output": str(tmp_path)})
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("interrupted") == 1
    assert err.strip().splitlines()[-1] == (f"fastervit train: interrupted at epoch 1, step 3/8; last checkpoint: "
                                            f"{tmp_path / 'last.pt'}; continue with: fastervit train --resume "
                                            f"{tmp_path}")
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 2

    with pytest.raises(KeyboardInterrupt) as caught:  # the API raises it, still a KeyboardInterrupt
        train(TrainConfig(**{**QUICK, "output": str(tmp_path / "api")}))
    assert isinstance(caught.value, TrainingInterrupted) and caught.value.checkpoint is None
    assert caught.value.hint() == ("interrupted at epoch 1, step 3/8; no checkpoint written yet (nothing to resume): "
                                   "start the run again")


def test_existing_run_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    """Before: training into a folder holding an interrupted run silently overwrote its last.pt. Expected: a one-line
    error naming the epoch of its last.pt, --resume and --output, last.pt untouched; --overwrite trains afresh."""
    from open_fastervit.train import RunExistsError
    from open_fastervit.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "last.pt", {"progress": {"epoch": 1, "step_in_epoch": 3, "global_step": 11}})
    before = (tmp_path / "last.pt").read_bytes()
    argv = settings_argv({**QUICK, "train_images": 16, "val_images": 8, "output": str(tmp_path)})
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"fastervit train: error: {tmp_path} already holds a training run (last.pt from epoch 2, step 3): "
                   f"continue it with resume={str(tmp_path)!r} (command line: --resume {tmp_path}), or choose another "
                   "output (--output), or replace it with overwrite=True (--overwrite)")
    assert (tmp_path / "last.pt").read_bytes() == before

    save_checkpoint(tmp_path / "last.pt", {"progress": {"epoch": 2, "step_in_epoch": 0}})
    with pytest.raises(RunExistsError, match=r"\(last.pt from epoch 2\)"):  # the API refuses as well
        train(TrainConfig(**{**QUICK, "output": str(tmp_path)}))

    # files of the replaced run that the new one would not write (no EMA here) must not survive --overwrite
    (tmp_path / "last_ema.safetensors").write_bytes(b"old")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.old").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    assert main([*argv, "--overwrite", "--no-model-ema", "--no-tensorboard"]) == 0
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 2
    assert not (tmp_path / "last_ema.safetensors").exists() and not (tmp_path / "tb").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # only the run's outputs are removed


def test_config_json_stores_paths_absolute_so_resume_works_from_anywhere(tmp_path, monkeypatch):
    """Before: config.json kept `--data ../shared/data/...` as typed, so `fastervit train --resume RUN` from another
    working directory failed with "dataset path ... does not exist". Expected: existing relative paths are stored
    absolute; names, timm specs and unset fields are kept."""
    from open_fastervit.train import absolute_paths

    (tmp_path / "data").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    settings = {"data": "data", "pretrained": "w.safetensors", "official_checkpoint": None, "data_dir": "",
                "backbone_checkpoint": "missing.pt", "model": "data", "lr": 1e-3}
    out = absolute_paths(settings)
    assert out["data"] == str(tmp_path.resolve() / "data")
    assert out["pretrained"] == str(tmp_path.resolve() / "w.safetensors")
    assert out["official_checkpoint"] is None and out["data_dir"] == "" and out["backbone_checkpoint"] == "missing.pt"
    assert out["model"] == "data" and out["lr"] == 1e-3  # not a path field
    assert settings["data"] == "data"  # the input is not modified

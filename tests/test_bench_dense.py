"""Tests of ``fastervit bench --dense`` / ``--profile`` (open_fastervit.bench.dense) and experiments/bench_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from open_fastervit import bench
from open_fastervit.bench import BenchError
from open_fastervit.bench import dense as bench_dense
from open_fastervit.bench.dense import DenseConfig, map_rel_errors, op_category, parse_sizes
from open_fastervit.cli import bench as bench_cli

REPO = Path(__file__).resolve().parents[1]
# ~0.3M-parameter FasterViT (HAT active in stage 2 at 64 px) and a one-block-per-stage Swin-T.
TINY = {"dim": 16, "in_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": [7, 7, 2, 2],
        "drop_path_rate": 0.0}
SWIN = "swin_tiny_patch4_window7_224"
TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
PNG = b"\x89PNG\r\n\x1a\n"


def _tiny_argv(out: Path, *extra: str) -> list[str]:
    return ["--dense", "--quick", "--models", f"fastervit_0,{SWIN},test_convnext",
            "--model-kwargs", f"fastervit_0={json.dumps(TINY)}", "--model-kwargs", f"{SWIN}={json.dumps(TINY_SWIN)}",
            "--threads", "1", "--out", str(out), "--no-progress", *extra]


def test_parse_sizes():
    assert parse_sizes("800x1216, 1024,512X2048") == [(800, 1216), (1024, 1024), (512, 2048)]
    assert parse_sizes("") == []
    for bad in ("800x", "0x64", "a"):
        with pytest.raises(BenchError, match="HxW"):
            parse_sizes(bad)


def test_dense_defaults_and_quick_from_cli():
    argv = ["--dense"]
    cfg = bench_cli.dense_config_from_args(bench_cli.build_parser().parse_args(argv), argv)
    assert cfg.models == list(bench_dense.DEFAULT_DENSE_MODELS)
    assert cfg.sizes == [(800, 1216), (1024, 1024), (512, 2048)] and cfg.train_sizes == [(512, 768)]
    assert (cfg.batch, cfg.train_batch, cfg.warmup, cfg.rounds, cfg.iters) == (1, 2, 1, 5, 1)
    assert cfg.forms == ["plain", "fused"] and cfg.baseline_name() == SWIN and cfg.check_tol == 1e-5
    argv = ["--dense", "--quick", "--rounds", "4", "--dense-sizes", "96x128", "--amp", "none,bf16",
            "--baseline", "convnext_tiny"]
    cfg = bench_cli.dense_config_from_args(bench_cli.build_parser().parse_args(argv), argv)
    assert cfg.rounds == 4 and cfg.sizes == [(96, 128)] and cfg.warmup == 0 and cfg.train_sizes == [(256, 384)]
    assert cfg.models == bench_cli.DENSE_QUICK["models"] and cfg.channels_last
    assert cfg.precisions == ["fp32", "bf16"] and cfg.baseline_name() == "convnext_tiny"


@pytest.mark.parametrize("kwargs, message", [
    ({"models": ["faster_vit_0_224"]}, "backbones"),
    ({"sizes": [(16, 64)]}, "at least 32"),
    ({"sizes": [], "train_batch": 0}, "nothing to measure"),
    ({"forms": ["packed"]}, "forms"),
    ({"baseline": "convnext_tiny"}, "baseline"),
])
def test_dense_config_errors(kwargs, message):
    with pytest.raises(BenchError, match=message):
        DenseConfig(**{"models": ["fastervit_0"], **kwargs}).validate()


def test_ratios_fused_vs_plain_and_baseline():
    def row(model, form, samples):
        return {"model": model, "form": form, "kind": "infer", "batch": 1, "size": "64x64", "precision": "fp32",
                "status": "ok", "samples_ms": samples}

    rows = [row("base", "plain", [10, 20, 40]), row("ours", "plain", [5, 10, 10]), row("ours", "fused", [5, 5, 5])]
    bench_dense.add_dense_ratios(rows, "base")
    assert rows[0]["ratio_vs_baseline"] == 1.0
    assert rows[1]["vs_baseline"] == {"baseline": "base", "median": 2.0, "min": 2.0, "max": 4.0}
    assert rows[2]["fused_vs_plain"] == {"median": 2.0, "min": 1.0, "max": 2.0}
    assert "fused_vs_plain" not in rows[1]


def test_map_errors_and_op_categories():
    a = [torch.tensor([1.0, -4.0]), torch.ones(2, 2)]
    assert map_rel_errors(a, [torch.tensor([1.0, -3.0]), torch.ones(2, 2)]) == [0.25, 0.0]
    assert map_rel_errors(a[:1], [torch.ones(3)]) == [float("inf")]
    assert op_category("aten::addmm") == op_category("aten::mm") == "matmul (addmm/mm/bmm/linear)"
    assert op_category("aten::mkldnn_convolution") == "convolution"
    assert op_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_category("aten::gelu") == "activation (gelu/relu/silu)"
    assert op_category("aten::copy_") == op_category("aten::cat") == "copies and layout"
    assert op_category("autograd::engine::evaluate_function: AddmmBackward0") == "autograd engine (backward nodes)"
    assert op_category("aten::convolution_backward") == "convolution"
    assert op_category("aten::something_new") == "other"


def test_dense_cli_end_to_end(tmp_path: Path, capsys):
    out = tmp_path / "dense"
    threads_before = torch.get_num_threads()
    argv = _tiny_argv(out, "--dense-sizes", "96x128,64x96", "--dense-train-sizes", "64x96", "--dense-train-batch", "2")
    assert bench_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| fastervit_0 | fused | 96x128 | fp32 |" in printed and f"vs {SWIN} |" in printed
    assert torch.get_num_threads() == threads_before

    result = json.loads((out / "dense.json").read_text())
    assert result["schema"] == bench_dense.SCHEMA and result["config"]["baseline"] == SWIN
    rows = result["rows"]
    infer = [r for r in rows if r["kind"] == "infer"]
    train = [r for r in rows if r["kind"] == "train"]
    # per size: FasterViT plain + fused, Swin, ConvNeXt; training: one row per model
    assert len(infer) == 2 * 4 and len(train) == 3
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert {(r["model"], r["form"]) for r in infer} == {("fastervit_0", "plain"), ("fastervit_0", "fused"),
                                                        (SWIN, "plain"), ("test_convnext", "plain")}
    for r in rows:
        assert len(r["samples_ms"]) == 2 and r["img_per_s"] == pytest.approx(1e3 * r["batch"] / r["latency_ms"])
        assert r["vs_baseline"]["median"] > 0 and r["gmacs_per_img"] > 0 and r["peak_mem_mb"] > 0
        if r["model"] == SWIN:
            assert r["ratio_vs_baseline"] == 1.0
        assert ("fused_vs_plain" in r) == (r["form"] == "fused")
    assert all(r["batch"] == 2 for r in train) and {r["form"] for r in train} == {"train"}

    checks = result["checks"]
    assert [(c["model"], c["size"]) for c in checks] == [("fastervit_0", "96x128"), ("fastervit_0", "64x96")]
    assert result["checks_ok"] and all(0 <= c["max_rel_err"] <= 1e-5 and len(c["per_map"]) == 4 for c in checks)
    maps = result["candidates"]["fastervit_0"]["maps"]["96x128"]
    assert maps == [[16, 24, 32], [32, 12, 16], [64, 6, 8], [128, 3, 4]]
    assert result["candidates"][SWIN]["output_fmt"] == "NHWC"

    markdown = (out / "dense.md").read_text()
    for text in ("## Inference, batch 1", "## Training step", "inference form check", "all ok",
                 "| model | form | 96x128 | 64x96 |"):
        assert text in markdown
    assert (out / "dense_time_vs_size.png").read_bytes()[:8] == PNG
    assert result["plots"]["dense_time_vs_size.png"] == "written"


def test_failed_check_is_reported(tmp_path: Path):
    cfg = DenseConfig(models=["fastervit_0"], model_kwargs={"fastervit_0": TINY}, sizes=[(64, 64)], train_batch=0,
                      warmup=0, rounds=1, macs=False, memory=False, check_tol=-1.0, threads=1, device="cpu")
    result = bench_dense.run_dense(cfg, progress=False)
    assert not result["checks_ok"] and not result["checks"][0]["ok"]
    assert "FAILED" in bench_dense.dense_markdown(result)
    assert [r["form"] for r in result["rows"]] == ["plain", "fused"]


def test_dense_errors_are_clear(capsys, tmp_path: Path):
    assert bench_cli.main(["--dense", "--models", "faster_vit_0_224", "--out", str(tmp_path)]) == 2
    assert "backbones" in capsys.readouterr().err
    assert bench_cli.main(["--dense", "--models", "convnext_tinyy", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_profile_writes_top_ops_with_shares(tmp_path: Path, capsys):
    out = tmp_path / "prof"
    argv = _tiny_argv(out, "--profile", "fastervit_0", "--profile-form", "plain", "--profile-size", "64x96",
                      "--profile-top", "10")
    assert bench_cli.main(argv) == 0
    assert "Where the time goes" in capsys.readouterr().out
    result = json.loads((out / "profile_fastervit_0_plain_64x96.json").read_text())
    assert len(result["top"]) == 10 and result["size"] == "64x96" and result["form"] == "plain"
    shares = [o["pct_self_cpu"] for o in result["top"]]
    assert shares == sorted(shares, reverse=True)
    assert sum(c["pct_self_cpu"] for c in result["categories"].values()) == pytest.approx(100.0)
    assert {"convolution", "matmul (addmm/mm/bmm/linear)"} <= set(result["categories"])
    assert (out / "profile_fastervit_0_plain_64x96.md").read_text().startswith("# Profile: fastervit_0 (plain)")
    # a peer has no fused form: it is profiled as built, and training works too
    peer = bench_dense.profile_forward(DenseConfig(models=["test_convnext"], threads=1), "test_convnext", "fused",
                                       (64, 64), out, top=5)
    assert peer["form"] == "plain" and len(peer["top"]) == 5
    train = bench_dense.profile_forward(DenseConfig(models=["test_convnext"], threads=1), "test_convnext", "train",
                                        (64, 64), out, batch=2, top=5)
    assert train["batch"] == 2 and train["form"] == "train"
    assert any("backward" in name for name in _op_names(out / "profile_test_convnext_train_64x64.json"))


def _op_names(path: Path) -> list[str]:
    return [o["name"] for o in json.loads(path.read_text())["top"]]


# --------------------------------------------------------------------------------------------------
# experiments/bench_gpu.py
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_suite():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "experiments" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_guard_with_fake_clock(gpu_suite):
    clock = Clock()
    guard = gpu_suite.BudgetGuard(60.0, clock)
    assert guard.allows(60.0) and not guard.allows(60.5)
    clock.now += 20.0
    guard.record(estimate_s=10.0, actual_s=20.0)  # items so far ran 2x slower than estimated
    assert guard.remaining() == 40.0 and guard.slowdown == 2.0
    assert guard.allows(20.0) and not guard.allows(21.0)
    guard.record(estimate_s=100.0, actual_s=10.0)
    assert guard.slowdown == 1.0  # never below 1


def test_items_fall_back_and_skip_under_budget(gpu_suite):
    clock = Clock()

    def work(seconds: float, fail: bool = False):
        def run() -> dict:
            clock.now += seconds
            if fail:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return {"rows": []}
        return run

    items = [gpu_suite.Item("a", "classification", False, 10.0, work(10.0)),
             gpu_suite.Item("b", "classification", True, 10.0, work(5.0, fail=True)),
             gpu_suite.Item("c", "dense", True, 30.0, work(30.0)),
             gpu_suite.Item("d", "dense", False, 5.0, work(5.0))]
    guard = gpu_suite.BudgetGuard(40.0, clock)
    records = gpu_suite.run_items(items, guard, torch.device("cpu"), clock)
    assert [r["status"] for r in records] == ["ok", "error", "skipped", "ok"]
    assert records[1]["error"].startswith("RuntimeError: CUDA out of memory")
    assert "skipped: estimated 30 s" in records[2]["note"] and "25 s left" in records[2]["note"]
    assert records[3]["elapsed_s"] == 5.0 and guard.elapsed() == 20.0


def test_device_sync_and_compile_backend(gpu_suite, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    bench.device_sync(torch.device("cpu"))()
    assert calls == []
    bench.device_sync(torch.device("cuda:0"))()
    assert calls == [torch.device("cuda:0")]
    original = torch.compile
    with gpu_suite.compile_backend("eager"):
        assert torch.compile is not original and torch.compile.keywords == {"backend": "eager"}
    assert torch.compile is original
    with gpu_suite.compile_backend("inductor"):
        assert torch.compile is original


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside the official package
def test_gpu_suite_dry_run_on_cpu(gpu_suite, tmp_path: Path, capsys):
    out = tmp_path / "gpu"
    argv = ["--dry-run", "--device", "cpu", "--out", str(out), "--items", "cls_eager,dense_eager,dense_compile"]
    assert gpu_suite.main(argv) == 0
    assert "# GPU benchmark" in capsys.readouterr().out
    result = json.loads((out / "bench_gpu.json").read_text())
    assert {"schema", "dry_run", "env", "settings", "budget", "official", "paper_a100_img_s", "items",
            "summary"} <= set(result)
    assert result["dry_run"] and result["settings"]["batch"] == 2 and result["settings"]["img_size"] == 64
    assert [i["name"] for i in result["items"]] == ["cls_eager", "dense_eager", "dense_compile"]
    assert all(i["status"] == "ok" for i in result["items"]), [i.get("error") for i in result["items"]]
    summary = result["summary"]
    cls = [r for r in summary if r["kind"] == "classification"]
    assert {r["precision"] for r in cls} == {"bf16", "fp16"} and all(r["status"] == "ok" for r in cls)
    ours = next(r for r in cls if r["model"] == "fastervit_0")
    assert ours["paper_a100_img_s"] == 5802 and ours["img_per_s"] > 0
    if result["official"]["available"]:
        assert any(r["model"] == "faster_vit_0_224" for r in cls)
    dense = [r for r in summary if r["kind"] == "dense"]
    assert {(r["form"], r["compiled"]) for r in dense if r["model"] == "fastervit_0"} == {
        ("plain", False), ("fused", False), ("fused", True)}
    markdown = (out / "bench_gpu.md").read_text()
    assert "DRY RUN" in markdown and "| paper A100 img/s |" in markdown and "## Dense backbones, 64x96" in markdown


def test_gpu_suite_budget_guard_skips_everything(gpu_suite, tmp_path: Path):
    out = tmp_path / "gpu"
    assert gpu_suite.main(["--dry-run", "--device", "cpu", "--budget-min", "0.0001", "--out", str(out)]) == 0
    result = json.loads((out / "bench_gpu.json").read_text())
    assert result["budget"]["skipped"] == [i["name"] for i in result["items"]] == [
        "cls_eager", "tensorrt", "dense_eager", "cls_compile", "dense_compile"]
    assert all(i["note"].startswith("skipped: estimated") for i in result["items"]) and result["summary"] == []
    assert "| cls_eager | skipped |" in (out / "bench_gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_gpu_suite_needs_cuda_unless_dry_run(gpu_suite, tmp_path: Path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run --device cpu" in capsys.readouterr().err


def test_tensorrt_profile_and_tolerance(gpu_suite):
    fixed = {"batch": [1, None], "height": [224, 224], "width": [224, 224], "in_chans": 3}
    assert gpu_suite.trt_profile(fixed, (224, 224)) == {
        "min": (1, 3, 224, 224), "opt": (16, 3, 224, 224), "max": (128, 3, 224, 224)}
    dynamic = {"batch": [1, None], "height": [225, None], "width": [225, 600], "in_chans": 3}
    assert gpu_suite.trt_profile(dynamic, (224, 320)) == {
        "min": (1, 3, 225, 225), "opt": (16, 3, 225, 320), "max": (128, 3, 450, 600)}
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        gpu_suite.trt_profile(fixed, (224, 224), (16, 1, 128))
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    close = gpu_suite.fp16_check(ref + 0.01, ref)
    assert close["ok"] and close["top1_agreement"] == 1.0 and close["max_rel_error"] == pytest.approx(0.01 / 3)
    flipped = gpu_suite.fp16_check(ref.flip(0), ref)
    assert not flipped["ok"] and flipped["top1_agreement"] == 0.0
    with pytest.raises(ValueError, match="differs"):
        gpu_suite.fp16_check(ref[:1], ref)


def test_tensorrt_item_on_cpu_checks_the_onnx_and_says_why_no_engine(gpu_suite, tmp_path: Path):
    out = tmp_path / "trt"
    assert gpu_suite.main(["--dry-run", "--device", "cpu", "--out", str(out), "--items", "tensorrt"]) == 0
    result = json.loads((out / "bench_gpu.json").read_text())
    (item,) = result["items"]
    assert item["status"] == "ok", item.get("error")
    res = item["result"]
    assert res["profile"] == {"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [2, 3, 64, 64]}
    assert "TensorRT not importable" in res["note"] or "needs CUDA" in res["note"]
    assert "## TensorRT" in (out / "bench_gpu.md").read_text()

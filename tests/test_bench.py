"""Tests of ``fastervit bench``: timing logic (fake clock), measurements, reports, CLI, official pairing."""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from open_fastervit import bench
from open_fastervit.bench import BenchConfig, BenchError, classification, measure_interleaved, summarize
from open_fastervit.bench.report import CSV_COLUMNS
from open_fastervit.cli import bench as bench_cli
from open_fastervit.convert import official_to_ours

# ~0.3M-parameter FasterViT: HAT active in stage 2 at 64 px (4x4 map, 2x2 windows).
TINY = {"dim": 16, "in_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4],
        "window_size": [7, 7, 2, 2], "drop_path_rate": 0.0}
HAS_OFFICIAL = importlib.util.find_spec("fastervit") is not None


class FakeClock:
    """A clock that only moves when a fake step says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def step(self, name: str, costs: list[float]):
        """A step whose successive calls take ``costs`` seconds (the last cost repeats)."""
        it = iter(costs)
        last = [costs[-1]]

        def run() -> None:
            self.calls.append(name)
            last[0] = next(it, last[0])
            self.now += last[0]

        return run


def test_summarize_median_quartiles_range():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.q1, stats.q3, stats.min, stats.max, stats.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert stats.spread_pct == pytest.approx(100 * 2.0 / 3.0)
    single = summarize([0.5])
    assert single.median == single.q1 == single.q3 == 0.5
    with pytest.raises(BenchError):
        summarize([])


def test_interleaving_order_warmup_and_per_call_times():
    clock = FakeClock()
    # warm-up calls cost 100 s (must not be recorded), then A takes 1, 3, 2 s and B 10, 30, 20 s per call
    steps = {"A": clock.step("A", [100, 1, 1, 3, 3, 2, 2]), "B": clock.step("B", [100, 10, 10, 30, 30, 20, 20])}
    ticks = []
    samples, errors = measure_interleaved(steps, warmup=1, rounds=3, iters=2, timer=clock,
                                          tick=lambda: ticks.append(1))
    assert errors == {}
    assert clock.calls == ["A", "B"] + ["A", "A", "B", "B"] * 3  # A B after warm-up, turn by turn
    assert samples == {"A": [1.0, 3.0, 2.0], "B": [10.0, 30.0, 20.0]}
    assert summarize(samples["A"]).median == 2.0 and summarize(samples["B"]).median == 20.0
    assert len(ticks) == 2 * 4


def test_per_candidate_iteration_counts():
    clock = FakeClock()
    steps = {"fast": clock.step("fast", [0.5]), "slow": clock.step("slow", [4.0])}
    samples, _ = measure_interleaved(steps, warmup=0, rounds=2, iters={"fast": 4, "slow": 1}, timer=clock)
    assert samples == {"fast": [0.5, 0.5], "slow": [4.0, 4.0]}
    assert clock.calls.count("fast") == 8 and clock.calls.count("slow") == 2
    assert bench.auto_iters(clock.step("x", [0.05]), 0.2, lambda: None, clock) == 4


def test_failing_candidate_is_dropped_not_fatal():
    clock = FakeClock()

    def broken() -> None:
        raise RuntimeError("stage map does not divide by the window")

    samples, errors = measure_interleaved({"ok": clock.step("ok", [1.0]), "bad": broken}, warmup=1, rounds=2,
                                          timer=clock)
    assert samples == {"ok": [1.0, 1.0]}
    assert errors["bad"].startswith("RuntimeError: stage map")


def _row(model: str, precision: str, samples_ms: list[float], batch: int = 4) -> dict:
    return {"model": model, "kind": "infer", "batch": batch, "img_size": 64, "precision": precision,
            "status": "ok", "samples_ms": samples_ms, "gmacs_per_s": 50.0}


def test_ratios_are_medians_of_per_round_ratios():
    rows = [_row("base", "fp32", [10, 20, 40]), _row("cand", "fp32", [5, 20, 10]),
            _row("base", "bf16", [8, 8, 8]), _row("cand", "bf16", [4, 4, 4])]
    bench.add_ratios(rows, [("base", None)], {"fp32": {"gmacs_per_s": 200.0}})
    cand_fp32, cand_bf16 = rows[1], rows[3]
    # per-round base/cand time ratios 2, 1, 4 -> median 2 (the ratio of medians would be 20/10 = 2 too,
    # but the range shows the per-round spread)
    assert (cand_fp32["ratio_vs_baseline"], cand_fp32["ratio_min"], cand_fp32["ratio_max"]) == (2.0, 1.0, 4.0)
    assert cand_bf16["ratio_vs_baseline"] == 2.0 and cand_bf16["baseline"] == "base:bf16"
    assert cand_fp32["pct_of_fp32_gemm"] == pytest.approx(25.0)
    # two baselines: the fixed base:fp32 (bf16 rows against base fp32) and cand at each row's precision
    bench.add_ratios(rows, [("base", "fp32"), ("cand", None)], {})
    assert cand_bf16["baseline"] == "base:fp32"
    assert cand_bf16["ratio_vs_baseline"] == pytest.approx(statistics.median([10 / 4, 20 / 4, 40 / 4]))
    assert rows[0]["ratios"][1] == {"baseline": "cand:fp32", "median": 0.5, "min": 0.25, "max": 1.0}


def test_plan_groups_merges_scaling_sweep():
    cfg = BenchConfig(models=["a"], batch_sizes=[1, 8], img_sizes=[224], precisions=["fp32", "bf16"],
                      train_batch=4, scaling_sizes=[224, 448], scaling_batch=1)
    groups = bench.plan_groups(cfg)
    keys = [(g.kind, g.batch, g.size, g.precisions) for g in groups]
    assert keys == [("infer", 1, 224, ("fp32", "bf16")), ("infer", 8, 224, ("fp32", "bf16")),
                    ("train", 4, 224, ("fp32", "bf16")), ("infer", 1, 448, ("fp32",))]


@pytest.mark.parametrize("kwargs, message", [
    ({"precisions": ["fp8"]}, "precisions"),
    ({"baselines": ["other"]}, "baseline"),
    ({"baselines": ["a:bf16"]}, "baseline precision"),
    ({"batch_sizes": [0]}, "positive"),
    ({"models": []}, "no models"),
    ({"models": ["a", "a"]}, "more than once"),
])
def test_config_errors_are_clear(kwargs, message):
    with pytest.raises(BenchError, match=message):
        BenchConfig(**{"models": ["a"], **kwargs}).validate()


def test_unknown_model_names(capsys):
    with pytest.raises(BenchError, match="unknown model 'convnext_tinyy'.*convnext_tiny"):
        bench.run_benchmark(BenchConfig(models=["convnext_tinyy"]), progress=False)
    with pytest.raises(BenchError, match="--import fastervit"):
        bench.check_model_names(["faster_vit_9_224"])
    assert bench_cli.main(["--models", "no_such_model", "--no-progress"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert bench_cli.main(["--models", "resnet18", "--import", "no_such_module_xyz"]) == 2
    assert "cannot import" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(BenchError, match="cuda"):
        bench.resolve_device("cuda")
    assert bench.resolve_device("auto") == torch.device("cpu")


def test_unwritable_output_folder_is_a_clear_error(tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["--models", "test_convnext", "--num-classes", "10", "--img-sizes", "32", "--batch-sizes", "1",
            "--train-batch", "0", "--scaling-sizes", "", "--warmup", "0", "--rounds", "1", "--iters", "1",
            "--threads", "1", "--gemm-size", "64", "--no-memory", "--out", str(blocker / "bench"), "--no-progress"]
    assert bench_cli.main(argv) == 2
    assert "cannot write the reports" in capsys.readouterr().err


def test_parse_model_kwargs_all_and_per_model():
    parsed = bench.parse_model_kwargs(['{"dim": 32}', 'fastervit_0={"depths": [1, 1, 2, 1]}'])
    assert parsed == {"*": {"dim": 32}, "fastervit_0": {"depths": [1, 1, 2, 1]}}
    cfg = BenchConfig(models=["fastervit_0"], model_kwargs=parsed)
    assert cfg.kwargs_for("fastervit_0") == {"dim": 32, "depths": (1, 1, 2, 1)}
    with pytest.raises(BenchError, match="JSON"):
        bench.parse_model_kwargs(["{dim: 32}"])


def test_quick_fills_only_options_not_given():
    argv = ["--quick", "--rounds", "5", "--models", "resnet18"]
    cfg = bench_cli.config_from_args(bench_cli.build_parser().parse_args(argv), argv)
    assert (cfg.rounds, cfg.warmup, cfg.batch_sizes, cfg.train_batch) == (5, 1, [1, 8], 4)
    assert cfg.models == ["resnet18"] and cfg.command == "fastervit bench " + " ".join(argv)
    assert cfg.fuse and cfg.channels_last  # each model in its inference form
    argv = ["--quick", "--no-fuse"]
    cfg = bench_cli.config_from_args(bench_cli.build_parser().parse_args(argv), argv)
    assert not cfg.fuse and cfg.channels_last


def test_peak_tensor_memory_counts_live_tensors_only():
    with bench.PeakTensorMemory() as tracker:
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a, b
        c = torch.ones(256, 1024)  # 1 MiB after the 8 MiB were freed
    assert tracker.peak == 8 * 2**20
    assert tracker.current == 2**20
    del c


def test_mac_count_of_known_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    expected = (3 * 8 * 9 * 64 + 8 * 64 * 10) / 1e9
    assert bench.count_gmacs(model, 8, "infer", torch.device("cpu")) == pytest.approx(expected)
    assert bench.count_gmacs(model, 8, "train", torch.device("cpu")) == pytest.approx(3 * expected)
    assert model.training  # mode restored


def test_fixed_size_timm_model_is_rebuilt_for_other_sizes():
    cfg = BenchConfig(models=["test_vit"], num_classes=10)
    model = bench.create_candidate("test_vit", 64, cfg, torch.device("cpu"))  # test_vit is built for 160 px
    assert bench.probe_forward(model, 64).shape == (1, 10)


def test_official_name_mapping():
    assert bench.official_to_ours_name("faster_vit_0_224") == "fastervit_0"
    assert bench.official_to_ours_name("faster_vit_4_21k_384") == "fastervit_4_21k_384"
    assert bench.official_to_ours_name("convnext_tiny") is None
    assert bench.pairs_of(["fastervit_2", "faster_vit_2_224", "faster_vit_0_224"]) == {
        "fastervit_2": "faster_vit_2_224"}


def test_cli_end_to_end_writes_reports(tmp_path: Path, capsys):
    out = tmp_path / "bench"
    threads_before = torch.get_num_threads()
    argv = ["--models", "fastervit_0,test_convnext", "--model-kwargs", f"fastervit_0={json.dumps(TINY)}",
            "--num-classes", "10", "--batch-sizes", "2", "--img-sizes", "64", "--train-batch", "2",
            "--amp", "none,bf16", "--scaling-sizes", "64,96", "--warmup", "1", "--rounds", "2",
            "--iters", "1", "--scaling-batch", "2", "--top1", "fastervit_0=80", "--top1", "test_convnext=70",
            "--baseline", "fastervit_0", "--baseline", "test_convnext:none",
            "--threads", "1", "--gemm-size", "256", "--out", str(out), "--no-progress"]
    assert bench_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| fastervit_0 | 2 | 64 | bf16 |" in printed and "vs test_convnext:fp32 |" in printed

    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == bench.SCHEMA
    assert {"torch", "cpu", "threads", "date_utc"} <= set(result["env"])
    assert result["env"]["threads"] == 1 and torch.get_num_threads() == threads_before
    assert result["config"]["command"].startswith("fastervit bench --models fastervit_0")
    assert result["gemm"]["fp32"]["gmacs_per_s"] > 0
    rows = result["rows"]
    # 2 models x (inference, training) x 2 precisions at 64 px, plus inference at 96 px (sweep: fp32 only)
    assert len(rows) == 2 * 2 * 2 + 2
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows), [r["status"] for r in rows if r["status"] != "ok"]
    for r in ok:
        assert len(r["samples_ms"]) == 2 and r["q1_ms"] <= r["latency_ms"] <= r["q3_ms"]
        assert r["img_per_s"] == pytest.approx(1e3 * r["batch"] / r["latency_ms"])
        assert r["gmacs_per_img"] > 0 and r["peak_mem_mb"] > 0
    first = [r for r in ok if r["model"] == "fastervit_0"]
    assert all(r["ratio_vs_baseline"] == 1.0 for r in first)
    tiny = result["candidates"]["fastervit_0"]
    assert "published_a100_img_s" not in tiny and tiny["published_top1"] == 80  # kwargs: not the paper model

    with (out / "bench.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == CSV_COLUMNS and len(table) == len(rows)
    markdown = (out / "bench.md").read_text()
    for heading in ("## Inference", "## Training step", "## Cost against input size", "| 64 px | 96 px |"):
        assert heading in markdown
    for name in ("accuracy_vs_throughput.png", "time_vs_size.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert result["plots"][name] == "written"


@pytest.mark.skipif(not HAS_OFFICIAL, reason="the official fastervit package is not installed")
def test_official_and_ours_share_weights_and_outputs():
    cfg = BenchConfig(models=["fastervit_0", "faster_vit_0_224"], imports=["fastervit"],
                      model_kwargs={"*": TINY}, num_classes=10, batch_sizes=[2], img_sizes=[64],
                      train_batch=0, scaling_sizes=[64, 96], warmup=0, rounds=1, iters=1, macs=False,
                      memory=False, gemm_size=64, device="cpu", threads=1)
    info: dict = bench.candidate_info(cfg)
    bench.import_plugins(cfg.imports)
    prepared, unavailable = bench.build_at_size(cfg, 64, torch.device("cpu"), info)
    assert unavailable == {}
    ours, official = prepared["fastervit_0"].model, prepared["faster_vit_0_224"].model
    ours_state = ours.state_dict()
    for name, tensor in official_to_ours(official.state_dict()).items():
        assert torch.equal(ours_state[name], tensor), name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), atol=1e-5, rtol=1e-5)
    assert info["fastervit_0"]["same_weights_as"] == "faster_vit_0_224"
    assert info["fastervit_0"]["max_abs_diff_vs_official"]["64"] < 1e-5

    # 96 px: the official stage-3 map (3x3) does not divide by its window (2): n/a, ours still runs
    result = bench.run_benchmark(cfg, progress=False)
    at96 = {r["model"]: r["status"] for r in result["rows"] if r["img_size"] == 96}
    assert at96["fastervit_0"] == "ok" and at96["faster_vit_0_224"].startswith("n/a (")


def test_an_inference_form_that_computes_another_function_is_flagged(tmp_path: Path, monkeypatch):
    """--fuse times each model's inference form; the report compares it with the model as built, so a form that
    computes something else (e.g. the authors' deploy switch thrown before any forward: zero position biases,
    logits off by ~0.05) is marked as not timing the same function."""
    real_fuse = classification.fuse_model

    class Shifted(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 0.5

    def fuse(model: nn.Module) -> nn.Module:
        fused = real_fuse(model)
        return Shifted(fused) if getattr(model, "default_cfg", {}).get("architecture") == "test_convnext" else fused

    monkeypatch.setattr(classification, "fuse_model", fuse)
    out = tmp_path / "b"
    argv = ["--models", "fastervit_0,test_convnext", "--model-kwargs", f"fastervit_0={json.dumps(TINY)}",
            "--num-classes", "10", "--batch-sizes", "1", "--img-sizes", "64", "--train-batch", "0",
            "--scaling-sizes", "", "--warmup", "0", "--rounds", "1", "--iters", "1", "--no-macs", "--no-memory",
            "--threads", "1", "--gemm-size", "64", "--fuse", "--output", str(out), "--no-progress"]
    assert bench_cli.main(argv) == 0
    result = json.loads((out / "bench.json").read_text())
    forms = {n: i["inference_form_max_abs_diff"]["64"] for n, i in result["candidates"].items()}
    assert forms["fastervit_0"] < 1e-5
    assert forms["test_convnext"] == pytest.approx(0.5, abs=1e-5)
    markdown = (out / "bench.md").read_text()
    assert "test_convnext: inference form vs the model as built, largest absolute output difference" in markdown
    assert markdown.count("NOT the same function") == 1


def test_bench_runtimes_quick_side_by_side(tmp_path: Path, capsys) -> None:
    """``fastervit bench --runtimes --quick``: every asked form timed or skipped with its reason, ratios, agreement."""
    from open_fastervit.cli import main as cli_main

    out = tmp_path / "rt"
    rc = cli_main(["bench", "--runtimes", "--quick", "--out", str(out),
                   "--forms", "authors fp32,torch fp32,torch bf16,openvino fp32,openvino bf16"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    result = json.loads((out / "runtimes.json").read_text())
    forms = result["forms"]
    assert "authors' package builds its published architectures only" in forms["authors fp32"]["skipped"]
    assert forms["torch.compile"]["skipped"] == "not asked for"
    assert forms["torch fp32"]["agreement"] == 1.0 and forms["openvino fp32"]["agreement"] == 1.0
    assert forms["openvino fp32"]["max_rel_error"] < 1e-4
    if "BF16" not in result["openvino_capabilities"]:
        assert "no BF16" in forms["openvino bf16"]["skipped"]
    if "bf16" not in result["native_precisions"]:
        assert "emulated" in forms["torch bf16"]["note"]
    rows = {(r["form"], r["batch"]): r for r in result["rows"]}
    assert set(rows) >= {(f, b) for f in ("torch fp32", "torch bf16", "openvino fp32") for b in (1, 4)}
    assert rows[("torch fp32", 4)]["vs_ours_fp32"] == 1.0 and rows[("openvino fp32", 1)]["vs_authors_fp32"] is None
    table = (out / "runtimes.md").read_text()
    assert "| openvino fp32 | 4 |" in table and "authors fp32: skipped" in table and table in printed.out


def test_runtimes_baseline_needs_the_users_import(monkeypatch) -> None:
    """The library never imports the authors' package: without ``--import fastervit`` the baseline says how."""
    import timm as timm_module

    from open_fastervit.bench import runtimes

    model = timm_module.create_model("fastervit_0", **TINY)
    monkeypatch.setattr(runtimes.timm, "is_model", lambda name: False)  # as in a process that imported nothing
    with pytest.raises(BenchError, match=r"faster_vit_0_224 is not registered with timm: add --import fastervit"):
        runtimes._official(runtimes.RuntimeConfig(model="fastervit_0"), model)

"""HAT as a plug-in for timm's Swin Transformer (open_fastervit.plugins.hat_swin) and the README example."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer

import open_fastervit  # noqa: F401  (registers the hat_swin_* models)
from open_fastervit.plugins import HatSwinTransformer, add_hat, carrier_keys, load_swin_state_dict

TINY = dict(img_size=64, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4, num_classes=10)
REPO = Path(__file__).resolve().parents[1]


def _swin(seed: int = 0, **kwargs) -> SwinTransformer:
    torch.manual_seed(seed)
    return SwinTransformer(**{**TINY, **kwargs})


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stages, ct", [((), 2), ((0, 1, 2), 0)])
def test_off_is_timm_swin(stages, ct):
    host, model = _swin().eval(), add_hat(_swin(1), stages, ct).eval()
    model.load_state_dict(host.state_dict())
    assert type(model) is SwinTransformer and not carrier_keys(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), host(x), rtol=1e-6, atol=0)


def test_hatswin_class_off_matches_host():
    torch.manual_seed(0)
    model = HatSwinTransformer(**TINY, hat_stages=(), carrier_size=2).eval()
    host = _swin().eval()
    host.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), host(x), rtol=1e-6, atol=0)


def test_checkpoint_load_reports_exactly_carrier_keys():
    host = _swin()
    model = add_hat(_swin(1), (1, 2), 2)
    new = carrier_keys(model)
    assert new and all(".carrier_init." in k or ".carrier_attn." in k for k in new)
    assert {k: v.shape for k, v in model.state_dict().items() if k not in new} == {
        k: v.shape for k, v in host.state_dict().items()
    }
    missing = load_swin_state_dict(model, host.state_dict())
    assert sorted(missing) == sorted(new)
    for k, v in host.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_checkpoint_of_another_swin_is_refused():
    model = add_hat(_swin(), (1,), 2)
    other = _swin(embed_dim=32).state_dict()
    with pytest.raises(RuntimeError):
        load_swin_state_dict(model, other)
    with pytest.raises(RuntimeError, match="missing"):
        load_swin_state_dict(model, {k: v for k, v in _swin().state_dict().items() if "head" not in k})


def test_hat_changes_outputs_and_trains():
    host = _swin().eval()
    model = add_hat(_swin(), (0, 1), 2)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), host(x), atol=1e-4)
    model.train()
    y = torch.randint(0, 10, (4,))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for k in ("layers.0.carrier_init.pos_conv.weight", "layers.1.blocks.0.carrier_attn.attn.qkv.weight"):
            assert model.get_parameter(k).grad.abs().sum() > 0, k
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _far_window_gradient(stage: torch.nn.Module) -> float:
    """|d out(window 0) / d in(last window)| of a one-block stage: input (1, 16, 16, C) -> 8x8 map, 2x2 windows."""
    x = torch.randn(1, 16, 16, stage.dim, requires_grad=True)
    stage(x)[:, :4, :4].sum().backward()
    return x.grad[:, 8:, 8:].abs().sum().item()


@pytest.mark.parametrize("h, w, ws, ct", [(16, 16, 4, 2), (14, 9, 4, 3), (8, 20, 7, 1)])
def test_carrier_grid_matches_window_grid(h, w, ws, ct):
    from open_fastervit.layers import WindowGrid
    from open_fastervit.plugins.hat_swin import CarrierGrid

    ours, ref = CarrierGrid(h, w, (ws, ws), ct), WindowGrid(h, w, ws, ct)
    assert (ours.nh, ours.nw, ours.carrier_grid) == (ref.nh, ref.nw, ref.carrier_grid)
    for a, b in zip(ours.carrier_pool_matrices(torch.device("cpu"), torch.float32),
                    ref.carrier_pool_matrices(torch.device("cpu"), torch.float32)):
        torch.testing.assert_close(a, b)
    t = torch.randn(2, ref.num_windows * ct * ct, 3)
    torch.testing.assert_close(ours.carriers_to_raster(t), ref.carriers_to_raster(t))
    torch.testing.assert_close(ours.raster_to_carriers(ours.carriers_to_raster(t)), t)


def test_carriers_reach_across_windows():
    host = _swin().eval()
    model = add_hat(_swin(), (1,), 2).eval()
    assert len(host.layers[1].blocks) == 1 and not any(host.layers[1].blocks[0].shift_size)
    assert _far_window_gradient(host.layers[1]) == 0.0
    assert _far_window_gradient(model.layers[1]) > 0.0


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (32, 32)])
def test_dynamic_input_sizes(size):
    model = add_hat(_swin(dynamic_img_size=True), (0, 1), 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 10)


def test_other_img_size_at_build():
    model = add_hat(_swin(img_size=96), (0, 1), 3).eval()  # stage 0: 24x24 tokens = 6x6 windows
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 10)


def test_grad_checkpointing_matches():
    model = add_hat(_swin(), (1,), 2).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("name", ["hat_swin_tiny_patch4_window7_224", "hat_swin_small_patch4_window7_224",
                                  "hat_swin_base_patch4_window7_224"])
def test_registered(name):
    assert name in timm.list_models("hat_swin_*")
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id.startswith("timm/swin_")


def test_registered_create_small_config():
    model = timm.create_model("hat_swin_tiny_patch4_window7_224", **{**TINY, "num_classes": 5}, hat_stages=(1,),
                              carrier_size=1).eval()
    assert isinstance(model, HatSwinTransformer) and carrier_keys(model)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_features_only():
    model = timm.create_model("hat_swin_tiny_patch4_window7_224", **{**TINY, "num_classes": 0}, hat_stages=(0, 1),
                              features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 24), (1, 8, 8, 48), (1, 4, 4, 96), (1, 2, 2, 192)]


def test_pretrained_filter_keeps_carriers_new():
    from open_fastervit.plugins.hat_swin import checkpoint_filter_fn

    torch.manual_seed(0)
    model = HatSwinTransformer(**TINY, hat_stages=(1,), carrier_size=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    state = checkpoint_filter_fn(_swin(3).state_dict(), model)
    model.load_state_dict(state, strict=True)
    for k in carrier_keys(model):
        assert torch.equal(model.state_dict()[k], fresh[k])


@pytest.mark.parametrize("kwargs, match", [(dict(stages=(4,)), "out of range"), (dict(stages=(-1,)), "out of range"),
                                           (dict(carrier_size=-1), "carrier_size"), (dict(stages=(1, 1)), "repeated")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        add_hat(_swin(), **kwargs)


def test_twice_and_wrong_host():
    model = add_hat(_swin(), (1,), 2)
    with pytest.raises(ValueError, match="already"):
        add_hat(model, (1,), 2)
    with pytest.raises(TypeError):
        add_hat(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_readme_own_network_example():
    # --- the README's "put HAT into your own network" example, verbatim ---
    from torch import nn

    from open_fastervit.layers import HierarchicalAttention

    class TinyNet(nn.Module):
        """Conv stem (stride 8) -> HAT stage -> pooled linear head."""

        def __init__(self, num_classes: int = 10, dim: int = 64) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, dim, 8, stride=8), nn.BatchNorm2d(dim))
            self.hat = HierarchicalAttention(dim, num_heads=2, window_size=7, carrier_size=2, depth=2)
            self.head = nn.Linear(dim, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.hat(self.stem(x))  # (B, C, H, W) -> (B, C, H, W), any H, W >= 1
            return self.head(x.mean((2, 3)))

    net = TinyNet()
    for size in (224, 100, 8):
        assert net(torch.randn(2, 3, size, size)).shape == (2, 10)
    # --- end of example ---
    assert isinstance(net.hat, HierarchicalAttention) and net.hat.uses_carriers(28, 28)


def _experiment():
    spec = importlib.util.spec_from_file_location("hat_plugin", REPO / "experiments" / "hat_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_quick(tmp_path):
    script = REPO / "experiments" / "hat_plugin.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True, cwd=REPO,
                   timeout=600, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"setup", "imagenet10", "carrier_ablation", "long_range", "speed", "cost", "seconds"} <= set(results)
    assert {"swin", "swin+hat", "data"} <= set(results["imagenet10"])
    assert {"swin", "swin+hat", "setup"} <= set(results["long_range"])
    assert {"top1", "epoch_loss", "params"} <= set(results["long_range"]["swin+hat"])
    assert [a["carrier_size"] for a in results["carrier_ablation"]] == [0, 1, 2, 3]
    assert set(results["speed"]["imagenet10"]) == {"ct0", "ct1", "ct2", "ct3"}
    assert {"input", "window_ms", "hat_ms", "global_ms", "global_attn_gmacs"} <= set(results["cost"][0])
    assert (tmp_path / "results.md").read_text().startswith("# HAT as a plug-in")


def test_experiment_arguments(tmp_path):
    hp = _experiment()
    with pytest.raises(ValueError, match="unknown parts"):
        hp.run(tmp_path, quick=True, parts=["bogus"])
    with pytest.raises(ValueError, match="does not exist"):
        hp.run(tmp_path, quick=True, parts=["cost"])
    # attention multiply-adds: one window covering the map equals global; carriers add their share
    assert hp.attention_macs(14, 14, 8, None) == hp.attention_macs(14, 14, 8, 14)
    assert hp.attention_macs(14, 14, 8, 7, 2) == 4 * 2 * 53**2 * 8 + 2 * 16**2 * 8

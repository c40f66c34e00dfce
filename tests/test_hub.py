"""The Hugging Face / timm model folder (issue 10, point 4): save_pretrained, loading back, licence, push_to_hub."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from conftest import randomise

import open_fastervit
from open_fastervit.deploy.hub import APACHE, NVIDIA_NC, push_to_hub, save_pretrained, weights_license

# a non-default architecture: the folder must rebuild it from config.json alone
SMALL = dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3), num_classes=10)


@pytest.fixture
def small() -> torch.nn.Module:
    return randomise(timm.create_model("fastervit_0", **SMALL), spread=0.2).eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 100, 70)  # carriers on, padded, non-square
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_folder_round_trips_through_timm_local_dir_and_load_model(small, tmp_path) -> None:
    folder = save_pretrained(small, tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "fastervit_0" and config["num_classes"] == 10
    assert config["num_features"] == 128
    assert config["model_args"]["dim"] == 16 and config["model_args"]["window_size"] == [7, 7, 3, 3]
    assert config["pretrained_cfg"]["license"] == APACHE  # random / own weights

    _same_outputs(small, timm.create_model(f"local-dir:{folder}", pretrained=True))
    loaded = open_fastervit.load_model(folder)
    _same_outputs(small, loaded)
    assert weights_license(loaded) == APACHE

    card = (folder / "README.md").read_text()
    assert "license: apache-2.0" in card and "Licence of these weights: Apache-2.0" in card
    assert "arXiv:2306.06189" in card


def test_a_fused_snapshot_is_refused_and_its_source_model_saves(small, tmp_path) -> None:
    fused = copy.deepcopy(small).fuse()
    with pytest.raises(ValueError, match="fused inference snapshot.*before fusing"):
        save_pretrained(fused, tmp_path / "fused")
    folder = save_pretrained(small, tmp_path / "plain")
    _same_outputs(fused, open_fastervit.load_model(folder).fuse())


def test_licence_of_official_weights_and_override(small, tmp_path) -> None:
    small.weights_info = {"weights": "official raw", "source": "fastervit_0_224_1k.pth.tar"}
    assert weights_license(small) == NVIDIA_NC
    published = copy.deepcopy(small)
    published.weights_info = {"weights": "pretrained", "source": "fastervit_0"}
    assert weights_license(published) == NVIDIA_NC  # the zoo cfg's licence
    folder = save_pretrained(small, tmp_path / "nc")
    card = (folder / "README.md").read_text()
    assert "license: other" in card and f"license_name: {NVIDIA_NC}" in card and "NVIDIA Source Code License-NC" in card
    # the licence travels with the folder, whichever loader reads it
    assert weights_license(open_fastervit.load_model(folder)) == NVIDIA_NC
    assert weights_license(timm.create_model(f"local-dir:{folder}", pretrained=True)) == NVIDIA_NC

    overridden = save_pretrained(small, tmp_path / "own", license=APACHE, model_card=False)
    assert not (overridden / "README.md").exists()
    assert json.loads((overridden / "config.json").read_text())["pretrained_cfg"]["license"] == APACHE


def test_push_to_hub_uploads_the_folder(small, monkeypatch) -> None:
    import huggingface_hub

    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        folder = Path(folder_path)
        calls["upload"] = (repo_id, sorted(p.name for p in folder.iterdir()), kwargs)
        calls["card"] = (folder / "README.md").read_text()
        calls["config"] = json.loads((folder / "config.json").read_text())
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert push_to_hub(small, "someone/fastervit-tiny", private=True) == "commit"
    assert calls["create"] == ("someone/fastervit-tiny", {"private": True, "exist_ok": True})
    repo, files, kwargs = calls["upload"]
    assert repo == "someone/fastervit-tiny" and files == ["README.md", "config.json", "model.safetensors"]
    assert kwargs["commit_message"] and 'hf-hub:someone/fastervit-tiny' in calls["card"]
    assert calls["config"]["model_args"]["depths"] == [1, 1, 2, 2]

"""The Hugging Face / timm model folder: write one (:func:`save_pretrained`), publish one (:func:`push_to_hub`).

A folder holds

- ``config.json``: timm's layout, written by timm's own ``save_config_for_hf`` (``architecture``, ``num_classes``,
  ``num_features``, ``global_pool``, ``model_args`` with the architecture arguments that differ from the registered
  defaults, ``pretrained_cfg`` with the preprocessing and the weights' licence), so
  ``timm.create_model("local-dir:DIR", pretrained=True)``, ``timm.create_model("hf-hub:USER/REPO",
  pretrained=True)`` and ``open_fastervit.load_model(DIR)`` rebuild the same model;
- ``model.safetensors``: the state dict (written atomically, with the architecture and licence in its metadata);
- ``README.md``: a model card (timm's card layout) stating the licence of the *weights*.

The weights' licence is not the code's: weights converted from the authors' checkpoints (``nvidia/FasterViT``) carry
the NVIDIA Source Code License-NC; weights trained with this package are Apache-2.0 by default. It is read from the
model (:func:`weights_license`) and the caller can override it (``license=``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from safetensors import safe_open
from timm.models._hub import generate_readme, save_config_for_hf
from torch import nn

from ..layers import FusedConv2d, FusedLinear
from ..serialization import atomic_write, save_weights

__all__ = ["APACHE", "NVIDIA_NC", "push_to_hub", "save_pretrained", "weights_license"]

#: Hugging Face licence ids.
APACHE = "apache-2.0"
NVIDIA_NC = "nvidia-source-code-license-nc"
_LICENSE_CARD = {
    APACHE: dict(license=APACHE),
    NVIDIA_NC: dict(license="other", license_name=NVIDIA_NC,
                    license_link="https://github.com/NVlabs/FasterViT/blob/main/LICENSE"),
}
_LICENSE_TEXT = {
    APACHE: "Apache-2.0",
    NVIDIA_NC: "NVIDIA Source Code License-NC (non-commercial; converted from the authors' checkpoints, "
    "https://huggingface.co/nvidia/FasterViT)",
}
_CITATION = """@inproceedings{hatamizadeh2024fastervit,
  title={FasterViT: Fast Vision Transformers with Hierarchical Attention},
  author={Hatamizadeh, Ali and Heinrich, Greg and Yin, Hongxu and Tao, Andrew and Alvarez, Jose M. and Kautz, Jan and
          Molchanov, Pavlo},
  booktitle={International Conference on Learning Representations},
  year={2024}
}"""


def _file_metadata(file: Any) -> dict[str, str]:
    if not file or not str(file).endswith(".safetensors") or not Path(str(file)).is_file():
        return {}
    with safe_open(str(file), framework="pt") as f:
        return dict(f.metadata() or {})


def weights_license(model: nn.Module) -> str:
    """Licence id of ``model``'s weights, from what loaded them (``model.weights_info``, ``pretrained_cfg``).

    - converted official weights (``weights_info["weights"]`` ``"official ..."``), and the published weights
      fetched by name: the zoo cfg's licence (NVIDIA Source Code License-NC);
    - a model folder or safetensors file that states a licence (ours do): that licence; a safetensors file converted
      from an official ``.pth.tar`` (``fastervit convert`` records the source): NVIDIA Source Code License-NC;
    - anything else (random weights, weights trained here): Apache-2.0.

    Fine-tuned official weights are a derivative of them: pass ``license=`` to :func:`save_pretrained` for those.
    """
    info = getattr(model, "weights_info", None) or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    kind = str(info.get("weights", ""))
    if kind.startswith("official"):
        return NVIDIA_NC
    meta = _file_metadata(info.get("file") or info.get("source") or cfg.get("file"))
    if meta.get("license"):
        return meta["license"]
    if meta.get("source", "").endswith((".pth.tar", ".pth")):
        return NVIDIA_NC
    from_cfg = kind == "pretrained" or (kind == "plain" and Path(str(info.get("source", ""))).is_dir())
    if from_cfg and cfg.get("license"):
        return str(cfg["license"])
    return APACHE


def _check_savable(model: nn.Module) -> None:
    if any(isinstance(m, (FusedConv2d, FusedLinear)) for m in model.modules()):
        raise ValueError(
            "this model is a fused inference snapshot (model.fuse() / inference_form()): its folded weights do not "
            "load into a trainable model. Save the model before fusing it (or load it again with load_model)"
        )
    if not getattr(model, "pretrained_cfg", None) or getattr(model, "num_classes", None) is None:
        raise ValueError(
            f"cannot describe a {type(model).__name__} for timm: build it with timm.create_model / "
            "open_fastervit.load_model (they record the architecture and its arguments)"
        )


def _model_card(model: nn.Module, name: str, license_id: str, config: Mapping[str, Any]) -> str:
    args = config.get("model_args") or {}
    info = getattr(model, "weights_info", None) or {}
    card = {
        **_LICENSE_CARD.get(license_id, dict(license=license_id)),
        "tags": ["image-classification", "timm", "open_fastervit", "fastervit"],
        "description": (
            f"A FasterViT image classifier ({config['architecture']}, arXiv:2306.06189) in the timm layout, written "
            "by open_fastervit (an Apache-2.0 implementation of the paper).\n\n"
            f"**Licence of these weights: {_LICENSE_TEXT.get(license_id, license_id)}.** The open_fastervit code is "
            "Apache-2.0; the licence above applies to the weights in this folder."
        ),
        "details": {
            "Model Type": "Image classification / feature backbone",
            "Architecture": config["architecture"],
            "Architecture arguments": json.dumps(args) if args else "the registered defaults",
            "Classes": config.get("num_classes"),
            "Params (M)": f"{sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()) / 1e6:.2f}",
            "Weights": str(info.get("weights", "as trained")) + (f" ({info['source']})" if info.get("source") else ""),
            "Paper": "FasterViT: Fast Vision Transformers with Hierarchical Attention, https://arxiv.org/abs/2306.06189",
        },
        "usage": (
            "```python\n"
            "import timm, open_fastervit  # importing open_fastervit registers the fastervit_* architectures\n"
            f'model = timm.create_model("hf-hub:{_hub_name(name)}", pretrained=True).eval()  # or "local-dir:FOLDER"\n'
            f'model = open_fastervit.load_model("FOLDER")  # the same model through open_fastervit\n'
            "```\n"
            "Any input size of at least 32 px works (square or not)."
        ),
        "citation": _CITATION,
    }
    return generate_readme(card, name.split("/")[-1])


def _hub_name(name: str) -> str:
    return name if "/" in name else "USER/REPO"


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    license: str | None = None,
    model_card: bool = True,
    name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face / timm model folder (``config.json``, ``model.safetensors``, ``README.md``).

    Args:
        model: a trainable FasterViT (or any timm model) built by ``timm.create_model`` / ``load_model``.
        directory: the folder (created; files in it are replaced).
        license: licence id of the weights (e.g. ``"apache-2.0"``, ``"nvidia-source-code-license-nc"``); default
            :func:`weights_license`. Stored in ``config.json`` (``pretrained_cfg.license``), in the safetensors
            metadata and in the model card.
        model_card: write ``README.md``.
        name: the repository name shown in the card (default: the folder name).
        model_args: architecture arguments to record besides those timm recorded when building the model.

    Returns:
        ``directory``.

    Raises:
        ValueError: a fused inference snapshot (its folded weights do not rebuild a trainable model), or a model timm
            cannot describe (no ``pretrained_cfg``).
    """
    _check_savable(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    license_id = license or weights_license(model)
    info = getattr(model, "weights_info", None) or {}
    extra: dict[str, Any] = {"pretrained_cfg": {"license": license_id}}
    if info.get("class_names") and len(info["class_names"]) == getattr(model, "num_classes", None):
        extra["label_names"] = list(info["class_names"])
    atomic_write(directory / "config.json",
                 lambda tmp: save_config_for_hf(model, tmp, model_config=extra, model_args=dict(model_args or {})))
    config = json.loads((directory / "config.json").read_text())
    save_weights(model, directory / "model.safetensors", metadata={
        "architecture": config["architecture"], "model_kwargs": config.get("model_args") or {},
        "license": license_id,
    })
    if model_card:
        text = _model_card(model, name or directory.name, license_id, config)
        atomic_write(directory / "README.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    license: str | None = None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Add FasterViT model",
    model_args: Mapping[str, Any] | None = None,
) -> Any:
    """Publish ``model`` on the Hugging Face hub: :func:`save_pretrained` into a temporary folder, then
    ``huggingface_hub.HfApi.create_repo`` (exist_ok) and ``upload_folder``.

    Returns:
        ``upload_folder``'s commit info.

    Raises:
        ValueError: as :func:`save_pretrained`; huggingface_hub's errors (no token, no network) pass through.
    """
    api = HfApi(token=token, library_name="open_fastervit")
    with tempfile.TemporaryDirectory(prefix="fastervit_hub_") as tmp:
        save_pretrained(model, tmp, license=license, name=repo_id, model_args=model_args)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=tmp, revision=revision,
                                 create_pr=create_pr, commit_message=commit_message)

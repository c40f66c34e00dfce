"""One way to load a model: :func:`load_model` builds any FasterViT with any weights we know how to read.

``source`` is one of

- a model name: ours (``fastervit_0``, with or without a pretrained tag such as ``fastervit_0.in1k``), an official
  alias (``faster_vit_0_224``) or any other timm name. With ``pretrained=True`` (the default) the published
  weights come through timm's pretrained mechanism (the zoo's Hugging Face hub cfg; HF cache first); when they
  cannot be had the error says how to pass a file. ``pretrained=False`` asks for random weights by name.
- a file: our ``.safetensors``, a training checkpoint (``.pt``/``.pth``) written by ``fastervit train``, or an
  official ``.pth.tar`` (keys converted). The architecture is taken from ``architecture=``, else the file's
  metadata (``architecture``, ``arch``, the training config or the official ``args``), else ``fastervit_0``.
  An ``architecture=`` other than the one the file names is an error naming both when the weights do not fit
  it; when they fit (e.g. the same weights at another input size) it is used with a warning naming both, and
  ``weights_info["file_architecture"]`` records the file's. Architecture arguments come
  from ``model_kwargs=``, else the file's ``model_kwargs`` (written by ``save_weights`` and the trainer).
- a folder in the Hugging Face / timm layout (``config.json`` with ``architecture``, ``num_classes``,
  ``model_args``, ``pretrained_cfg``; ``model.safetensors``), read through timm's ``local-dir:`` source.
- a run folder of ``fastervit train``: its ``best.safetensors`` (:data:`RUN_WEIGHTS`), read as a file.
- a file of a runtime that registered its suffix with :func:`register_file_type` (``import open_fastervit``
  registers the exported ``.pt2`` programs and the ``.onnx`` files, fp32 exports and int8 files of
  ``fastervit quantize``). Such a file carries its own architecture: ``architecture``, ``model_kwargs`` and
  ``use_ema`` do not apply to it; a ``num_classes`` or ``in_chans`` other than the file's is an error.

Every route ends in the zoo's timm entry point (``timm.create_model(..., pretrained=True)``), which reads files with
``open_fastervit.serialization`` (``weights_only`` loading), converts official keys, adapts the stem to ``in_chans``
and fits the head, so ``timm.create_model`` with a ``file`` overlay and this function give the same weights and the
same errors.

The classifier head policy (``head``):

- ``"keep"`` (default): the checkpoint's head; ``num_classes`` defaults to the checkpoint's class count and any
  other value is an error.
- ``"resize"``: the checkpoint's head when its class count equals ``num_classes``, else a fresh head of
  ``num_classes`` (reported).
- ``"reinit"``: always a fresh head of ``num_classes`` (default: the checkpoint's count), reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .convert import is_official_state_dict, official_to_ours
from .serialization import (
    ARCH_HINT,
    HEAD_POLICIES,
    KWARGS_HINT,
    CheckpointError,
    check_finite,
    checkpoint_classes,
    ema_mode,
    fit_state,
    read_weights,
)
from .zoo import MODEL_ARGS, OFFICIAL_NAMES, resolve_name

__all__ = [
    "DEFAULT_MODEL",
    "RUN_WEIGHTS",
    "WEIGHT_SUFFIXES",
    "FileType",
    "architecture_name",
    "classifier_name",
    "file_types",
    "load_into",
    "load_model",
    "load_official",
    "load_official_checkpoint",
    "register_file_type",
]

_logger = logging.getLogger(__name__)

#: The architecture of a weights file that names none.
DEFAULT_MODEL = "fastervit_0"
#: The weights a training run folder is loaded from.
RUN_WEIGHTS = "best.safetensors"
#: Suffixes of the weights files read here (``open_fastervit.serialization``): safetensors and torch checkpoints.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".tar", ".bin", ".ckpt")


@dataclass(frozen=True)
class FileType:
    """A file type a runtime registered: ``open(path)`` returns a module taking ``(B, C, H, W)`` float images and
    returning ``(B, classes)`` logits, with ``num_classes``, ``pretrained_cfg`` and ``weights_info`` set."""

    suffix: str
    open: Callable[[Path], nn.Module]
    description: str


_FILE_TYPES: dict[str, FileType] = {}


def register_file_type(suffix: str, opener: Callable[[Path], nn.Module], description: str) -> None:
    """Let :func:`load_model` open files ending in ``suffix`` with ``opener(path)`` (a runtime registers its files
    this way when it is imported; registering a suffix again replaces its opener).

    Raises:
        ValueError: a suffix that does not start with ``.``, or one of :data:`WEIGHT_SUFFIXES`.
    """
    key = suffix.lower()
    if not key.startswith(".") or len(key) < 2:
        raise ValueError(f"a file type suffix starts with '.', got {suffix!r}")
    if key in WEIGHT_SUFFIXES:
        raise ValueError(f"{suffix} is a weights file read by load_model itself; it cannot be registered")
    _FILE_TYPES[key] = FileType(key, opener, description)


def file_types() -> dict[str, str]:
    """Every suffix :func:`load_model` takes -> what it is (weights files first, then the registered runtimes)."""
    types = {suffix: "weights (safetensors or torch checkpoint)" for suffix in WEIGHT_SUFFIXES}
    return {**types, **{t.suffix: t.description for t in _FILE_TYPES.values()}}


def _registered(path: Path) -> FileType | None:
    name = path.name.lower()
    return next((t for t in _FILE_TYPES.values() if name.endswith(t.suffix)), None)


def _is_name(source: str) -> bool:
    base = source.split(".", 1)[0]
    return base in MODEL_ARGS or base in OFFICIAL_NAMES or timm.is_model(source)


def architecture_name(name: str) -> str:
    """The timm name ``name`` builds: ours for a FasterViT or official name (``faster_vit_0_224`` ->
    ``fastervit_0``), any other timm name as it is.

    Raises:
        ValueError: a name timm does not know, with the closest FasterViT names.
    """
    base = name.split(".", 1)[0]
    if base in MODEL_ARGS or base in OFFICIAL_NAMES:
        return resolve_name(name)
    if timm.is_model(name):
        return name
    return resolve_name(name)  # raises ValueError with close matches


def _tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists -> tuples (architecture kwargs such as ``depths`` are per-stage tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _create(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, **_tuples(kwargs))
    except TypeError as e:
        given = {k: v for k, v in kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay")}
        raise ValueError(f"{name} does not accept model_kwargs {given}: {e}") from None
    except RuntimeError as e:  # timm's generic errors: unknown model, failed load of a foreign model's weights
        if "Unknown model" in str(e):
            raise ValueError(f"unknown model {name!r}; FasterViT models: {timm.list_models('fastervit*')}") from None
        raise CheckpointError(f"{name}: {e}") from e
    except OSError as e:  # downloads of other timm models' weights
        raise CheckpointError(
            f"the pretrained weights of {name} cannot be had ({e}); pass a weights file (--checkpoint FILE) or "
            "ask for random weights (--random-weights; Python: pretrained=False)"
        ) from None


def _head_classes(head: str, num_classes: int | None, classes: int | None, what: str) -> int | None:
    """The model's class count under the head policy, given the checkpoint's (None: unknown)."""
    if head not in HEAD_POLICIES:
        raise ValueError(f"head must be one of {', '.join(HEAD_POLICIES)}, got {head!r}")
    if head == "keep" and num_classes is not None and classes is not None and num_classes != classes:
        raise CheckpointError(
            f"{what} has a {classes}-class classifier but num_classes={num_classes}; leave num_classes unset to "
            "keep the checkpoint's head, or pass head='resize' (or 'reinit') for a fresh head of num_classes"
        )
    return num_classes if num_classes is not None else classes


def load_model(
    source: str | Path,
    *,
    architecture: str | None = None,
    num_classes: int | None = None,
    head: str = "keep",
    use_ema: bool | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    in_chans: int | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build a model and load its weights from ``source`` (see the module docstring for what it may be).

    Args:
        source: model name, weights file, run folder, Hugging Face / timm model folder, or a registered runtime
            file (:func:`file_types`).
        architecture: the timm name to build for a file (default: the file's metadata, else ``fastervit_0``).
        num_classes: classifier width (default: the checkpoint's); see ``head``.
        head: ``"keep"``, ``"resize"`` or ``"reinit"`` (module docstring).
        use_ema: for checkpoints holding raw and EMA weights: True requires the EMA weights, False takes the raw
            ones, None (default) prefers the EMA ones.
        model_kwargs: architecture arguments (override those stored in the file).
        in_chans: input channels; RGB weights are adapted as timm does (``adapt_input_conv``), reported.
        pretrained: for a model name: the published weights (True) or random weights (False, reported as such).
        device: where to put the model (default: CPU).

    Returns:
        The model in eval mode. ``model.weights_info`` reports what was loaded: ``weights`` (``"random"``,
        ``"pretrained"``, ``"ema"``, ``"raw"``, ``"plain"``, ``official ...``), ``source``, ``num_classes``,
        ``reinitialized`` (fresh classifier keys), ``in_chans`` (``"3 -> 1"`` when adapted) and any metadata
        stored in the file (``class_names``, ``data_config``, ``img_size``, ``model_kwargs``, ``architecture``).

    Raises:
        CheckpointError: a file that is missing, corrupt, unsafe, holds NaN/inf weights (the tensors named) or does
            not fit; published weights that cannot be
            had (offline); a head that disagrees with ``num_classes`` under ``head="keep"``; a file of a type it does
            not take (the message lists those it takes); a runtime file given another head or channel count.
        ValueError: unknown model name, bad architecture arguments or head policy; a runtime's own errors (e.g.
            ``QuantizeError`` for an ``.onnx`` file onnxruntime cannot open).
    """
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    text = str(source)
    path = Path(text).expanduser()
    runtime = _registered(path)
    if path.is_dir() and _is_run_folder(path):
        model, info = _from_file(path / RUN_WEIGHTS, architecture, num_classes, head, use_ema, kwargs)
    elif path.is_dir():
        model, info = _from_folder(path, architecture, num_classes, head, kwargs)
    elif path.is_file() and runtime is not None:
        return _from_runtime(runtime, path, num_classes, head, in_chans, device)
    elif path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{path}: unknown file type {path.suffix or '(no suffix)'}; load_model takes "
                                  + ", ".join(f"{suffix} ({what})" for suffix, what in file_types().items()))
        model, info = _from_file(path, architecture, num_classes, head, use_ema, kwargs)
    elif _is_name(text) or not (path.suffix.lower() in file_types() or "/" in text or "\\" in text):
        model, info = _from_name(text, num_classes, head, pretrained, kwargs)
    else:
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if info.get("weights") != "random":  # every file type, the HF folder and published weights alike
        check_finite(model.state_dict(), info.get("source") or text)
    if head == "reinit" and "reinitialized" in info and not info["reinitialized"]:
        model.reset_classifier(model.num_classes)
        classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head.fc"
        info["reinitialized"] = [f"{classifier}.weight", f"{classifier}.bias"]
        _logger.warning("classifier %s re-initialised (head='reinit')", classifier)
    info["num_classes"] = getattr(model, "num_classes", None)
    model.weights_info = info
    if device is not None:
        model = model.to(device)
    return model.eval()


def _from_runtime(runtime: FileType, path: Path, num_classes: int | None, head: str, in_chans: int | None,
                  device: str | torch.device | None) -> nn.Module:
    """A registered runtime's file: opened as it is (its architecture, head and input channels are fixed)."""
    model = runtime.open(path)
    classes, chans = getattr(model, "num_classes", None), getattr(model, "in_chans", 3)
    if head != "keep" or (num_classes is not None and num_classes != classes):
        raise CheckpointError(f"{path} is a {runtime.description} with a fixed {classes}-class head; it cannot be "
                              f"given another (num_classes={num_classes}, head={head!r})")
    if in_chans is not None and in_chans != chans:
        raise CheckpointError(f"{path} is a {runtime.description} taking {chans}-channel images, not {in_chans}")
    model.weights_info = {"source": str(path), **dict(getattr(model, "weights_info", None) or {}),
                          "num_classes": classes}
    if device is not None:
        model = model.to(device)
    return model.eval()


def _is_run_folder(folder: Path) -> bool:
    """A folder written by ``fastervit train``: its ``best.safetensors``, and no Hugging Face ``config.json`` (one
    naming an ``architecture``) beside it."""
    if not (folder / RUN_WEIGHTS).is_file():
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return True
    return not (isinstance(config, dict) and "architecture" in config)


def _report(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "weights_info", None) or {"reinitialized": [], "in_chans": None})


def _from_name(
    name: str, num_classes: int | None, head: str, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    arch = architecture_name(name)
    if not pretrained:
        model = _create(arch, {**kwargs, "num_classes": num_classes} if num_classes else kwargs)
        _logger.info("%s has random weights (pretrained=False)", arch)
        return model, {"weights": "random", "source": name}
    cfg = timm.models.get_pretrained_cfg(arch)
    classes = getattr(cfg, "num_classes", None) if cfg is not None else None
    _head_classes(head, num_classes, classes, f"the published {arch}")
    model = _create(arch, {**kwargs, "pretrained": True, "num_classes": num_classes})
    return model, {"weights": "pretrained", "source": name, **_report(model)}


def _from_folder(
    folder: Path, architecture: str | None, num_classes: int | None, head: str, kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} is not a model folder: it has no config.json (Hugging Face / timm layout)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise CheckpointError(f"{config_file} names no 'architecture' (timm's config.json layout)")
    if architecture and architecture_name(architecture) != architecture_name(config["architecture"]):
        raise CheckpointError(f"{folder} holds a {config['architecture']}, not a {architecture}")
    classes = config.get("num_classes", (config.get("pretrained_cfg") or {}).get("num_classes"))
    _head_classes(head, num_classes, classes, str(folder))
    model = _create(f"local-dir:{folder}", {**kwargs, "pretrained": True, "num_classes": num_classes})
    return model, {"weights": "plain", "source": str(folder), **_report(model)}


def _from_file(
    path: Path,
    architecture: str | None,
    num_classes: int | None,
    head: str,
    use_ema: bool | None,
    kwargs: dict[str, Any],
) -> tuple[nn.Module, dict[str, Any]]:
    state, info = read_weights(path, ema_mode(use_ema))
    stored = info.get("architecture")
    try:
        stored_arch = architecture_name(str(stored)) if stored else None
    except ValueError:
        stored_arch = None
    if architecture:
        arch = architecture_name(architecture)
    else:
        arch = stored_arch or DEFAULT_MODEL
    # the authors' key layout, for a FasterViT (a ViT's patch_embed.* keys are its own)
    if is_official_state_dict(state) and (_base(arch) in MODEL_ARGS or not stored_arch or
                                          _base(stored_arch) in MODEL_ARGS):
        try:
            state = official_to_ours(state)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        info["weights"] = f"official {info['weights']}"
    kwargs = {**_tuples(info.get("model_kwargs") or {}), **kwargs}
    classes = checkpoint_classes(state, classifier_name(arch, kwargs))
    _head_classes(head, num_classes, classes, str(path))
    overlay = {"state_dict": state, "file": str(path)}
    try:
        if _base(arch) in MODEL_ARGS:
            model = _create(arch, {**kwargs, "pretrained": True, "pretrained_cfg_overlay": overlay,
                                   "num_classes": num_classes})
        else:  # another timm architecture: built with the file's class count, then fitted with the same checks
            model = _create(arch, {**kwargs, "num_classes": num_classes or classes} if num_classes or classes
                            else kwargs)
            state, report = fit_state(model, state, head=head, what=f"checkpoint {path}")
            model.load_state_dict(state)
            model.weights_info = report
    except CheckpointError as e:
        if stored_arch and _base(stored_arch) != _base(arch) and ARCH_HINT in str(e):
            raise CheckpointError(
                f"{path} holds a {_base(stored_arch)} (its metadata says so), not a {_base(arch)}: leave the "
                f"architecture unset (command line: no --model) to use the file's. Detail: {e}"
            ) from None
        if stored_arch and _base(stored_arch) == _base(arch) and ARCH_HINT in str(e):
            raise CheckpointError(str(e).replace(ARCH_HINT, KWARGS_HINT)) from None
        raise
    if stored_arch and _base(stored_arch) != _base(arch):
        _logger.warning(
            "%s names architecture %s but %s was asked for; its weights fit, so %s is used (with its own "
            "preprocessing, e.g. crop_pct); leave the architecture unset to use the file's",
            path, _base(stored_arch), _base(arch), _base(arch),
        )
        info["file_architecture"] = stored_arch
    return model, {**info, "source": str(path), **_report(model)}


def classifier_name(arch: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """The module name of a timm architecture's classifier (``head.fc`` for FasterViT, ``fc`` for a ResNet,
    ``head`` for a ViT): its pretrained cfg's ``classifier``, else found by building the model (random weights)
    and looking up the module ``get_classifier()`` returns.

    Raises:
        ValueError: an unknown architecture or arguments it does not take.
    """
    if _base(arch) in MODEL_ARGS:
        return "head.fc"
    cfg = timm.models.get_pretrained_cfg(arch)
    name = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(name, (tuple, list)):
        name = name[0] if name else None
    if name:
        return str(name)
    model = _create(arch, dict(kwargs or {}))
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    found = next((n for n, m in model.named_modules() if m is classifier and n), None)
    return found or "head.fc"


def _base(name: str) -> str:
    """A timm name without its pretrained tag."""
    return name.split(".", 1)[0]


def load_into(
    model: nn.Module,
    path: str | Path,
    *,
    head: str = "keep",
    use_ema: bool | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a weights file into an already built ``model`` (same reader, key conversion and checks as
    :func:`load_model`).

    Returns:
        The report: ``weights``, ``file``, ``reinitialized`` (fresh classifier keys), ``in_chans``, metadata.

    Raises:
        CheckpointError: missing, corrupt or unsafe file; weights that do not fit (with ``strict``).
    """
    state, info = read_weights(path, ema_mode(use_ema))  # refuses NaN/inf weights
    what = f"checkpoint {path}"
    try:
        if is_official_state_dict(state):
            state = official_to_ours(state)
            info["weights"] = f"official {info['weights']}"
        if strict:
            state, report = fit_state(model, state, head=head, what=what)
        else:
            report = {"reinitialized": [], "in_chans": None}
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    model.load_state_dict(state, strict=strict)
    return {**info, **report}


def load_official(name: str, path: str | Path, *, use_ema: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``name`` and load an official ``.pth.tar`` (or any weights file) into it: ``load_model(path,
    architecture=name, head="resize", ...)``.

    ``num_classes`` different from the checkpoint's gives a fresh head (reported); ``in_chans`` other than 3
    adapts the RGB stem (timm's ``adapt_input_conv``, reported). ``use_ema`` False takes ``state_dict`` as the
    authors' loader does.

    Raises:
        CheckpointError: as :func:`load_model`.
    """
    num_classes = kwargs.pop("num_classes", None)
    in_chans = kwargs.pop("in_chans", None)
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    return load_model(path, architecture=name, num_classes=num_classes, head="resize", use_ema=use_ema,
                      model_kwargs=kwargs, in_chans=in_chans)


def load_official_checkpoint(
    model: nn.Module, path: str | Path, *, use_ema: bool = False, strict_head: bool = False
) -> dict[str, list[str]]:
    """Read an official ``.pth.tar`` (or our ``.safetensors``) safely and load it into ``model``.

    A head of another class count stays freshly initialised (reported) unless ``strict_head``.
    Returns ``{"reinitialized": [...]}``.

    Raises:
        CheckpointError: as :func:`load_into`.
    """
    report = load_into(model, path, head="keep" if strict_head else "resize", use_ema=use_ema)
    return {"reinitialized": report["reinitialized"]}

"""Weight files: safe reading, weight selection, fitting a state dict to a model, atomic safetensors writing.

This module knows files and state dicts, not the zoo: it never builds a model (``open_fastervit.loading`` does,
through timm), so the model, the zoo and the key conversion can all import it without import circles.

- :func:`load_checkpoint_file` reads ``.safetensors`` / ``.pt`` / ``.pth`` / ``.pth.tar`` with
  ``torch.load(weights_only=True)`` (only ``argparse.Namespace`` allowed besides tensors and plain types).
- :func:`select_weights` picks the raw or EMA weights of a checkpoint dict.
- :func:`read_weights` does both and gathers the metadata (architecture, architecture kwargs, class names ...).
- :func:`locate_weights` turns a timm pretrained cfg (file, local folder, Hugging Face hub, URL) into a local file,
  with one clear error when the published weights cannot be had.
- :func:`fit_state` adapts a state dict to a built model: the RGB stem to ``in_chans`` (timm's
  ``adapt_input_conv``), the classifier by the head policy, then checks every key and shape.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import pickle
import re
import socket
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models import clean_state_dict
from timm.models._manipulate import adapt_input_conv
from torch import Tensor, nn

__all__ = [
    "HEAD_POLICIES",
    "CheckpointError",
    "atomic_write",
    "check_finite",
    "check_fit",
    "fit_state",
    "load_checkpoint_file",
    "locate_weights",
    "read_weights",
    "remove_stale_temporaries",
    "save_weights",
    "select_weights",
]

_logger = logging.getLogger(__name__)

#: keep: the checkpoint's classifier (error if num_classes disagrees); resize: keep it when its class count equals
#: num_classes, else a fresh head; reinit: always a fresh head of num_classes.
HEAD_POLICIES = ("keep", "resize", "reinit")
#: Keys of a checkpoint dict holding weights: timm's CheckpointSaver layout (``state_dict`` / ``state_dict_ema``),
#: which our trainer's checkpoints and the official files share, and the ``model`` / ``model_ema`` variant.
EMA_KEYS = ("state_dict_ema", "model_ema")
RAW_KEYS = ("state_dict", "model")
#: Metadata keys of a checkpoint dict (or safetensors metadata, JSON-encoded) that loading uses.
META_KEYS = ("class_names", "data_config", "model_kwargs", "img_size", "architecture", "task", "build_config",
             "category_ids")
#: Weight files looked for in a Hugging Face / timm folder (``config.json`` + weights), in order.
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, cannot be had, or does not fit the model."""


# ---- reading ---------------------------------------------------------------------------------------------------


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a ``.pth``/``.pth.tar``/``.pt``/``.safetensors`` file safely and return its top-level dict.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a checkpoint, or carries pickled objects other
            than tensors, plain types and ``argparse.Namespace``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # zip (torch.save) or legacy pickle
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (no zip or pickle header)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} carries pickled objects other than tensors and argparse.Namespace; refusing to load it "
            f"(weights_only=True){_unpickling_detail(e)}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {_first_sentence(e)}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    return dict(obj)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_sentence(error: BaseException) -> str:
    """The first sentence of an exception's text, without ANSI escape codes (torch's and miniz's advice dropped)."""
    text = " ".join(_ANSI.sub("", str(error)).split())
    if not text:
        return type(error).__name__
    head = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return head if len(head) <= 200 else head[:197] + "..."


def _unpickling_detail(error: BaseException) -> str:
    """``: the file holds <global>`` for torch's weights-only refusal (its advice to load with
    ``weights_only=False`` dropped), else the first sentence of the error."""
    text = _ANSI.sub("", str(error))
    found = re.search(r"GLOBAL\s+([\w.<>]+)", text) or re.search(r"Unsupported global:\s*([\w.<>]+)", text)
    if found:
        return f": the file holds {found.group(1)}, which is not allowed"
    detail = re.search(r"WeightsUnpickler error:\s*(.*)", text)
    return f": {_first_sentence(ValueError(detail.group(1) if detail else text))}"


def select_weights(checkpoint: Mapping, ema: str = "avoid") -> tuple[dict[str, Tensor], str]:
    """The weights inside a checkpoint dict, and which they are: ``"ema"``, ``"raw"`` or ``"plain"`` (a state dict).

    ``ema``: ``"require"`` the EMA weights, ``"prefer"`` them when present, or ``"avoid"`` them unless the checkpoint
    holds nothing else. Keys lose DDP / torch.compile prefixes (timm ``clean_state_dict``).

    Raises:
        ValueError: ``ema`` is not one of the three words.
        CheckpointError: EMA weights required but absent, or no weights at all.
    """
    if ema not in ("require", "prefer", "avoid"):
        raise ValueError(f"ema must be 'require', 'prefer' or 'avoid', got {ema!r}")
    ema_key = next((k for k in EMA_KEYS if isinstance(checkpoint.get(k), Mapping) and checkpoint[k]), None)
    raw_key = next((k for k in RAW_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    if ema == "require" and ema_key is None:
        raise CheckpointError("use_ema=True but the checkpoint has no state_dict_ema/model_ema")
    if ema_key and (ema != "avoid" or raw_key is None):
        chosen, kind = ema_key, "ema"
    else:
        chosen, kind = (raw_key, "raw") if raw_key else (None, "plain")
    source = checkpoint[chosen] if chosen else checkpoint
    state = clean_state_dict({k: v for k, v in source.items() if isinstance(v, Tensor)})
    if not state:
        raise CheckpointError(f"the checkpoint holds no weights (keys: {sorted(map(str, checkpoint))[:8]})")
    return state, kind


def extract_state_dict(checkpoint: Mapping, use_ema: bool = False) -> dict[str, Tensor]:
    """The weights inside a checkpoint dict: ``state_dict`` (or ``state_dict_ema`` with ``use_ema``), or itself."""
    return select_weights(checkpoint, "require" if use_ema else "avoid")[0]


def ema_mode(use_ema: bool | None) -> str:
    """``use_ema`` True / False / None -> ``select_weights``'s ``"require"`` / ``"avoid"`` / ``"prefer"``."""
    return "prefer" if use_ema is None else ("require" if use_ema else "avoid")


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _metadata(path: Path, obj: Mapping) -> dict[str, Any]:
    """Architecture, architecture kwargs, class names ... stored in a file (safetensors metadata or dict keys)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        return {k: _json_or_text(raw[k]) for k in META_KEYS if k in raw}
    info = {k: obj[k] for k in META_KEYS if k in obj and not isinstance(obj[k], Tensor)}
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}  # our training checkpoints
    args = obj.get("args")  # the official files: the argparse.Namespace of their training run
    arch = obj.get("arch") or config.get("model") or getattr(args, "model", None)
    if arch and "architecture" not in info:
        info["architecture"] = str(arch)
    if config.get("model_kwargs") and "model_kwargs" not in info:
        info["model_kwargs"] = dict(config["model_kwargs"])
    for key in ("img_size", "class_names"):  # the training run's input size (and names, when the config has them)
        if config.get(key) and key not in info:
            info[key] = config[key]
    if config and "class_names" not in info:
        names = _run_class_names(path, info.get("architecture"))
        if names:
            info["class_names"] = names
    return info


#: Weight files ``fastervit train`` writes beside its ``last.pt``; they carry the run's class names.
RUN_WEIGHT_FILES = ("last.safetensors", "best.safetensors", "last_ema.safetensors")


def _run_class_names(path: Path, architecture: Any) -> list[str] | None:
    """Class names of a training run, for its ``last.pt`` (which holds the config, not the names): read from the
    weight files the same run wrote beside it (same architecture), so every file of a run gives the same labels."""

    for name in RUN_WEIGHT_FILES:
        sibling = path.parent / name
        if not sibling.is_file():
            continue
        try:
            with safe_open(str(sibling), framework="pt") as f:
                raw = f.metadata() or {}
        except Exception:  # noqa: BLE001 - an unreadable sibling only means no names from it
            continue
        if architecture and raw.get("architecture") not in (None, str(architecture)):
            continue
        names = _json_or_text(raw["class_names"]) if "class_names" in raw else None
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    return None


def read_weights(path: str | Path, ema: str = "prefer") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and metadata of a file: our safetensors, a training checkpoint, or an official ``.pth.tar``.

    Returns:
        ``(state_dict, info)``; ``info["weights"]`` is ``"ema"``, ``"raw"`` or ``"plain"``, ``info["file"]`` the
        path, plus any of :data:`META_KEYS` found in the file (``architecture`` also from ``arch``/``config``/``args``).

    Raises:
        CheckpointError: see :func:`load_checkpoint_file` and :func:`select_weights`; the message names the file.
    """
    path = Path(path)
    obj = load_checkpoint_file(path)
    try:
        state, kind = select_weights(obj, ema)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_finite(state, f"{path} ({kind} weights)" if kind != "plain" else str(path))
    return state, {"weights": kind, "file": str(path), **_metadata(path, obj)}


def nonfinite_counts(state: Mapping[str, Tensor]) -> list[str]:
    """``"name: 12 NaN, 1 inf"`` for each floating-point tensor of ``state`` holding NaN or infinite values."""
    found = []
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} inf"] if inf else [])
        found.append(f"{name}: {', '.join(parts)}")
    return found


def check_finite(state: Mapping[str, Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinite values (a diverged or damaged file scores garbage without a word).

    Raises:
        CheckpointError: naming ``what`` and the tensors with their NaN / inf counts (the first few).
    """
    bad = nonfinite_counts(state)
    if bad:
        raise CheckpointError(
            f"{what} holds non-finite weights (NaN/inf), so it cannot be used: {key_listing(bad, 4)} - a diverged "
            "training run or a damaged file; use an earlier checkpoint"
        )


def weights_in_folder(folder: str | Path) -> Path:
    """The weight file of a Hugging Face / timm model folder (``model.safetensors`` first).

    Raises:
        CheckpointError: the folder holds none of :data:`FOLDER_FILES`.
    """
    folder = Path(folder)
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} holds no weights file (looked for {', '.join(FOLDER_FILES)})")


def _hub_help(what: str, repo: str, filename: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"the published weights of {what} ({repo}/{filename} on the Hugging Face hub) cannot be had: {reason}. "
        f"Pass a weights file (--checkpoint FILE; Python: load_model(FILE)), put it in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), or use random weights (--random-weights; Python: pretrained=False)."
    )


#: Seconds the connectivity probe of :func:`locate_weights` waits for the hub before giving up.
HUB_PROBE_TIMEOUT = 3.0


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None when a TCP connection to the hub endpoint opens within ``timeout`` s, else why not (one line).

    huggingface_hub retries a failed download several times with growing pauses (tens of seconds offline); one
    quick probe first lets an unreachable hub fail in a few seconds."""

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached ({_first_sentence(e)}) and the file is not in the cache"


def locate_weights(cfg: Mapping[str, Any], cache_dir: str | Path | None = None) -> Path:
    """A local file holding the weights a timm pretrained cfg points at: ``file`` (a file, or a model folder with
    ``source='local-dir'``), else ``hf_hub_id`` + ``hf_hub_filename`` (the HF cache first, then downloaded), else
    ``url`` (downloaded into torch's hub cache).

    For the hub: a file in the Hugging Face cache is used without any network access; otherwise, unless
    ``HF_HUB_OFFLINE`` is set, one connectivity probe (:data:`HUB_PROBE_TIMEOUT` s) runs before the download, so an
    unreachable hub fails in seconds instead of waiting through huggingface_hub's retries.

    Raises:
        CheckpointError: nothing to load, or the download fails (offline, no connection, missing file); the message
            says how to pass a file instead.
    """
    what = cfg.get("architecture") or "this model"
    file = cfg.get("file")
    if file:
        path = Path(file)
        return weights_in_folder(path) if path.is_dir() else path
    if cfg.get("hf_hub_id"):
        repo, filename = cfg["hf_hub_id"], cfg.get("hf_hub_filename") or FOLDER_FILES[0]
        repo, _, revision = repo.partition("@")
        try:
            cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision or None)
        except (HFValidationError, ValueError, OSError):
            cached = None
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached)
        if _hub_offline():
            raise _hub_help(what, repo, filename, "HF_HUB_OFFLINE is set and the file is not in the cache")
        unreachable = _hub_unreachable()
        if unreachable:
            raise _hub_help(what, repo, filename, unreachable)
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir,
                                        etag_timeout=HUB_PROBE_TIMEOUT))
        except LocalEntryNotFoundError:
            raise _hub_help(what, repo, filename, "no connection to the hub and the file is not in the cache") from None
        except (HfHubHTTPError, HFValidationError, OSError) as e:
            raise _hub_help(what, repo, filename, f"{type(e).__name__}: {_first_sentence(e)}") from None
    if cfg.get("url"):
        from timm.models._hub import download_cached_file  # here: only a download by URL needs it

        try:
            return Path(download_cached_file(cfg["url"], cache_dir=cache_dir))
        except OSError as e:
            raise CheckpointError(
                f"the published weights of {what} cannot be downloaded from {cfg['url']} ({e}); pass a weights file "
                f"instead (--checkpoint FILE), or --random-weights for random ones"
            ) from None
    raise CheckpointError(f"no pretrained weights are published for {what}; pass a weights file (--checkpoint FILE)")


# ---- fitting a state dict to a model -----------------------------------------------------------------------------


def key_listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


#: The hint of :func:`check_fit`'s error; ``open_fastervit.loading`` replaces it by :data:`KWARGS_HINT` when the file
#: names the model's own architecture.
ARCH_HINT = "is it for another architecture?"
KWARGS_HINT = (
    "the file names this architecture, so its architecture arguments differ from the model's: pass the "
    "model_kwargs it was built with (Python: model_kwargs={...}; command line: --model-kwargs JSON)"
)


def check_fit(model: nn.Module, state_dict: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming every missing/unexpected key and shape disagreement."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: {tuple(v.shape)} in {what}, {tuple(expected[k].shape)} in model"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if shapes:
        problems.append(f"shapes disagree: {key_listing(shapes, 6)}")
    if missing:
        problems.append(f"missing from the {what}: {key_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the {what}: {key_listing(unexpected)}")
    if problems:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CheckpointError(f"the {what} does not fit {name} ({ARCH_HINT}): " + "; ".join(problems))


def _names(model: nn.Module, key: str, default: str) -> tuple[str, ...]:
    value = getattr(model, "pretrained_cfg", {}).get(key) or default
    return (value,) if isinstance(value, str) else tuple(value)


def checkpoint_classes(state: Mapping[str, Tensor], classifier: str = "head.fc") -> int | None:
    """Class count of a state dict's classifier (``classifier.weight`` rows), None without one."""
    weight = state.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def checkpoint_in_chans(state: Mapping[str, Tensor], first_conv: str = "stem.conv1") -> int | None:
    """Input channels of a state dict's first convolution, None without one."""
    weight = state.get(f"{first_conv}.weight")
    return int(weight.shape[1]) if weight is not None and weight.ndim == 4 else None


def fit_state(
    model: nn.Module, state: Mapping[str, Tensor], head: str = "keep", what: str = "checkpoint"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adapt ``state`` (our key layout) to ``model`` and check that every key and shape fits.

    - First convolution: a checkpoint with other input channels than the model is adapted with timm's
      ``adapt_input_conv`` (1 channel: the sum of the RGB kernels; more: the RGB kernels repeated and rescaled),
      as timm's own pretrained loader does. Reported in the log and in ``report["in_chans"]``.
    - Classifier, by ``head`` (:data:`HEAD_POLICIES`): ``keep`` loads the checkpoint's head and fails if it has
      another class count than the model; ``resize`` keeps it when the counts agree, else the model's fresh head;
      ``reinit`` always the model's fresh head. A fresh head is reported (log, ``report["reinitialized"]``).

    Returns:
        ``(state dict ready for model.load_state_dict(strict=True), report)``.

    Raises:
        ValueError: unknown ``head`` policy.
        CheckpointError: keys or shapes that do not fit (each named), or ``keep`` with another class count.
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f"head must be one of {', '.join(HEAD_POLICIES)}, got {head!r}")
    state = dict(state)
    expected = model.state_dict()
    report: dict[str, Any] = {"reinitialized": [], "in_chans": None}
    for conv in _names(model, "first_conv", "stem.conv1"):
        key = f"{conv}.weight"
        if key in state and key in expected and state[key].ndim == 4 and state[key].shape[1] != expected[key].shape[1]:
            source, target = state[key].shape[1], expected[key].shape[1]
            if state[key].shape[0] == expected[key].shape[0] and state[key].shape[2:] == expected[key].shape[2:]:
                state[key] = adapt_input_conv(target, state[key])
                report["in_chans"] = f"{source} -> {target}"
                _logger.warning("%s adapted from %d to %d input channels (timm adapt_input_conv)", key, source, target)
    for classifier in _names(model, "classifier", "head.fc"):
        keys = [f"{classifier}.{p}" for p in ("weight", "bias") if f"{classifier}.{p}" in expected]
        differs = any(k in state and state[k].shape != expected[k].shape for k in keys)
        if head == "keep" and differs:
            got = checkpoint_classes(state, classifier)
            raise CheckpointError(
                f"the {what} has a {got}-class classifier, the model {getattr(model, 'num_classes', '?')} classes; "
                "leave num_classes unset to use the checkpoint's, or ask for a fresh head (head='resize'/'reinit')"
            )
        if head == "reinit" or (head == "resize" and differs):
            for k in keys:
                state[k] = expected[k]
            report["reinitialized"].extend(keys)
    check_fit(model, state, what=what)
    if report["reinitialized"]:
        _logger.warning(
            "classifier %s re-initialised (head=%r): a fresh head for num_classes=%s",
            ", ".join(report["reinitialized"]), head, getattr(model, "num_classes", "?"),
        )
    return state, report


# ---- writing -----------------------------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask (read from /proc where possible, which leaves it untouched)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # a process we may not signal: alive
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left beside ``path`` when its process was killed mid-write
    (``.NAME.PID.XXXX.tmp`` of a process that no longer runs; names without a process id are stale too).
    Returns the files removed; files that cannot be removed are left (logged)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid_text = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or _pid_alive(int(pid_text))):
            continue  # being written by a live process
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError as e:
            _logger.warning("cannot remove the leftover temporary file %s: %s", tmp, e)
    if removed:
        _logger.info("removed %d leftover temporary file(s) of an interrupted write of %s", len(removed), path)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters (``*?[``) taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temp file onto ``path`` (same folder).

    The file gets the mode a plain ``open(path, "w")`` gives: an existing file's mode, else ``0o666 & ~umask``
    (not the ``0o600`` of the temporary file). The temporary name carries the process id (``.NAME.PID.XXXX.tmp``);
    those of a killed writer are removed before writing (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


#: Factory options timm keeps in ``model._model_args`` that are not architecture arguments: stored apart
#: (num_classes, in_chans), training-time regularisation, or pretrained-loading / placement options.
NOT_ARCHITECTURE_ARGS = frozenset({
    "num_classes", "in_chans", "drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pretrained",
    "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "pretrained_model_args", "checkpoint_path",
    "cache_dir", "features_only", "out_indices", "feature_cfg", "feature_cls", "scriptable", "exportable", "no_jit",
    "device", "dtype",
})


def architecture_kwargs(model: nn.Module) -> dict[str, Any]:
    """The architecture arguments a timm model was built with: those of timm's ``model._model_args`` (the factory
    kwargs) that are parameters of the model class (all of them when it takes ``**kwargs``), less
    :data:`NOT_ARCHITECTURE_ARGS`; tuples as lists (JSON). Empty for a model built without ``timm.create_model``."""

    given = dict(getattr(model, "_model_args", None) or {})
    try:
        params = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        params = {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key in NOT_ARCHITECTURE_ARGS or not (open_ended or key in params):
            continue
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _inference_form_layer(model: nn.Module) -> str | None:
    """The name of a fused (inference-form) layer of ``model``, None when it has none."""
    from .layers.fused import FusedConv2d, FusedLinear  # here: the packed layers matter only when saving them

    for name, module in model.named_modules():
        if isinstance(module, (FusedLinear, FusedConv2d)) or getattr(module, "fused", False) is True:
            return name or type(module).__name__
    return None


def save_weights(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict to ``path`` as safetensors (atomically), with string metadata.

    Stored besides the weights: the architecture name (when the model carries a timm ``pretrained_cfg``),
    ``num_classes``, and ``model_kwargs``, the architecture arguments the model was built with
    (:func:`architecture_kwargs`, updated by a ``model_kwargs`` entry of ``metadata``), so that
    ``load_model(path)`` builds the same model. Other values than strings are stored as JSON.

    Raises:
        ValueError: ``model`` is the inference form (``fuse()`` / ``inference_form``), whose weights no model
            loads back.
    """

    fused = _inference_form_layer(model)
    if fused is not None:
        raise ValueError(
            f"this is the inference form (fuse()/inference_form; fused layer {fused}): its weights load into no "
            "model. Save the trainable model (before fuse()), or use torch.save / an export (ONNX, torch.export) "
            "for the fused form."
        )
    meta = {"format": "pt", "library": "open_fastervit"}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        meta["architecture"] = str(cfg["architecture"])
    meta["num_classes"] = str(getattr(model, "num_classes", ""))
    extra = dict(metadata or {})
    arch_kwargs = {**architecture_kwargs(model), **_json_dict(extra.pop("model_kwargs", None))}
    if arch_kwargs:
        meta["model_kwargs"] = json.dumps(arch_kwargs)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def _json_dict(value: Any) -> dict[str, Any]:
    """A ``model_kwargs`` metadata value (dict or JSON text) as a dict with lists for tuples."""
    if isinstance(value, str):
        value = _json_or_text(value)
    if not isinstance(value, Mapping):
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}

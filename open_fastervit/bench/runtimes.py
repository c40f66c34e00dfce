"""``fastervit bench --runtimes``: one model in every runtime side by side, against the authors' code.

Forms (each skipped with a stated reason when its package is missing, the CPU lacks its precision, or it fails):

- ``authors fp32``: the official ``fastervit`` package's model of the same architecture (the baseline; needs
  ``pip install fastervit``), eager;
- ``torch fp32`` (our inference form, eager), ``torch bf16`` (autocast; emulated, slow, on CPUs without
  ``avx512_bf16`` / ``amx_bf16``: the table says so), ``torch.compile`` (fp32, inductor);
- ``onnxruntime fp32`` (``fastervit export``) and ``onnxruntime int8`` (``fastervit quantize``);
- ``openvino fp32``, ``openvino bf16`` (where OpenVINO lists BF16 for the CPU) and ``openvino int8`` (NNCF).

Timing: :func:`open_fastervit.bench.timing.measure_interleaved` over all forms per batch size (A B C A B C ...),
medians; ratios against our fp32 and the authors' fp32. Quality: top-1 agreement with our fp32 on real images
(default: the ImageNet sample of the data folder) and, with ``data`` (an ImageFolder split) and a trained
``checkpoint``, top-1 accuracy of every form. The int8 forms calibrate on ``calib`` (default: the same images).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from open_fastervit.bench.environment import environment
from open_fastervit.bench.timing import BenchError, measure_interleaved
from open_fastervit.deploy.export import export_model, load_exported
from open_fastervit.deploy.forms import AutocastModule
from open_fastervit.deploy.openvino import (
    cpu_capabilities,
    from_torch,
    load_openvino,
    openvino_available,
    quantize_openvino,
)
from open_fastervit.deploy.quantize import calibration_images, load_quantized, quantize_model
from open_fastervit.deploy.runtimes import ExportedClassifier
from open_fastervit.fused import inference_form
from open_fastervit.inference import Predictor
from open_fastervit.paths import data_root
from open_fastervit.runtime import native_cpu_precisions

__all__ = ["FORMS", "RuntimeConfig", "markdown_runtimes", "run_runtimes", "write_runtime_reports"]

#: Every form, in table order.
FORMS: tuple[str, ...] = ("authors fp32", "torch fp32", "torch bf16", "torch.compile", "onnxruntime fp32",
                          "onnxruntime int8", "openvino fp32", "openvino bf16", "openvino int8")
#: Real images used by default for agreement and calibration (inside the data folder).
DEFAULT_IMAGES = "imagenet-sample-100-s256"


@dataclass
class RuntimeConfig:
    """Settings of :func:`run_runtimes` (sizes in px, counts of images)."""

    model: str = "fastervit_0"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    data: str | None = None
    images: str | None = None
    calib: str | None = None
    img_size: int | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    forms: list[str] = field(default_factory=lambda: list(FORMS))
    warmup: int = 2
    rounds: int = 5
    threads: int | None = None
    num_calib: int = 32
    num_check: int = 64
    max_eval: int = 500
    command: str = ""


def _official(config: RuntimeConfig, model: nn.Module) -> nn.Module:
    """The authors' model of the same architecture (random weights; speed only)."""
    arch = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", config.model))
    if config.model_kwargs or config.checkpoint and not arch.startswith("fastervit_"):
        raise BenchError("the authors' package builds its published architectures only (no --model-kwargs)")
    name = f"faster_vit_{arch.removeprefix('fastervit_')}_224"
    if not timm.is_model(name):  # the library never imports the authors' package; the user names it
        raise BenchError(f"{name} is not registered with timm: add --import fastervit (the authors' package, "
                         "pip install fastervit)")
    return timm.create_model(name, pretrained=False, num_classes=int(model.num_classes)).eval()


def _builders(config: RuntimeConfig, model: nn.Module, fused: nn.Module, size: int, calib: Path,
              tmp: Path) -> dict[str, Callable[[], nn.Module]]:
    def torch_bf16() -> nn.Module:
        return AutocastModule(fused, torch.bfloat16)

    def compiled() -> nn.Module:
        return torch.compile(copy.deepcopy(fused))

    def ort_fp32() -> nn.Module:
        path = tmp / "fp32.onnx"
        export_model(fused, path, example_size=(size, size), check=False)
        return ExportedClassifier(load_exported(path))

    def ort_int8() -> nn.Module:
        path = quantize_model(model, calib, tmp / "int8.onnx", num_calib=config.num_calib, img_size=size)
        return load_quantized(path)

    def ov(precision: str) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            if not openvino_available():
                raise BenchError("openvino is not installed (pip install 'open-fastervit[openvino]')")
            if precision != "fp32" and precision.upper() not in cpu_capabilities():
                raise BenchError(f"OpenVINO lists no {precision.upper()} for this CPU")
            return from_torch(fused, precision=precision, size=(size, size))
        return make

    def ov_int8() -> nn.Module:
        if not openvino_available():
            raise BenchError("openvino is not installed (pip install 'open-fastervit[openvino]')")
        path = quantize_openvino(model, calib, tmp / "int8.xml", num_calib=config.num_calib, img_size=size)
        return load_openvino(path)

    return {"authors fp32": lambda: _official(config, model), "torch fp32": lambda: fused, "torch bf16": torch_bf16,
            "torch.compile": compiled, "onnxruntime fp32": ort_fp32, "onnxruntime int8": ort_int8,
            "openvino fp32": ov("fp32"), "openvino bf16": ov("bf16"), "openvino int8": ov_int8}


def _logits(module: nn.Module, images: Tensor, batch: int = 16) -> Tensor:
    with torch.inference_mode():
        return torch.cat([module(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])


def _eval_set(folder: str, predictor: Predictor, limit: int) -> tuple[Tensor, Tensor]:
    """Images and labels of an ImageFolder split (at most ``limit``, spread over the classes)."""
    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise BenchError(f"--data {folder} holds no class folders (an ImageFolder split: DIR/CLASS/IMAGE)")
    names = predictor.info.get("class_names")
    index = {c: (list(names).index(c) if names and c in names else i) for i, c in enumerate(classes)}
    files = sorted((p, index[c]) for c in classes for p in (root / c).iterdir() if p.is_file())
    step = max(1, len(files) // limit)
    files = files[::step][:limit]
    return predictor.preprocess([p for p, _ in files]), torch.tensor([y for _, y in files])


def run_runtimes(config: RuntimeConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every form of ``config.forms``, check it, time it at each batch size; a JSON-ready result.

    Raises:
        BenchError: an unknown form, no real images, or a model that cannot be loaded.
    """
    unknown = [f for f in config.forms if f not in FORMS]
    if unknown:
        raise BenchError(f"unknown runtime form(s) {unknown}; choose from {', '.join(FORMS)}")
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(config: RuntimeConfig, log: Callable[[str], None]) -> dict[str, Any]:
    source = config.checkpoint or config.model
    try:
        predictor = Predictor(source, architecture=config.model if config.checkpoint else None,
                              model_kwargs=config.model_kwargs or None, pretrained=bool(config.checkpoint),
                              fuse=False, device="cpu", img_size=config.img_size)
    except (ValueError, FileNotFoundError) as e:
        raise BenchError(f"cannot load {source}: {str(e).splitlines()[0]}") from None
    model = predictor.model
    size = int(predictor.data_config["input_size"][-1])
    images_dir = Path(config.images) if config.images else data_root() / DEFAULT_IMAGES
    calib_dir = Path(config.calib) if config.calib else images_dir
    try:
        check = calibration_images(images_dir, config.num_check)
    except ValueError as e:
        raise BenchError(f"real images for the agreement check: {e}") from None
    check_images = predictor.preprocess(check.pictures)
    evaluation = _eval_set(config.data, predictor, config.max_eval) if config.data else None
    fused = inference_form(copy.deepcopy(model))
    fused.weights_info = predictor.info
    forms: dict[str, dict[str, Any]] = {name: {"skipped": "not asked for"} for name in FORMS
                                        if name not in config.forms}
    modules: dict[str, nn.Module] = {}
    native = native_cpu_precisions()
    with tempfile.TemporaryDirectory(prefix="fastervit_runtimes_") as tmp:
        builders = _builders(config, model, fused, size, calib_dir, Path(tmp))
        for name in config.forms:
            start = time.perf_counter()
            try:
                module = builders[name]()
                logits = _logits(module, check_images)
            except Exception as e:  # a form failing (missing package, unsupported op) is reported, not fatal
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                forms[name] = {"skipped": reason[:300]}
                log(f"{name}: skipped ({reason[:120]})")
                continue
            modules[name] = module
            forms[name] = {"build_s": round(time.perf_counter() - start, 1), "logits": logits}
            if name == "torch bf16" and "bf16" not in native:
                forms[name]["note"] = "emulated: this CPU has no avx512_bf16 / amx_bf16"
            log(f"{name}: ready in {forms[name]['build_s']} s")
        reference = forms.get("torch fp32", {}).get("logits")
        for name, entry in forms.items():
            logits = entry.pop("logits", None)
            if logits is None:
                continue
            if reference is not None and name != "authors fp32":
                entry["agreement"] = float((logits.argmax(1) == reference.argmax(1)).float().mean())
                entry["max_rel_error"] = float((logits - reference).abs().max() / reference.abs().max())
            if evaluation is not None and name != "authors fp32":
                entry["top1"] = float((_logits(modules[name], evaluation[0]).argmax(1) == evaluation[1])
                                      .float().mean())
        rows = []
        for batch in config.batch_sizes:
            x = torch.randn(batch, 3, size, size)
            steps = {name: _step(module, x) for name, module in modules.items()}
            samples, errors = measure_interleaved(steps, warmup=config.warmup, rounds=config.rounds)
            for name, error in errors.items():
                forms[name]["skipped"] = f"failed at batch {batch}: {error}"
            for name, s in samples.items():
                median = statistics.median(s)
                rows.append({"form": name, "batch": batch, "ms": 1000 * median, "img_s": batch / median,
                             "samples_s": s})
            log(f"batch {batch}: timed {len(samples)} forms")
    _ratios(rows)
    return {"config": asdict(config), "environment": environment(torch.device("cpu")),
            "openvino_capabilities": sorted(cpu_capabilities()) if openvino_available() else None,
            "native_precisions": list(native), "img_size": size, "forms": forms, "rows": rows,
            "check_images": len(check_images), "eval_images": len(evaluation[1]) if evaluation else 0}


def _step(module: nn.Module, x: Tensor) -> Callable[[], Any]:
    def step() -> Any:
        with torch.inference_mode():
            return module(x)
    return step


def _ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        same = {r["form"]: r for r in rows if r["batch"] == row["batch"]}
        for key, base in (("vs_ours_fp32", "torch fp32"), ("vs_authors_fp32", "authors fp32")):
            row[key] = row["img_s"] / same[base]["img_s"] if base in same else None


def markdown_runtimes(result: dict[str, Any]) -> str:
    """The result as a Markdown table (one row per form and batch size) with the skipped forms and notes."""
    env = result["environment"]
    kwargs = result["config"].get("model_kwargs") or {}
    custom = f" (custom: {json.dumps(kwargs, sort_keys=True)})" if kwargs else ""
    cores = os.cpu_count() or 1
    load = env.get("load_average_1m")
    busy = ([f"**Load average {load:.1f} on {cores} cores while timing: other work shared the cores, so these "
             "timings are not reliable; rerun on a quiet machine.**", ""]
            if isinstance(load, (int, float)) and load > cores else [])
    lines = [f"# Runtimes: {result['config']['checkpoint'] or result['config']['model']}{custom} at "
             f"{result['img_size']} px", "", *busy,
             f"CPU: {env['cpu']}; threads {env['threads']}; native precisions {', '.join(result['native_precisions'])}"
             f"; OpenVINO capabilities {', '.join(result['openvino_capabilities'] or ['(not installed)'])}; "
             f"load average {env['load_average_1m']}; {env['date_utc']}", "",
             f"Command: `{result['config']['command']}`", "",
             "| form | batch | img/s | ms/batch | vs ours fp32 | vs authors fp32 | top-1 agree | top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in result["rows"]:
        form = result["forms"][row["form"]]
        agree = num(100 * form["agreement"], ".1f") + "%" if "agreement" in form else "-"
        top1 = num(100 * form["top1"], ".1f") + "%" if "top1" in form else "-"
        lines.append(f"| {row['form']} | {row['batch']} | {row['img_s']:.1f} | {row['ms']:.1f} | "
                     f"{num(row['vs_ours_fp32'], '.2f')} | {num(row['vs_authors_fp32'], '.2f')} | {agree} | {top1} |")
    lines += ["", f"Top-1 agreement with our fp32 on {result['check_images']} real images"
              + (f"; top-1 accuracy on {result['eval_images']} labelled images." if result["eval_images"] else ".")]
    notes = [f"- {name}: {form['note']}" for name, form in result["forms"].items() if form.get("note")]
    skipped = [f"- {name}: skipped ({form['skipped']})" for name, form in result["forms"].items()
               if form.get("skipped")]
    if notes or skipped:
        lines += ["", *notes, *skipped]
    return "\n".join(lines) + "\n"


def write_runtime_reports(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``runtimes.json`` and ``runtimes.md`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "runtimes.json", "md": out / "runtimes.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    paths["md"].write_text(markdown_runtimes(result))
    return paths

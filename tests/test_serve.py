"""HTTP serving (``open_fastervit.deploy.serve``, ``fastervit serve``): answers equal ``predict`` on the same image,
concurrent requests are batched and each gets its own row, bad uploads answer 4xx and the server goes on, a real
uvicorn process serves and survives a short load test."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import experiment_module
from fastapi.testclient import TestClient
from PIL import Image

import open_fastervit
from open_fastervit.cli import COMMANDS
from open_fastervit.cli.serve import build_parser
from open_fastervit.deploy.serve import MAX_UPLOAD_BYTES, Batcher, create_app
from open_fastervit.predict import predict

free_port, load_test, server_process = (getattr(experiment_module("serve_load"), name)
                                       for name in ("free_port", "load_test", "server_process"))

TINY_KWARGS = dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3))
IMG_SIZE = 64


def tiny_model() -> torch.nn.Module:
    """A random 10-class FasterViT whose head is scaled up, so that different images get clearly different answers."""
    torch.manual_seed(0)
    model = open_fastervit.load_model("fastervit_0", pretrained=False, model_kwargs=TINY_KWARGS, num_classes=10)
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            p.mul_(40)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """32 distinct images of various sizes and kinds: RGB PNG and JPEG, grayscale, 16-bit grayscale PNG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(32):
        h, w = 40 + 7 * (i % 5), 48 + 11 * (i % 4)
        if i % 8 == 3:
            pixels, path = rng.integers(0, 65536, (h, w), dtype=np.uint16), folder / f"{i}_gray16.png"
        elif i % 8 == 5:
            pixels, path = rng.integers(0, 256, (h, w), dtype=np.uint8), folder / f"{i}_gray.jpg"
        else:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = folder / (f"{i}.jpg" if i % 2 else f"{i}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` pixels with almost no pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


FORM = "multipart/form-data; boundary=b0undary"


def chunked_form(megabytes: int) -> Iterator[bytes]:
    """A multipart body with a ``file`` field of ``megabytes`` MB, sent in chunks (no Content-Length)."""
    yield b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
    yield from [b"\0" * 2**20] * megabytes
    yield b"\r\n--b0undary--\r\n"


def assert_same(answer: dict, expected) -> None:
    assert answer["indices"] == expected.indices
    assert answer["labels"] == expected.labels
    assert answer["probs"] == pytest.approx(expected.probs, abs=1e-5)


def test_answer_shape_and_equality_with_predict(model, images):
    app = create_app(model, topk=5, device="cpu", img_size=IMG_SIZE)
    expected = predict(images[:8], model, topk=5, img_size=IMG_SIZE, device="cpu")
    with TestClient(app) as client:
        for path, want in zip(images[:8], expected):
            answer = client.post("/predict", files={"file": (path.name, path.read_bytes())})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert set(body) == {"labels", "indices", "probs", "model", "weights"}
            assert body["model"] == "fastervit_0" and body["weights"] == "random"
            assert len(body["labels"]) == len(body["indices"]) == len(body["probs"]) == 5
            assert body["probs"] == sorted(body["probs"], reverse=True)
            assert_same(body, want)
            raw = client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
            assert_same(raw.json(), want)  # the bytes as the body answer the same
        health = client.get("/health").json()
        assert health["model"] == "fastervit_0" and health["weights"] == "random" and health["device"] == "cpu"
        assert health["input_size"] == [3, IMG_SIZE, IMG_SIZE] and health["requests"] == 16
        assert health["queue"] == 0
        page = client.get("/")
        assert page.status_code == 200 and "<input id=\"file\"" in page.text and "http" not in page.text.split(
            "<script>")[1]  # no external resources
        assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_row(model, images):
    app = create_app(model, topk=3, device="cpu", img_size=IMG_SIZE, max_batch=16, max_wait_ms=50)
    expected = predict(images, model, topk=3, img_size=IMG_SIZE, device="cpu")
    assert len({tuple(p.indices) for p in expected}) >= 8  # the images really get different answers

    async def send_all() -> tuple[list[httpx.Response], dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            answers = await asyncio.gather(*(
                client.post("/predict", files={"file": (p.name, p.read_bytes())}) for p in images))
            return answers, (await client.get("/health")).json()

    answers, health = asyncio.run(send_all())
    assert [a.status_code for a in answers] == [200] * len(images)
    for answer, want in zip(answers, expected):
        assert_same(answer.json(), want)
    assert health["requests"] == len(images)
    assert 2 <= health["batches"] < len(images)


def test_batcher_gives_each_request_its_row_and_survives_a_failing_batch():
    def run(items: list[int]) -> list[int]:
        if -1 in items:
            raise RuntimeError("bad batch")
        return [10 * x for x in items]

    async def scenario() -> tuple[list[int], BaseException | None, int, Batcher]:
        batcher = Batcher(run, max_batch=4, max_wait_ms=20)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        try:
            await batcher.submit(-1)
            error = None
        except RuntimeError as e:
            error = e
        after = await batcher.submit(7)
        await batcher.stop()
        return results, error, after, batcher

    results, error, after, batcher = asyncio.run(scenario())
    assert results == [10 * i for i in range(10)]
    assert isinstance(error, RuntimeError) and after == 70
    assert batcher.batches == 4 and batcher.requests == 11  # 4 + 4 + 2, then the single 7 (the failed one uncounted)
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(run, max_batch=0)


def test_bad_uploads_answer_4xx_and_the_server_goes_on(model, images, tmp_path):
    good = images[0].read_bytes()
    truncated = images[0].read_bytes()[: len(good) // 2]
    jpeg = images[1].read_bytes()
    bad = [
        ("empty body", dict(content=b""), 400, "empty"),
        ("empty file", dict(files={"file": ("x.png", b"")}), 400, "empty"),
        ("not an image", dict(files={"file": ("x.png", b"hello, not an image")}), 400, "not a readable image"),
        ("text body", dict(content=b"GET / HTTP/1.1", headers={"content-type": "text/plain"}), 400, "not a readable"),
        ("truncated png", dict(files={"file": ("x.png", truncated)}), 400, "upload"),
        ("truncated jpeg", dict(content=jpeg[: len(jpeg) // 3]), 400, "upload"),
        ("no file field", dict(files={"other": ("x.png", good)}), 400, "'file'"),
        ("text field", dict(data={"file": "text"}, files={"other": ("x.png", good)}), 400, "'file'"),
        ("huge upload", dict(files={"file": ("x.png", b"\0" * (MAX_UPLOAD_BYTES + 1))}), 413, "limit"),
        ("huge body", dict(content=b"\0" * (MAX_UPLOAD_BYTES + 1)), 413, "limit"),
        ("chunked huge body", dict(content=iter([b"\0" * 2**20] * 21)), 413, "limit"),
        ("chunked huge form", dict(content=chunked_form(21), headers={"content-type": FORM}), 413, "limit"),
        ("huge pixels", dict(files={"file": ("bomb.png", png_header(30000, 30000))}), 413, "pixels"),
        ("bomb", dict(content=png_header(60000, 60000)), 413, "too large"),
    ]
    app = create_app(model, device="cpu", img_size=IMG_SIZE)
    with TestClient(app) as client:
        for what, request, status, words in bad:
            answer = client.post("/predict", **request)
            assert answer.status_code == status, (what, answer.text)
            assert words in answer.json()["detail"], (what, answer.json())
            ok = client.post("/predict", files={"file": ("good.png", good)})
            assert ok.status_code == 200, (what, ok.text)
        assert client.get("/health").json()["requests"] == len(bad)


def test_cli_parser_and_command_list(capsys):
    assert "serve" in COMMANDS
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for option in ("SOURCE", "--port", "--host", "--max-batch", "--max-wait-ms", "--topk", "--random-weights",
                   "--device"):
        assert option in usage
    args = build_parser().parse_args(["fastervit_0", "--random-weights", "--port", "9001", "--max-batch", "1"])
    assert (args.model, args.random_weights, args.port, args.max_batch, args.max_wait_ms, args.topk, args.host) == (
        "fastervit_0", True, 9001, 1, 10.0, 5, "127.0.0.1")


def test_real_server_process_answers_and_survives_a_short_load_test(tmp_path, images):
    """A uvicorn process started by ``fastervit serve FILE``; its answers equal ``predict`` with the same file."""
    weights = tmp_path / "tiny.safetensors"
    open_fastervit.save_weights(tiny_model(), weights, metadata={"model_kwargs": TINY_KWARGS, "img_size": IMG_SIZE})
    expected = predict(images, checkpoint=weights, topk=5, device="cpu")  # loaded as the server does: fused
    options = ("--device", "cpu", "--max-batch", "16", "--max-wait-ms", "10", "--log-level", "warning")
    with server_process(weights, free_port(), *options, log=tmp_path / "log") as url:
        answer = httpx.post(f"{url}/predict", files={"file": (images[5].name, images[5].read_bytes())}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert_same(answer.json(), expected[5])
        report = load_test(url, images, clients=8, seconds=3, expected=expected)
        assert report.requests > 0 and report.ok == report.requests
        assert report.errors == report.lost == report.mismatches == 0
        assert report.batches < report.requests
        assert httpx.get(f"{url}/health").json()["requests"] == report.requests + 2  # + the warm-up request


def test_cli_random_weights_reaches_the_server(monkeypatch, capsys):
    """``fastervit serve NAME --random-weights --model-kwargs ...``: the model and options the server gets (the
    real process is started in the test above)."""
    import open_fastervit.deploy.serve as serve_module
    from open_fastervit.cli.serve import main

    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda model, **kwargs: seen.update(model=model, **kwargs))
    kwargs = '{"dim": 16, "in_dim": 8, "depths": [1, 1, 2, 2], "num_heads": [1, 2, 2, 4], ' \
             '"window_size": [7, 7, 3, 3], "num_classes": 10}'
    assert main(["fastervit_0", "--random-weights", "--model-kwargs", kwargs, "--img-size", "64", "--topk", "3",
                 "--port", "9001", "--max-batch", "4", "--max-wait-ms", "2.5", "--device", "cpu"]) == 0
    assert "random weights" in capsys.readouterr().err
    model = seen.pop("model")
    # random weights, in whichever form the automatic choice runs them ("random" or "random (openvino fp32)")
    assert model.weights_info["weights"].startswith("random") and model.num_classes == 10
    assert not list(model.parameters())  # the fused inference form (a snapshot without parameters)
    assert seen["port"] == 9001 and seen["host"] == "127.0.0.1" and seen["topk"] == 3 and seen["img_size"] == 64
    assert seen["max_batch"] == 4 and seen["max_wait_ms"] == 2.5 and seen["device"] == "cpu"
    assert main(["no_such_model", "--random-weights"]) == 1
    assert "fastervit serve: error:" in capsys.readouterr().err


@pytest.mark.full
def test_load_experiment_batched_and_one_at_a_time(tmp_path):
    """``experiments/serve_load.py`` (both models, batching on and off, 16 clients x 5 s): no errors, lost requests
    or mismatches, and the batched server really batches. Throughput is reported, not asserted (shared CPUs)."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "serve_load.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--seconds", "5", "--clients", "16"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((tmp_path / "load.json").read_text())["results"]
    assert {(r["model"], r["setting"]) for r in results} == {
        (m, s) for m in ("tiny", "demo") for s in ("batched", "one-at-a-time")}
    for r in results:
        assert r["requests"] > 0 and r["errors"] == r["lost"] == r["mismatches"] == 0
        assert r["mean_batch"] > 1 if r["setting"] == "batched" else r["mean_batch"] == 1
    print((tmp_path / "load.md").read_text())

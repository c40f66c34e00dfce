"""Untrusted input: the evaluation transform's work is bounded whatever the aspect ratio (and its pixels are timm's),
``read_image`` refuses over-limit headers and external-program formats before decoding, the server answers 415 for
formats users do not upload, times out stalled connections, logs a dropped client in one line, serves its API pages
without any other host, and the options that cannot work are refused with their own names."""

from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import EpsImagePlugin, Image
from test_serve import IMG_SIZE, free_port, png_header, tiny_model
from timm.data import create_transform

from open_fastervit.cli._common import positive_int
from open_fastervit.cli.serve import build_parser
from open_fastervit.data import (
    UPLOAD_FORMATS,
    ImageFormatError,
    ImageTooLargeError,
    eval_transform,
    read_image,
)
from open_fastervit.deploy.serve import TimedH11Protocol, create_app
from open_fastervit.inference import Predictor

DATA = os.environ.get("FASTERVIT_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
CONFIGS = [
    dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic"),
    dict(input_size=(3, 64, 64), crop_pct=1.0, interpolation="bilinear"),
    dict(input_size=(3, 48, 80), crop_pct=0.9, interpolation="bicubic"),  # non-square: timm's ResizeKeepRatio
]
#: A minimal EPS file: Pillow identifies it from the header, and would hand it to Ghostscript to decode.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    """A random image of ``size`` (w, h) saved by Pillow in ``fmt``."""
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def tensor_config(config: dict) -> dict:
    return dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_mode="center", **config)


def test_eval_transform_equals_timms_on_photos_and_odd_sizes():
    """Photos (at their size and stretched 1.5x): identical to timm's ``create_transform``. Random noise (the worst case
    for the filter's overshoot) at odd sizes, up- and down-scaling, crops larger than the resized image, and long thin
    images (3 x 500: the bounded box path): within 1/255."""
    photos = sorted(glob.glob(os.path.join(DATA, "imagenet-stubs", "*.jpg")))[:4]
    assert photos, f"no test photos under {DATA}/imagenet-stubs"
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
             for w, h in [(640, 480), (481, 353), (224, 224), (255, 257), (1001, 31), (31, 1001), (17, 19), (3, 500)]]
    for config in CONFIGS:
        ref, ours = create_transform(**tensor_config(config)), eval_transform(tensor_config(config))
        assert "BoundedCenterCrop" in repr(ours)
        for path in photos:
            image = read_image(path)
            for picture in (image, image.resize((image.width * 3 // 2 + 1, image.height))):
                a, b = ref(picture), ours(picture)
                assert a.shape == b.shape == (3, *config["input_size"][1:])
                assert torch.equal(a, b), (path, config)
        for picture in noise:
            a, b = ref(picture), ours(picture)
            assert a.shape == b.shape
            assert (a - b).abs().max().item() * 255 <= 1 + 1e-4, (picture.size, config)


def test_eval_transform_work_is_bounded_for_extreme_aspect_ratios():
    """8000x1, 100000x1 and 1x100000 images: the whole evaluation transform at 224 px takes well under a second (timm's
    transform resizes 8000x1 to 2,048,000x256 first: 5.6 s and 2.2 GB in the reported fault)."""
    transform = eval_transform(tensor_config(CONFIGS[0]))
    for size in [(8000, 1), (100000, 1), (1, 100000)]:
        image = Image.new("RGB", size, (200, 10, 10))
        start = time.perf_counter()
        out = transform(image)
        assert time.perf_counter() - start < 1.0, size
        assert out.shape == (3, 224, 224)
        assert torch.allclose(out[:, 112, 112], torch.tensor([200, 10, 10]) / 255, atol=1 / 255)


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``) in MB."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def test_predictor_peak_memory_is_bounded_for_long_thin_images(model, tmp_path):
    """The peak RSS grows by under 150 MB, and the three images take under 10 s, when a Predictor (default 224 px,
    crop 0.875) reads and classifies 8000x1, 100000x1 and 1x100000 PNGs (the peak is reset first through
    ``/proc/self/clear_refs``; timm's transform took 2.2 GB for the 8000x1 image alone)."""
    paths = []
    for w, h in [(8000, 1), (100000, 1), (1, 100000)]:
        paths.append(tmp_path / f"{w}x{h}.png")
        Image.new("RGB", (w, h), (0, 128, 255)).save(paths[-1])
    predictor = Predictor(model, device="cpu")
    predictor([Image.new("RGB", (300, 200))])  # warm up
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # peak RSS := current RSS
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak memory (/proc/self/clear_refs)")
    before = peak_rss_mb()
    start = time.perf_counter()
    tops = predictor(paths, topk=1)
    seconds, growth = time.perf_counter() - start, peak_rss_mb() - before
    assert len(tops) == 3
    assert seconds < 10, seconds
    assert growth < 150, f"peak memory grew by {growth:.0f} MB"


def test_read_image_refuses_over_limit_headers_and_external_program_formats(monkeypatch, tmp_path):
    with pytest.raises(ImageTooLargeError, match="bomb.png: image too large"):  # past Pillow's own limit
        read_image(io.BytesIO(png_header(30000, 30000)), name="bomb.png")
    with pytest.raises(ImageTooLargeError, match="5000x5000 = 25,000,000 pixels, over the limit of 1,000,000"):
        read_image(io.BytesIO(png_header(5000, 5000)), name="bomb.png", max_pixels=1_000_000)

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was invoked")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(EPS)
    with pytest.raises(ImageFormatError, match="drawing.eps: EPS images are not accepted"):
        read_image(eps)
    with pytest.raises(ImageFormatError, match=r"PPM images are not accepted \(accepted: BMP, GIF, JPEG, PNG, TIFF"):
        read_image(io.BytesIO(encoded("PPM")), formats=UPLOAD_FORMATS)
    assert read_image(io.BytesIO(encoded("PPM"))).size == (40, 30)  # local files: any format Pillow decodes itself


def test_server_accepts_the_upload_formats_and_answers_415_for_others(model, monkeypatch):
    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was invoked")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    accepted = {fmt: encoded(fmt) for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")}
    assert sorted(accepted) == sorted(UPLOAD_FORMATS)
    refused = {"EPS": EPS, "ICO": encoded("ICO", (32, 32)), "PPM": encoded("PPM"), "TGA": encoded("TGA")}
    long_thin = {f"{w}x{h}": encoded("PNG", (w, h)) for w, h in [(8000, 1), (100000, 1), (1, 100000)]}
    app = create_app(model, device="cpu", img_size=IMG_SIZE)
    with TestClient(app) as client:
        for fmt, data in {**accepted, **long_thin}.items():
            answer = client.post("/predict", files={"file": (f"x.{fmt.lower()}", data)})
            assert answer.status_code == 200, (fmt, answer.text)
            assert len(answer.json()["labels"]) == 5
        for fmt, data in refused.items():
            answer = client.post("/predict", content=data)
            assert answer.status_code == 415, (fmt, answer.text)
            assert answer.json()["detail"] == (f"upload: {fmt} images are not accepted "
                                               "(accepted: BMP, GIF, JPEG, PNG, TIFF, WEBP)")


def test_api_pages_load_nothing_from_other_hosts(model):
    app = create_app(model, device="cpu", img_size=IMG_SIZE)
    with TestClient(app) as client:
        pages = [("/docs", "/docs-static/swagger-ui-bundle.js"), ("/redoc", "/docs-static/redoc.standalone.js")]
        for page, asset in pages:
            html = client.get(page)
            assert html.status_code == 200
            assert "http://" not in html.text and "https://" not in html.text, html.text
            assert asset in html.text
            assert client.get(asset).status_code == 200
        assert client.get("/docs-static/swagger-ui.css").status_code == 200
        assert client.get("/openapi.json").json()["paths"]["/predict"]


class Server:
    """uvicorn serving ``app`` in a thread (the protocol ``serve`` uses), its log records kept in ``records``."""

    def __init__(self, app, timeout: float) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, log_level="info",
                                http=TimedH11Protocol, timeout_keep_alive=timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture()
def records() -> Iterator[list[logging.LogRecord]]:
    """Every log record of the server (ours, uvicorn's, asyncio's) during the test."""
    kept: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = kept.append
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    yield kept
    root.removeHandler(handler)
    root.setLevel(old)


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reads until EOF); fails past ``seconds``."""
    start = time.time()
    sock.settimeout(seconds)
    while sock.recv(65536):
        pass
    return time.time() - start


PARTIAL_UPLOAD = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                  + b"\x89PNG" + b"\0" * 1000)


def test_dropped_clients_log_one_line_each_and_stalled_connections_are_closed(model, records):
    app = create_app(model, device="cpu", img_size=IMG_SIZE, timeout=1.0)
    with Server(app, timeout=1.0) as server:
        for _ in range(3):  # a client that sends its headers and part of its body, then drops the connection
            sock = server.connect()
            sock.sendall(PARTIAL_UPLOAD)
            time.sleep(0.2)
            sock.close()
        time.sleep(0.5)
        dropped = [r for r in records if "dropped the connection" in r.getMessage()]
        assert len(dropped) == 3, [r.getMessage() for r in records]
        assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in records]

        stalled_body = server.connect()  # headers and part of a body, then nothing: 408, connection closed
        stalled_body.sendall(PARTIAL_UPLOAD)
        stalled_headers = server.connect()  # half a request line, then nothing: closed
        stalled_headers.sendall(b"POST /pred")
        silent = server.connect()  # nothing at all: closed
        start = time.time()
        answer = b""
        stalled_body.settimeout(5)
        while chunk := stalled_body.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"no data for 1 s" in answer
        for sock in (stalled_body, stalled_headers, silent):
            closed_within(sock, 5)
            sock.close()
        assert time.time() - start < 4
        assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in records]


def test_bad_sizes_and_options_are_refused_with_their_names(model, capsys):
    for kwargs, words in [(dict(img_size=0), "img_size must be >= 1"), (dict(img_size=-5), "img_size must be >= 1"),
                          (dict(crop_pct=0.0), r"crop_pct must be in \(0, 1\]"),
                          (dict(crop_pct=1.5), r"crop_pct must be in \(0, 1\]"),
                          (dict(batch_size=0), "batch_size must be >= 1")]:
        with pytest.raises(ValueError, match=words):
            Predictor(model, device="cpu", **kwargs)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        create_app(model, device="cpu", timeout=0)
    for argv, words in [(["--img-size", "0"], "argument --img-size: must be >= 1, got 0"),
                        (["--img-size", "-3"], "argument --img-size: must be >= 1, got -3"),
                        (["--port", "0"], "argument --port: must be in 1-65535, got 0"),
                        (["--port", "65536"], "argument --port: must be in 1-65535, got 65536"),
                        (["--timeout", "0"], "argument --timeout: must be > 0, got 0"),
                        (["--timeout", "-1"], "argument --timeout: must be > 0, got -1"),
                        (["--max-batch", "0"], "argument --max-batch: must be >= 1, got 0")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert words in capsys.readouterr().err, argv
    args = build_parser().parse_args(["--timeout", "2.5", "--port", "65535", "--img-size", "32"])
    assert (args.timeout, args.port, args.img_size) == (2.5, 65535, 32)
    assert build_parser().parse_args([]).timeout == 30.0
    assert positive_int("7") == 7
    for text, words in [("0", "must be >= 1, got 0"), ("x", "expected an integer, got 'x'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            positive_int(text)


def test_detector_refuses_images_its_resize_would_squeeze_to_nothing():
    """torchvision's detection transform bounds the work (short side to min_size, long side <= max_size) but squeezes
    1 x 8000 to 0 x 192 pixels and fails deep inside; the predict path refuses it first with a message (skipped)."""
    from test_detection import tiny_detector

    from open_fastervit.tasks.detection.train import check_detector_input

    detector = tiny_detector("faster_rcnn").eval()
    size = (detector.transform.min_size[-1], detector.transform.max_size)
    for h, w in [(1, 8000), (8000, 1), (2, 8000)]:
        with pytest.raises(ValueError, match=rf"long.jpg: {w}x{h} pixels is too elongated to detect on"):
            check_detector_input(detector, torch.zeros(3, h, w), "long.jpg")
    for h, w in [(40, 60), (1, 8), (60, 8000)]:  # max_size 192: 60 x 8000 keeps 1.44 px
        image = torch.rand(3, h, w)
        check_detector_input(detector, image, "fine.jpg")
        with torch.no_grad():
            assert set(detector([image])[0]) >= {"boxes", "scores", "labels"}, (h, w, size)


def test_training_evaluates_through_the_bounded_transform(model):
    from open_fastervit.tasks.classification.config import TrainConfig
    from open_fastervit.tasks.classification.task import classification_transforms

    _, eval_tf, data_cfg = classification_transforms(TrainConfig(img_size=IMG_SIZE), model)
    assert "BoundedCenterCrop" in repr(eval_tf)
    image = Image.new("RGB", (100000, 1), (10, 200, 30))
    assert eval_tf(image).shape == (3, IMG_SIZE, IMG_SIZE)
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    assert torch.equal(eval_tf(photo), create_transform(**data_cfg)(photo))

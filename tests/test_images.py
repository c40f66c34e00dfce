"""One image decoder for predict, validation and training: more than 8 bits per sample is scaled, not clipped.

Issue 12, item 7: a 16-bit grayscale PNG with every pixel 30000 became an all-white image (Pillow's
``convert("RGB")`` clips 16-bit samples at 255). Expected everywhere: round(30000 * 255 / 65535) = 117.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from open_fastervit.data import ImageDecodeError, open_dataset, read_image
from open_fastervit.labels import open_eval_dataset
from open_fastervit.predict import ImageReadError, load_image

VALUE = 30000
EXPECTED = round(VALUE * 255 / 65535)  # 117 (Pillow's own conversion gives 255)


def _png16_gray(path: Path, value: int = VALUE, size: int = 64) -> Path:
    Image.fromarray(np.full((size, size), value, np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # really a 16-bit file
    return path


def _png16_color(path: Path, samples: tuple[int, ...], size: int = 8) -> Path:
    """A 16-bit-per-channel RGB (3 samples) or RGBA (4 samples) PNG, written by hand (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type = {3: 2, 4: 6}[len(samples)]
    row = b"\x00" + struct.pack(f">{len(samples) * size}H", *(samples * size))  # filter 0 + big-endian samples
    header = struct.pack(">IIBBBBB", size, size, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * size))
                     + chunk(b"IEND", b""))
    return path


def _encoded(array: np.ndarray, fmt: str) -> io.BytesIO:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    buffer.seek(0)
    return buffer


def test_16bit_grayscale_png_is_scaled_in_predict(tmp_path):
    path = _png16_gray(tmp_path / "gray16.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.unique(np.asarray(image)).tolist() == [EXPECTED]  # was [255]: an all-white image


def test_16bit_images_are_scaled_in_training_and_validation_datasets(tmp_path):
    """ImageFolder (training and validation through open_dataset) and labels.csv folders (validate) read the
    same 117-grey pixels; the training transform's tensor before normalisation holds 117/255."""
    from timm.data import create_transform

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "folder" / split / label).mkdir(parents=True)
            _png16_gray(tmp_path / "folder" / split / label / "x.png")
    for split, training in (("train", True), ("val", False)):
        dataset = open_dataset(str(tmp_path / "folder"), split, is_training=training)
        image, target = dataset[0]
        assert target == 0 and image.mode == "RGB"
        assert np.unique(np.asarray(image)).tolist() == [EXPECTED]
    dataset.transform = create_transform(32, is_training=False, mean=(0, 0, 0), std=(1, 1, 1))
    tensor, _ = dataset[1]
    torch.testing.assert_close(tensor, torch.full((3, 32, 32), EXPECTED / 255))

    flat = tmp_path / "flat"
    flat.mkdir()
    _png16_gray(flat / "one.png")
    (flat / "labels.csv").write_text("filename,class_index\none.png,3\n")
    image, target = open_eval_dataset(flat)[0]
    assert target == 3 and np.unique(np.asarray(image)).tolist() == [EXPECTED]


@pytest.mark.parametrize("fmt, mode", [("TIFF", "I;16"), ("PPM", "I")])
def test_16bit_samples_in_other_formats_and_modes(fmt, mode):
    """16-bit TIFF opens as I;16, 16-bit PGM as I (32-bit int holding 16-bit values): both scale by 255/65535."""
    buffer = _encoded(np.array([[0, VALUE, 65535]], np.uint16), fmt)
    with Image.open(buffer) as image:
        assert image.mode == mode
    buffer.seek(0)
    assert np.asarray(read_image(buffer))[0].tolist() == [[0] * 3, [EXPECTED] * 3, [255] * 3]
    buffer.seek(0)
    assert np.asarray(read_image(buffer, "L")).tolist() == [[0, EXPECTED, 255]]


@pytest.mark.parametrize("samples, expected", [((VALUE, 0, 65535), (EXPECTED, 0, 255)),
                                               ((VALUE, VALUE, VALUE, 65535), (EXPECTED,) * 3)])
def test_16bit_rgb_and_rgba_png(tmp_path, samples, expected):
    """48/64-bit PNGs (hand-written: Pillow cannot write them); Pillow keeps the high byte (30000 >> 8 = 117),
    which equals the rounded 255/65535 scaling here; alpha is dropped."""
    path = _png16_color(tmp_path / "color16.png", samples)
    for image in (load_image(path), read_image(path)):
        assert image.mode == "RGB"
        assert np.asarray(image).reshape(-1, 3)[0].tolist() == list(expected)


def test_32bit_images_are_scaled_or_refused_with_the_rule():
    ints = _encoded(np.array([[0, VALUE]], np.int32), "TIFF")  # mode I, values fit 16 bits: scaled
    assert np.asarray(read_image(ints, "L")).tolist() == [[0, EXPECTED]]
    floats = _encoded(np.array([[0.0, 0.5, 1.0]], np.float32), "TIFF")  # mode F within 0..1: times 255
    assert np.asarray(read_image(floats, "L")).tolist() == [[0, 128, 255]]
    with pytest.raises(ImageDecodeError, match=r"big.tif: 32-bit integer samples in 0\.\.70000"):
        read_image(_encoded(np.array([[0, 70000]], np.int32), "TIFF"), name="big.tif")
    with pytest.raises(ImageDecodeError, match=r"hdr.tif: 32-bit float samples in -1\.\.3"):
        read_image(_encoded(np.array([[-1.0, 3.0]], np.float32), "TIFF"), name="hdr.tif")


def test_8bit_modes_convert_as_before(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    for mode in ("1", "L", "P", "LA", "RGBA", "CMYK", "YCbCr"):
        converted = base.convert(mode)
        path = tmp_path / f"{mode}.{'jpg' if mode in ('CMYK', 'YCbCr') else 'png'}"
        converted.save(path)
        with Image.open(path) as reference:
            expected = np.asarray(reference.convert("RGB"))
        assert np.array_equal(np.asarray(read_image(path)), expected), mode


def test_corrupt_files_give_a_clear_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png16_gray(tmp_path / "whole.png").read_bytes()[:60])
    for path in (garbage, truncated):
        with pytest.raises(ImageDecodeError, match=path.name):
            read_image(path)
        with pytest.raises(ImageReadError, match=path.name):
            load_image(path)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    with open(garbage, "rb") as handle:  # open files are named by their .name
        with pytest.raises(ImageDecodeError, match="garbage.png: not a readable image"):
            read_image(handle)

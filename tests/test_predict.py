"""Prediction: label sources, agreement with the eval transform, unreadable images, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

import open_fastervit
from open_fastervit.cli.predict import main
from open_fastervit.paths import data_path
from open_fastervit.predict import ImageReadError, expand_images, load_image, predict, resolve_class_names

TINY = dict(dim=32, in_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(7, 7, 2, 2),
            drop_path_rate=0.0)
STUBS = ["bagel.jpg", "koala.jpg", "tractor.jpg"]


def tiny(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("fastervit_0", num_classes=num_classes, **TINY).eval()


def stub(name: str):
    return data_path("imagenet-stubs") / name


def test_imagenet_model_gets_imagenet_names_and_matches_eval_transform():
    model = tiny(1000)
    preds = predict([stub(n) for n in STUBS], model, topk=5, img_size=96, device="cpu")
    assert [p.image for p in preds] == [str(stub(n)) for n in STUBS]
    transform = create_transform(**resolve_data_config({"img_size": 96}, model=model))
    names = timm.data.ImageNetInfo().label_descriptions()
    for pred in preds:
        with torch.no_grad():
            probs = model(transform(load_image(pred.image))[None]).softmax(-1)[0]
        top = probs.topk(5)
        assert pred.indices == top.indices.tolist()
        assert pred.probs == pytest.approx(top.values.tolist(), rel=1e-4)
        assert pred.probs == sorted(pred.probs, reverse=True)
        assert pred.labels == [names[i].split(",")[0] for i in pred.indices]


def test_class_names_from_checkpoint_metadata_or_dataset(tmp_path):
    model = tiny(10)
    names = [f"class {i}" for i in range(10)]
    weights = tmp_path / "w.safetensors"
    open_fastervit.save_weights(model, weights, metadata={"class_names": names, "model_kwargs": TINY,
                                                          "img_size": 64})
    image = data_path("tiny-imagenet-10") / "val" / "n01882714"
    first = sorted(image.iterdir())[:2]
    preds = predict(first, checkpoint=weights, topk=3, device="cpu")  # architecture from the metadata
    assert len(preds) == 2 and all(len(p.labels) == 3 for p in preds)
    assert all(label in names for p in preds for label in p.labels)
    assert [p.indices for p in preds] == [p.indices for p in predict(first, model, topk=3, img_size=64)]
    plain = predict(first, checkpoint=weights, topk=3, device="cpu", fuse=False)  # loaded models run fused
    for a, b in zip(preds, plain):
        assert a.indices == b.indices and a.probs == pytest.approx(b.probs, rel=1e-4)
    from_data = predict(first[:1], model, classes=data_path("tiny-imagenet-10"), topk=10, img_size=64)[0]
    assert sorted(from_data.labels)[:3] == ["alp", "banana", "goldfish"]  # names from classes.csv
    assert resolve_class_names(3) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="2 class names given for a model with 3 outputs"):
        resolve_class_names(3, ["a", "b"])


def test_unreadable_images_are_named(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(stub("bagel.jpg").read_bytes()[:2000])
    for path in (garbage, truncated, tmp_path / "missing.jpg"):
        with pytest.raises(ImageReadError, match=path.name):
            load_image(path)
    model = tiny(1000)
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        predict([stub("bagel.jpg"), truncated], model)
    with pytest.raises(ValueError, match="topk"):
        predict([stub("bagel.jpg")], model, topk=0)


def test_cli(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in STUBS[:2]:
        shutil.copy(stub(name), folder / name)
    kwargs = json.dumps(TINY)
    assert main([str(folder), "--model", "fastervit_0", "--model-kwargs", kwargs, "--img-size", "64", "-k", "2",
                 "--random-weights"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(folder / "bagel.jpg") + ": ")
    assert lines[0].count("%)") == 2
    assert main([str(stub("koala.jpg")), "--model-kwargs", kwargs, "--img-size", "64", "--json",
                 "--random-weights"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["labels"]) == 3 and record["image"].endswith("koala.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    assert main([str(folder), "--model-kwargs", kwargs, "--random-weights"]) == 1
    assert "broken.png" in capsys.readouterr().err


def test_unreadable_images_are_reported_and_the_rest_classified(tmp_path, capsys):
    """Review item 6: `fastervit predict corrupt.jpg notimage.jpg good.jpg -c W` stopped at the first; expected:
    good.jpg classified, both bad ones named on stderr, exit code 1; predict(on_error="skip") gives the one result,
    the default still raises."""
    weights = open_fastervit.save_weights(tiny(10), tmp_path / "w.safetensors")
    corrupt, text, good = tmp_path / "corrupt.jpg", tmp_path / "notimage.jpg", tmp_path / "good.jpg"
    shutil.copy(stub("koala.jpg"), good)
    corrupt.write_bytes(stub("koala.jpg").read_bytes()[:200])
    text.write_text("not an image\n")
    assert main([str(corrupt), str(text), str(good), "-c", str(weights)]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith(f"{good}: ")
    assert "corrupt.jpg" in err and "notimage.jpg" in err and "2 of 3 images could not be read" in err
    assert main([str(good), "-c", str(weights)]) == 0
    preds = predict([corrupt, text, good], checkpoint=weights, on_error="skip", device="cpu")
    assert [p.image for p in preds] == [str(good)]
    seen = []
    predict([corrupt, good], checkpoint=weights, on_error=lambda path, e: seen.append(path), device="cpu")
    assert seen == [corrupt]
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        predict([corrupt, good], checkpoint=weights, device="cpu")


def test_expand_images_lists_files_and_folders_sorted_recursion_on_request(tmp_path):
    """The one listing of `fastervit predict`, `detect predict` and `segment predict`: files as given, folders by
    image suffix (any case) in sorted order, hidden files and other suffixes left out, sub-folders only with
    recursive=True."""
    photos, extra = tmp_path / "photos", tmp_path / "extra"
    for folder in (photos / "sub" / "deeper", photos / ".cache", extra):
        folder.mkdir(parents=True)
    for rel in ("b.jpg", "A.PNG", "notes.txt", ".hidden.jpg", "sub/c.jpeg", "sub/deeper/d.webp", ".cache/e.png",
                "sub/readme.md"):
        (photos / rel).write_bytes(b"x")
    single = extra / "z.bmp"
    single.write_bytes(b"x")
    assert expand_images([single, photos]) == [single, photos / "A.PNG", photos / "b.jpg"]
    assert expand_images([str(photos), single], recursive=True) == [
        photos / "A.PNG", photos / "b.jpg", photos / "sub" / "c.jpeg", photos / "sub" / "deeper" / "d.webp", single]
    assert expand_images(str(photos / "notes.txt")) == [photos / "notes.txt"]  # a file named is kept as given
    with pytest.raises(ImageReadError) as missing:
        expand_images([single, tmp_path / "missing.jpg"])
    assert str(missing.value) == f"{tmp_path / 'missing.jpg'}: no such file or folder"
    assert expand_images([tmp_path / "missing.jpg"], keep_missing=True) == [tmp_path / "missing.jpg"]
    only_sub = tmp_path / "only_sub"
    (only_sub / "inner").mkdir(parents=True)
    (only_sub / "inner" / "x.png").write_bytes(b"x")
    (only_sub / "list.txt").write_bytes(b"x")
    with pytest.raises(ImageReadError, match=r"only_sub: no image files .* in this folder \(sub-folders not "
                                             r"searched without --recursive\)$"):
        expand_images([single, only_sub])
    assert expand_images([only_sub], recursive=True) == [only_sub / "inner" / "x.png"]
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "sub" / "a.txt").write_text("text")
    (texts / "sub" / ".b.png").write_bytes(b"x")
    with pytest.raises(ImageReadError, match=r"texts: no image files .* in this folder or its sub-folders$"):
        expand_images([texts], recursive=True)
    with pytest.raises(ImageReadError, match="no image files or folders given"):
        expand_images([])


def test_every_predict_path_lists_inputs_with_expand_images(tmp_path):
    """Classification predict: a folder without images is an ImageReadError (a missing file is still reported per
    image through on_error); detect / segment predict: a missing input or an empty folder is the same one-line
    ImageReadError, raised before any weights are read."""
    from open_fastervit.detection.train import predict_detector
    from open_fastervit.segmentation.train import predict_segmenter

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ImageReadError, match="empty: no image files"):
        predict([empty], tiny(10))
    shutil.copy(stub("koala.jpg"), tmp_path / "koala.jpg")
    seen = []
    preds = predict([tmp_path / "gone.jpg", tmp_path / "koala.jpg"], tiny(10), img_size=64,
                    on_error=lambda path, e: seen.append(str(e)))
    assert [p.image for p in preds] == [str(tmp_path / "koala.jpg")]
    assert seen == [f"{tmp_path / 'gone.jpg'}: no such file"]
    for run in (predict_detector, predict_segmenter):
        with pytest.raises(ImageReadError, match=r"gone\.jpg: no such file or folder$"):
            run(tmp_path / "no_run", [tmp_path / "koala.jpg", tmp_path / "gone.jpg"], tmp_path / "out")
        with pytest.raises(ImageReadError, match=r"empty: no image files .* without --recursive\)$"):
            run(tmp_path / "no_run", [empty], tmp_path / "out")
        with pytest.raises(ImageReadError, match="or its sub-folders$"):
            run(tmp_path / "no_run", [empty], tmp_path / "out", recursive=True)


def test_predict_searches_sub_folders_only_with_recursive(tmp_path, capsys):
    """`fastervit predict FOLDER` takes the folder's own images (as `detect predict` and `segment predict` now do);
    `--recursive` adds its sub-folders'. Expected: 2 lines without the flag, 3 with it (the sub-folder's image
    last, sorted by relative path)."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(stub("bagel.jpg"), folder / "bagel.jpg")
    shutil.copy(stub("koala.jpg"), folder / "koala.jpg")
    shutil.copy(stub("tractor.jpg"), folder / "sub" / "tractor.jpg")
    common = ["--model-kwargs", json.dumps(TINY), "--img-size", "64", "-k", "1", "--random-weights"]
    assert main([str(folder), *common]) == 0
    flat = [line.split(": ")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert flat == [str(folder / "bagel.jpg"), str(folder / "koala.jpg")]
    assert main([str(folder), "--recursive", *common]) == 0
    deep = [line.split(": ")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert deep == [str(folder / "bagel.jpg"), str(folder / "koala.jpg"), str(folder / "sub" / "tractor.jpg")]
    assert [p.image for p in predict([folder], tiny(10), img_size=64, recursive=True)] == deep


def test_describe_failure_names_the_path_once(tmp_path):
    """A skip message names the file once: decoding errors already start with the path (the reported
    "skipping X: X: not a readable image"), other errors get it prefixed."""
    from open_fastervit.predict import describe_failure

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError) as caught:
        load_image(bad)
    assert describe_failure(bad, caught.value) == str(caught.value)
    assert str(caught.value).count(str(bad)) == 1
    assert describe_failure(bad, ValueError("input too small")) == f"{bad}: input too small"

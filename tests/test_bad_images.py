"""Bad images never cost a run: reported by path before training (``bad_images: fail``) or left
out and counted (``bad_images: skip``); a decode error while reading always names the file."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nmsparse_hf.data import (
    AugmentedDataset,
    BadImageError,
    DataArguments,
    build_training_data,
    decode_image,
    find_bad_images,
    load_image_dataset,
)
from nmsparse_hf.data.arguments import IMAGENET_MEAN, IMAGENET_STD
from nmsparse_hf.data.images import to_8bit
from nmsparse_hf.data.transforms import build_transforms

CLASSES = ("cat", "dog")


def _jpeg(i: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (40 * i % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, Path]]:
    """An imagefolder of 2 classes x 5 JPEGs, one of them cut short, plus a text file named
    ``.jpg``: the two failures a downloaded ImageNet copy really has."""
    root = tmp_path / "folder"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(5):
            (root / name / f"{i}.jpg").write_bytes(_jpeg(10 * c + i))
    truncated = root / "cat" / "3.jpg"
    truncated.write_bytes(_jpeg(3)[:300])
    text = root / "dog" / "0.jpg"
    text.write_text("not an image\n")
    return root, {"truncated": truncated, "text": text}


def _args(root, **kw) -> DataArguments:
    return DataArguments(dataset_name="imagefolder", data_dir=str(root), image_size=16, **kw)


def test_fail_policy_reports_every_bad_file_by_path_before_training(folder):
    root, bad = folder
    train, evaluation, names = load_image_dataset(_args(root, eval_fraction=0.2))
    with pytest.raises(BadImageError) as info:
        build_training_data(_args(root), train, evaluation, len(names))
    message = str(info.value)
    assert "2 unreadable image(s)" in message or "unreadable image" in message
    for path in bad.values():
        assert str(path) in message
    assert "bad_images='skip'" in message


def test_skip_policy_leaves_bad_files_out_and_counts_them(folder, caplog):
    root, bad = folder
    args = _args(root, bad_images="skip", eval_fraction=0.2)
    train, evaluation, names = load_image_dataset(args)
    total = len(train) + len(evaluation)
    with caplog.at_level(logging.WARNING):
        data = build_training_data(args, train, evaluation, len(names))
    assert len(data.train_dataset) + len(data.eval_dataset) == total - 2
    assert any("2 unreadable" in n for n in data.notes)
    assert all(str(p) in caplog.text for p in bad.values())
    for ds in (data.train_dataset, data.eval_dataset):
        for i in range(len(ds)):
            assert ds[i]["pixel_values"].shape == (3, 16, 16)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data.callbacks[0].on_train_end(None, None, None)
    assert "2 unreadable image(s) were left out" in caplog.text


def test_quick_check_finds_both_kinds(folder):
    root, bad = folder
    found = find_bad_images(sorted(str(p) for p in root.rglob("*.jpg")))
    assert set(found) == {str(p) for p in bad.values()}
    assert "truncated" in found[str(bad["truncated"])].lower()


def test_a_decode_error_while_reading_names_the_file(folder):
    """What the checks before training cannot see (a file broken later, remote data) still
    fails with its path, or, with skip, is replaced by the next readable example and counted."""
    import datasets

    root, bad = folder
    files = [str(p) for p in sorted(root.rglob("*.jpg"))]
    raw = datasets.Dataset.from_dict(
        {"image": files, "label": [int("dog" in f) for f in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    index = files.index(str(bad["truncated"]))
    tf = build_transforms(16, train=True)
    with pytest.raises(BadImageError, match=str(bad["truncated"])):
        AugmentedDataset(raw, tf, "image", "label")[index]
    skipping = AugmentedDataset(raw, tf, "image", "label", bad_images="skip")
    assert skipping[index]["labels"] == raw[index + 1]["label"]
    assert int(skipping.skipped.item()) == 1
    with pytest.raises(BadImageError, match="bytes image|in-memory"):
        decode_image(b"\x89PNG not really", "bytes image")


def test_streamed_bad_images_name_the_file_or_are_dropped(folder):
    root, bad = folder
    args = _args(root, streaming=True, eval_fraction=0.2)
    train, evaluation, names = load_image_dataset(args)
    data = build_training_data(args, train, evaluation, len(names))
    # which split a streamed file lands in follows a hash of its path (tmp_path here): read both
    with pytest.raises(BadImageError, match="unreadable|bad image"):
        for split in (data.train_dataset, data.eval_dataset):
            for _ in split:
                pass
    args = _args(root, streaming=True, eval_fraction=0.2, bad_images="skip")
    train, evaluation, names = load_image_dataset(args)
    data = build_training_data(args, train, evaluation, len(names))
    seen = sum(1 for _ in data.train_dataset) + sum(1 for _ in data.eval_dataset)
    assert seen == 10 - 2
    assert sum(int(c.item()) for c in data.callbacks[0].counters) == 2


def test_the_recipe_stops_before_training_naming_the_files(folder, tmp_path):
    from nmsparse_hf.recipes.image_classification import run

    root, bad = folder
    out = tmp_path / "out"
    with pytest.raises(BadImageError) as info:
        run(
            [
                "--dataset_name",
                "imagefolder",
                "--data_dir",
                str(root),
                "--model_config",
                "vit-digits",
                "--image_size",
                "16",
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--use_cpu",
                "true",
                "--report_to",
                "none",
                "--eval_fraction",
                "0.3",
            ],
            "vit",
        )
    assert all(str(p) in str(info.value) for p in bad.values())
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------
# Images too large (PIL's decompression-bomb limit) and images deeper than 8 bits


@pytest.fixture
def bomb(folder, monkeypatch) -> Path:
    """A 64x64 PNG in the folder, over PIL's decompression-bomb limit (lowered to 1000 pixels
    here; PIL refuses more than twice the limit, the 24x24 JPEGs stay under it)."""
    root, _ = folder
    path = root / "dog" / "huge.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("cat/3.jpg", "dog/0.jpg"):  # only the bomb is bad here
        (root / name).write_bytes(_jpeg(7))
    return path


def test_a_bomb_sized_image_is_skipped_with_its_name(folder, bomb, caplog):
    root, _ = folder
    args = _args(root, bad_images="skip", eval_fraction=0.2)
    train, evaluation, names = load_image_dataset(args)
    with caplog.at_level(logging.WARNING):
        data = build_training_data(args, train, evaluation, len(names))
    assert len(data.train_dataset) + len(data.eval_dataset) == 10
    assert str(bomb) in caplog.text and "DecompressionBombError" in caplog.text


def test_a_bomb_sized_image_is_a_one_line_error_naming_it(folder, bomb):
    root, _ = folder
    train, evaluation, names = load_image_dataset(_args(root, eval_fraction=0.2))
    with pytest.raises(BadImageError) as info:
        build_training_data(_args(root), train, evaluation, len(names))
    assert str(bomb) in str(info.value) and "bad_images='skip'" in str(info.value)
    with pytest.raises(BadImageError, match="huge.png.*DecompressionBombError"):
        decode_image({"bytes": None, "path": str(bomb)})


def test_16_bit_and_float_images_are_scaled_to_8_bits():
    sixteen = Image.fromarray(np.array([[0, 257, 1000, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(to_8bit(sixteen)).tolist() == [[0, 1, 4, 255]]  # v / 257, rounded
    wide = Image.fromarray(np.array([[-5, 514, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_8bit(wide)).tolist() == [[0, 2, 255]]  # clipped to 0..65535 / 257
    values = np.array([[0.0, 0.1, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32)
    assert np.asarray(to_8bit(Image.fromarray(values))).tolist() == [[0, 26, 255, 255, 0, 0]]
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_8bit(rgb) is rgb


def test_16_bit_png_and_float_tiff_reach_the_model_in_8_bit_range(tmp_path):
    """A 16-bit PNG of 40000 and a float TIFF of 0.25 are grey 156 (40000 / 257) and 64
    (0.25 * 255), not white (PIL's convert clips 16-bit values at 255) and not black (it truncates
    floats): check the normalised tensors the training pipeline gives."""
    root = tmp_path / "deep"
    for name in ("png16", "float"):
        (root / name).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(root / "png16" / f"{i}.png")
        Image.fromarray(np.full((12, 12), 0.25, dtype=np.float32)).save(root / "float" / f"{i}.tif")
    assert Image.open(root / "png16" / "0.png").mode == "I;16"
    assert Image.open(root / "float" / "0.tif").mode == "F"
    args = _args(root, eval_fraction=0.5)
    train, evaluation, names = load_image_dataset(args)
    data = build_training_data(args, train, evaluation, len(names))
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    for i in range(len(data.eval_dataset)):
        example = data.eval_dataset[i]
        grey = {names.index("png16"): 156, names.index("float"): 64}[example["labels"]]
        expected = (torch.full((3, 16, 16), grey / 255.0) - mean) / std
        torch.testing.assert_close(example["pixel_values"], expected)

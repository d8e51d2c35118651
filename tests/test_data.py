"""The data layer: datasets (digits, imagefolder, webdataset shards, Hub), transforms, collators,
metrics, and how the Trainer shards a streamed dataset over two real processes. Offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import torchrun_command
from PIL import Image

from nmsparse_hf.data import (
    DataArguments,
    DataArgumentsError,
    build_transforms,
    collate_fn,
    load_digits_dataset,
    load_image_dataset,
    make_compute_metrics,
    require_max_steps,
    resolve_columns,
    transforms_from_args,
    with_transforms,
)
from nmsparse_hf.data.arguments import IMAGENET_MEAN, IMAGENET_STD, parse_randaugment
from nmsparse_hf.data.metrics import metric_path
from nmsparse_hf.data.transforms import normalization_from

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny local datasets written to tmp_path


def _image(i: int, mode: str = "RGB", size: int = 12) -> Image.Image:
    rgb = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    return rgb.convert(mode)


def _write_imagefolder(root: Path, per_class: int = 6, modes=("RGB", "L", "CMYK")) -> None:
    """<root>/<class>/<i>.png (or .jpg for CMYK), image modes varying by class."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode = modes[c % len(modes)]
            ext = "jpg" if mode == "CMYK" else "png"
            _image(c * 100 + i, mode).save(root / name / f"{i}.{ext}")


def _write_shard(path: Path, ids) -> None:
    """A webdataset shard: sample_<id>.jpg + sample_<id>.cls (label = id % 3), like imagenet-1k-wds."""
    with tarfile.open(path, "w") as tar:
        for k in ids:
            buf = io.BytesIO()
            _image(k, size=8).save(buf, "JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("cls", str(k % 3).encode())):
                info = tarfile.TarInfo(f"sample_{k:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def imagefolder(tmp_path):
    _write_imagefolder(tmp_path / "folder")
    return tmp_path / "folder"


@pytest.fixture
def shards(tmp_path):
    """24 training samples in 2 shards of 12, plus a validation shard of 4 (ids 100..103)."""
    root = tmp_path / "wds"
    root.mkdir()
    _write_shard(root / "toy-train-0000.tar", range(0, 12))
    _write_shard(root / "toy-train-0001.tar", range(12, 24))
    _write_shard(root / "toy-validation-0000.tar", range(100, 104))
    return root


def _ids(dataset) -> list[int]:
    return [int(e["__key__"].split("_")[-1]) for e in dataset]


# ---------------------------------------------------------------------------------------------
# The embedded default


def test_digits_default_splits_labels_and_images():
    train, evaluation, names = load_image_dataset(DataArguments())
    assert (len(train), len(evaluation)) == (1497, 300)
    assert names == [str(d) for d in range(10)]
    assert train.features["label"].names == names
    image = train[0]["image"]
    assert (image.mode, image.size) == ("RGB", (32, 32))
    pixels = np.asarray(image)
    assert pixels.min() == 0 and pixels.max() > 200  # black background, bright ink
    assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey copied to 3 channels
    # Stratified: every class holds 29..31 of the 300 eval images.
    counts = np.bincount(evaluation["label"], minlength=10)
    assert counts.min() >= 29 and counts.max() <= 31


def test_digits_can_stream():
    import datasets

    args = DataArguments(dataset_name="digits", streaming=True, max_train_samples=40)
    train, evaluation, names = load_image_dataset(args)
    assert isinstance(train, datasets.IterableDataset) and len(names) == 10
    assert evaluation.n_shards == 1 and sum(1 for _ in train) == 40


def test_digits_split_is_deterministic_and_seeded():
    a = load_digits_dataset(seed=0)
    b = load_digits_dataset(seed=0)
    c = load_digits_dataset(seed=1)
    assert a["validation"]["label"] == b["validation"]["label"]
    assert np.array_equal(np.asarray(a["train"][5]["image"]), np.asarray(b["train"][5]["image"]))
    assert a["validation"]["label"] != c["validation"]["label"]


def test_digits_pixels_are_sklearn_digits_upscaled():
    from sklearn.datasets import load_digits

    raw = load_digits()
    dd = load_digits_dataset(image_size=8)  # no upscaling: compare pixel for pixel
    image = np.asarray(dd["train"][0]["image"])[..., 0].astype(float)
    matches = [
        i for i in range(len(raw.images)) if np.allclose(raw.images[i] * 255 / 16, image, atol=0.51)
    ]
    assert matches and raw.target[matches[0]] == dd["train"][0]["label"]


# ---------------------------------------------------------------------------------------------
# Local imagefolder


def test_imagefolder_map_style_carves_a_stratified_eval_split(imagefolder):
    args = DataArguments(dataset_name="imagefolder", data_dir=str(imagefolder), eval_fraction=1 / 3)
    train, evaluation, names = load_image_dataset(args)
    assert names == list(CLASSES)
    assert (len(train), len(evaluation)) == (12, 6)
    assert sorted(np.bincount(evaluation["label"]).tolist()) == [2, 2, 2]
    paths = lambda ds: {e["image"].filename for e in ds}  # noqa: E731
    assert not paths(train) & paths(evaluation)
    # Deterministic: same seed, same carve.
    again = load_image_dataset(args)[1]
    assert paths(again) == paths(evaluation)


def test_imagefolder_is_detected_from_data_dir_and_transformed(imagefolder):
    args = DataArguments(data_dir=str(imagefolder), eval_fraction=1 / 3, image_size=16)
    assert args.source == "imagefolder"
    raw_train, raw_eval, names = load_image_dataset(args)
    train_tf, eval_tf = transforms_from_args(args)
    train = with_transforms(raw_train, train_tf, "image", "label")
    evaluation = with_transforms(raw_eval, eval_tf, "image", "label")
    for example in (train[0], evaluation[0], train[len(train) - 1]):
        assert example["pixel_values"].shape == (3, 16, 16)  # L and CMYK became RGB
        assert example["pixel_values"].dtype == torch.float32
        assert isinstance(example["labels"], int)
    assert "image" not in train[0] and "label" not in train[0]


def test_imagefolder_streaming_uses_the_validation_directory(tmp_path):
    _write_imagefolder(tmp_path / "root" / "train")
    _write_imagefolder(tmp_path / "root" / "validation", per_class=2)
    args = DataArguments(
        dataset_name="imagefolder",
        data_dir=str(tmp_path / "root"),
        streaming=True,
        shuffle_buffer_size=100,
    )
    train, evaluation, names = load_image_dataset(args)
    import datasets

    assert isinstance(train, datasets.IterableDataset)
    assert names == list(CLASSES)
    labels = [e["label"] for e in train]
    assert sorted(labels) == [0] * 6 + [1] * 6 + [2] * 6
    assert labels != sorted(labels)  # shuffled, not in folder order
    assert len(list(evaluation)) == 6
    train = with_transforms(train, build_transforms(8, train=False), "image", "label")
    first = next(iter(train))
    assert first["pixel_values"].shape == (3, 8, 8) and isinstance(first["labels"], int)


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    """datasets drops a class folder without images: the label set would silently lack it."""
    _write_imagefolder(tmp_path / "flat", per_class=2)
    (tmp_path / "flat" / "wolf").mkdir()
    (tmp_path / "flat" / "wolf" / "notes.txt").write_text("not an image")
    (tmp_path / "flat" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    with pytest.raises(DataArgumentsError, match=r"class folder\(s\) \['wolf'\] hold no image"):
        load_image_dataset(DataArguments(data_dir=str(tmp_path / "flat"), eval_fraction=0.5))
    _write_imagefolder(tmp_path / "split" / "train", per_class=2)
    _write_imagefolder(tmp_path / "split" / "validation", per_class=1)
    (tmp_path / "split" / "validation" / "wolf").mkdir()
    with pytest.raises(DataArgumentsError, match=r"\['validation/wolf'\]"):
        load_image_dataset(DataArguments(data_dir=str(tmp_path / "split"), streaming=True))
    (tmp_path / "flat" / "wolf" / "0.png").write_bytes(
        (tmp_path / "flat" / "cat" / "0.png").read_bytes()
    )
    assert load_image_dataset(DataArguments(data_dir=str(tmp_path / "flat")))[2] == [
        *CLASSES,
        "wolf",
    ]


def test_eval_labels_unseen_in_training_are_an_error_naming_them(tmp_path):
    """A validation class with no training example would be an extra class never trained."""
    _write_imagefolder(tmp_path / "root" / "train", per_class=2)
    (tmp_path / "root" / "train" / "fox").rename(tmp_path / "fox_elsewhere")
    _write_imagefolder(tmp_path / "root" / "validation", per_class=1)
    args = DataArguments(data_dir=str(tmp_path / "root"))
    with pytest.raises(DataArgumentsError) as info:
        load_image_dataset(args)
    message = str(info.value)
    assert "'validation' split: label(s) ['fox']" in message
    assert "its labels: ['cat', 'dog']" in message and "\n" not in message


def test_check_eval_labels_for_named_and_string_labels():
    from nmsparse_hf.data import check_eval_labels

    check_eval_labels(["pos", "neg", "pos"], ["neg", "pos"], "validation")  # a subset is fine
    with pytest.raises(DataArgumentsError, match=r"'dev' split: label\(s\) \['maybe'\]"):
        check_eval_labels(["pos", "neg"], ["neg", "maybe"], "'dev'")
    with pytest.raises(DataArgumentsError, match=r"\['fox'\] never occur.*\['cat', 'dog'\]"):
        check_eval_labels([0, 1], [2, 1], "'validation'", names=["cat", "dog", "fox"])
    with pytest.raises(DataArgumentsError, match=r"\[-1\]"):  # GLUE's unlabelled test split
        check_eval_labels([0, 1], [-1], "'test'", names=["no", "yes"])


def test_num_labels_must_agree_with_the_classes_found(imagefolder):
    args = DataArguments(data_dir=str(imagefolder), eval_fraction=1 / 3, num_labels=2)
    with pytest.raises(DataArgumentsError) as info:
        load_image_dataset(args)
    assert "num_labels=2 disagrees with the 3 classes of the data ['cat', 'dog', 'fox']" in str(
        info.value
    )
    args = DataArguments(data_dir=str(imagefolder), eval_fraction=1 / 3, num_labels=3)
    assert load_image_dataset(args)[2] == list(CLASSES)


def test_a_split_too_small_to_stratify_is_carved_without_stratifying(tmp_path, caplog):
    """3 classes x 2 images with eval_fraction 0.1: one eval example cannot hold every class."""
    import logging

    _write_imagefolder(tmp_path / "small", per_class=2)
    args = DataArguments(data_dir=str(tmp_path / "small"), eval_fraction=0.1)
    with caplog.at_level(logging.WARNING):
        train, evaluation, names = load_image_dataset(args)
    assert (len(train), len(evaluation), names) == (5, 1, list(CLASSES))
    assert "without stratifying by class" in caplog.text and "6 examples" in caplog.text


def test_a_split_too_small_to_carve_is_an_error_with_its_size():
    one = load_digits_dataset()["train"].select(range(1))

    def fake(path, name, split, streaming):
        if split != "train":
            raise ValueError(f'Bad split: {split}. Available splits: ["train"]')
        return one

    with mock.patch("datasets.load_dataset", mock.Mock(side_effect=fake)):
        with pytest.raises(DataArgumentsError, match="eval_fraction=0.1 of the 1 example"):
            load_image_dataset(DataArguments(dataset_name="me/tiny", eval_fraction=0.1))


# ---------------------------------------------------------------------------------------------
# Local webdataset shards (the layout of timm/imagenet-1k-wds)


def test_webdataset_shards_stream_with_split_by_file_name(shards):
    args = DataArguments(
        dataset_name="webdataset",
        data_dir=str(shards),
        streaming=True,
        shuffle_buffer_size=8,
        num_labels=3,
    )
    train, evaluation, names = load_image_dataset(args)
    assert train.n_shards == 2
    assert resolve_columns(train) == ("jpg", "cls")
    assert names == ["0", "1", "2"]
    assert sorted(_ids(train)) == list(range(24))
    assert sorted(_ids(evaluation)) == [100, 101, 102, 103]
    assert load_image_dataset(DataArguments(data_dir=str(shards), streaming=True))[2] is None


def test_streaming_shuffle_is_seeded_and_changes_with_set_epoch(shards):
    def order(seed, epoch):
        args = DataArguments(
            data_dir=str(shards), streaming=True, shuffle_buffer_size=8, dataset_seed=seed
        )
        train = load_image_dataset(args)[0]
        train.set_epoch(epoch)
        return _ids(train)

    epoch0 = order(0, 0)
    assert epoch0 == order(0, 0)  # reproducible
    assert sorted(epoch0) == list(range(24))
    assert order(0, 1) != epoch0  # the Trainer's set_epoch reshuffles each epoch
    assert sorted(order(0, 1)) == list(range(24))
    assert order(1, 0) != epoch0


def test_streaming_carve_is_disjoint_and_independent_of_sharding(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    _write_shard(root / "a-0000.tar", range(0, 30))
    _write_shard(root / "a-0001.tar", range(30, 60))
    args = DataArguments(data_dir=str(root), streaming=True, eval_fraction=0.25)
    train, evaluation, _ = load_image_dataset(args)
    train_ids, eval_ids = set(_ids(train)), set(_ids(evaluation))
    assert train_ids | eval_ids == set(range(60))
    assert not train_ids & eval_ids
    assert 5 <= len(eval_ids) <= 25
    # Sharded as the Trainer does on 2 ranks: the same examples are eval.
    sharded_eval = set(_ids(evaluation.shard(2, 0))) | set(_ids(evaluation.shard(2, 1)))
    assert sharded_eval == eval_ids


def test_streaming_never_splits_by_node(shards):
    # The Trainer shards an IterableDataset across ranks itself; doing it here too loses data.
    boom = mock.Mock(side_effect=AssertionError("split_dataset_by_node must not be called"))
    with mock.patch("datasets.distributed.split_dataset_by_node", boom):
        train, _, _ = load_image_dataset(DataArguments(data_dir=str(shards), streaming=True))
        assert sorted(_ids(train)) == list(range(24))
    boom.assert_not_called()


def test_max_samples_take_a_seeded_subset_across_classes(imagefolder):
    args = DataArguments(
        data_dir=str(imagefolder), eval_fraction=1 / 3, max_train_samples=6, max_eval_samples=3
    )
    train, evaluation, _ = load_image_dataset(args)
    assert (len(train), len(evaluation)) == (6, 3)
    assert len(set(train["label"])) > 1  # not the first class only (folder order)


# ---------------------------------------------------------------------------------------------
# Hub datasets: only the network boundary, datasets.load_dataset, is replaced


def test_hub_dataset_is_loaded_by_name_config_split_and_streaming():
    local = load_digits_dataset()
    fake = mock.Mock(side_effect=lambda path, name, split, streaming: local[split])
    args = DataArguments(dataset_name="ILSVRC/imagenet-1k", dataset_config="full")
    with mock.patch("datasets.load_dataset", fake):
        train, evaluation, names = load_image_dataset(args)
    assert fake.call_args_list == [
        mock.call("ILSVRC/imagenet-1k", "full", split="train", streaming=False),
        mock.call("ILSVRC/imagenet-1k", "full", split="validation", streaming=False),
    ]
    assert (len(train), len(evaluation), names[:2]) == (1497, 300, ["0", "1"])


def test_hub_streaming_dataset_without_eval_split_carves_one():
    local = load_digits_dataset()["train"].select(range(200)).to_iterable_dataset(num_shards=2)

    def fake(path, name, split, streaming):
        if split != "train":
            raise ValueError(f'Bad split: {split}. Available splits: ["train"]')
        return local

    args = DataArguments(
        dataset_name="timm/imagenet-1k-wds", streaming=True, eval_fraction=0.2, max_eval_samples=10
    )
    with mock.patch("datasets.load_dataset", mock.Mock(side_effect=fake)) as patched:
        train, evaluation, _ = load_image_dataset(args)
    assert [c.kwargs["streaming"] for c in patched.call_args_list] == [True, True]
    n_train, n_eval = sum(1 for _ in train), sum(1 for _ in evaluation)
    assert n_eval == 10 and 130 <= n_train <= 190


def test_hub_errors_other_than_a_missing_split_propagate():
    def fake(path, name, split, streaming):
        raise ValueError("The dataset is gated; log in with `hf auth login`.")

    with mock.patch("datasets.load_dataset", mock.Mock(side_effect=fake)):
        with pytest.raises(ValueError, match="gated"):
            load_image_dataset(DataArguments(dataset_name="ILSVRC/imagenet-1k"))


# ---------------------------------------------------------------------------------------------
# Arguments


def test_data_arguments_parse_with_hf_argument_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DataArguments)
    assert "--shuffle_buffer_size" in parser.format_help()  # no stray % in help strings
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--dataset_name",
            "timm/imagenet-1k-wds",
            "--streaming",
            "--randaugment",
            "m9-n2",
            "--image_size",
            "64",
            "--mixup_alpha",
            "0.8",
        ]
    )
    assert (args.dataset_name, args.streaming, args.image_size) == (
        "timm/imagenet-1k-wds",
        True,
        64,
    )
    assert (args.randaugment, args.mixup_alpha, args.source) == ("m9-n2", 0.8, "hub")


def test_data_arguments_share_a_parser_with_training_arguments():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((DataArguments, TrainingArguments))  # no clashing option names
    data, training = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--seed", "3", "--dataset_seed", "5", "--max_steps", "7"]
    )
    assert (data.dataset_seed, training.seed, training.max_steps) == (5, 3, 7)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"shuffle_buffer_size": 0}, "shuffle_buffer_size"),
        ({"mixup_alpha": -1.0}, "mixup_alpha"),
        ({"random_erasing": 1.5}, "random_erasing"),
        ({"randaugment": "strong"}, "randaugment"),
        ({"min_crop_scale": 0.0}, "min_crop_scale"),
    ],
)
def test_data_arguments_errors_name_the_field(kwargs, field):
    with pytest.raises(DataArgumentsError, match=field):
        DataArguments(**kwargs)


def test_local_sources_need_a_data_dir():
    with pytest.raises(DataArgumentsError, match="data_dir"):
        _ = DataArguments(dataset_name="imagefolder").source
    with pytest.raises(DataArgumentsError, match="data_dir='/no/such/dir'"):
        _ = DataArguments(data_dir="/no/such/dir").source


def test_resolve_columns_names_the_missing_field(imagefolder):
    import datasets

    ds = datasets.Dataset.from_dict({"picture": [1], "label": [0]})
    with pytest.raises(DataArgumentsError, match="image_column"):
        resolve_columns(ds)
    with pytest.raises(DataArgumentsError, match="label_column='y'"):
        resolve_columns(ds, "picture", "y")
    assert resolve_columns(ds, "picture") == ("picture", "label")


@pytest.mark.parametrize("max_steps", [-1, 0, None])
def test_streaming_without_max_steps_is_refused(max_steps):
    with pytest.raises(ValueError, match="max_steps"):
        require_max_steps(True, max_steps)


def test_max_steps_is_only_required_when_streaming():
    require_max_steps(False, -1)
    require_max_steps(True, 100)


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("m15-n2", (15, 2)), ("rand-m9-n3", (9, 3)), ("n1-m30", (30, 1)), ("m7", (7, 2))],
)
def test_parse_randaugment(spec, expected):
    assert parse_randaugment(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("x15", "cannot read 'x15'"),
        ("n2", "no magnitude"),
        ("m31", "0..30"),
        ("m9-n0", "num_ops"),
        ("m9-mstd0.5", "cannot read 'mstd0.5'"),
    ],
)
def test_parse_randaugment_errors(spec, message):
    with pytest.raises(DataArgumentsError, match=f"randaugment='{spec}'.*{message}"):
        parse_randaugment(spec)


def test_eval_transform_normalizes_exactly():
    tf = build_transforms(16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), train=False)
    out = tf(Image.new("RGB", (40, 30), (255, 0, 51)))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, 51 / 255])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-6)
    assert torch.allclose(out, expected[:, None, None].expand(3, 16, 16), atol=1e-6)


def test_eval_transform_resizes_by_0_875_then_center_crops():
    tf = build_transforms(14, mean=(0, 0, 0), std=(1, 1, 1), train=False)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["function", "Resize", "CenterCrop", "MaybeToTensor", "Normalize"]  # timm's
    assert tf.transforms[1].size == 16  # int(14 / 0.875)
    # A 16x16 image is not resized; the crop keeps exactly the central 14x14 pixels.
    one_pixel_border = Image.new("RGB", (16, 16))
    one_pixel_border.paste((255, 255, 255), (1, 1, 15, 15))
    assert tf(one_pixel_border).min() == 1.0
    two_pixel_border = Image.new("RGB", (16, 16))
    two_pixel_border.paste((255, 255, 255), (2, 2, 14, 14))
    assert tf(two_pixel_border).min() == 0.0


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_train_transform_converts_any_mode_to_rgb(mode):
    torch.manual_seed(0)
    tf = build_transforms(8, train=True, randaugment="m9-n2", random_erasing=0.5)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == [  # timm's training transform (timm.data.create_transform)
        "function",
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]
    randaugment = tf.transforms[3]
    assert randaugment.num_layers == 2
    assert {(op.magnitude, op.prob) for op in randaugment.ops} == {(9, 1.0)}
    out = tf(_image(3, mode, size=20))
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32


def test_digits_transforms_skip_flips_and_keep_most_of_the_digit():

    train_tf, _ = transforms_from_args(DataArguments())
    names = [type(t).__name__ for t in train_tf.transforms]
    assert "RandomHorizontalFlip" not in names
    assert train_tf.transforms[1].scale == (0.8, 1.0) and train_tf.transforms[1].size == (32, 32)
    train_tf, _ = transforms_from_args(DataArguments(dataset_name="timm/imagenet-1k-wds"))
    assert train_tf.transforms[1].scale == (0.08, 1.0) and train_tf.transforms[1].size == (224, 224)


def test_normalization_from_processors_and_configs():
    from transformers import ViTConfig, ViTImageProcessor

    assert normalization_from(ViTImageProcessor()) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224)
    shortest = ViTImageProcessor(size={"shortest_edge": 160}, image_mean=[0.1] * 3)
    assert normalization_from(shortest) == ((0.1,) * 3, (0.5,) * 3, 160)
    assert normalization_from(ViTConfig(image_size=32)) == (IMAGENET_MEAN, IMAGENET_STD, 32)
    assert normalization_from(None) == (IMAGENET_MEAN, IMAGENET_STD, None)
    timm_like = mock.Mock(spec=["pretrained_cfg"])
    timm_like.pretrained_cfg = {
        "mean": (0.2, 0.3, 0.4),
        "std": (1, 1, 1),
        "input_size": (3, 96, 96),
    }
    assert normalization_from(timm_like) == ((0.2, 0.3, 0.4), (1.0, 1.0, 1.0), 96)


# ---------------------------------------------------------------------------------------------
# Collators


def _examples(n=4, classes=3):
    g = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.rand(3, 4, 4, generator=g), "labels": i % classes} for i in range(n)
    ]


def test_collate_fn_stacks():
    batch = collate_fn(_examples())
    assert batch["pixel_values"].shape == (4, 3, 4, 4)
    assert batch["labels"].tolist() == [0, 1, 2, 0] and batch["labels"].dtype == torch.long


def test_soft_labels_give_the_vit_bce_loss():
    from conftest import tiny_vit

    model = tiny_vit(labels=3).eval()
    examples = [{"pixel_values": torch.rand(3, 32, 32), "labels": i % 3} for i in range(4)]
    batch = collate_fn(examples)
    one_hot = torch.nn.functional.one_hot(batch["labels"], 3).float()
    batch["labels"] = 0.7 * one_hot + 0.3 * one_hot.flip(0)  # mixed soft targets
    assert model.config.problem_type is None
    out = model(**batch)
    assert model.config.problem_type == "multi_label_classification"  # set by the float labels
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch["labels"])
    assert torch.allclose(out.loss, expected)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_shipped_metric_modules_load_by_path():
    import evaluate

    accuracy = evaluate.load(str(REPO / "nmsparse_hf" / "data" / "metric_scripts" / "accuracy.py"))
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    top5 = evaluate.load(metric_path("top5"))
    ranked = [[3, 1, 0, 2, 4], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]
    assert top5.compute(predictions=ranked, references=[4, 5, 9, 0]) == {"top5_accuracy": 0.5}
    assert top5.compute(predictions=ranked, references=[4, 5, 9, 0], k=1) == {"top1_accuracy": 0.0}
    with pytest.raises(ValueError, match="k=6"):
        top5.compute(predictions=ranked, references=[4, 5, 9, 0], k=6)


def test_make_compute_metrics_on_hand_made_logits():
    from transformers import EvalPrediction

    logits = np.zeros((4, 7), dtype=np.float32)
    logits[0, [2, 0]] = [5, 1]  # top-1 = 2, label 2: right
    logits[1, :] = [6, 5, 4, 3, 2, 1, 0]  # label 4 is 5th: top-5 right, top-1 wrong
    logits[2, :] = [6, 5, 4, 3, 2, 1, 0]  # label 5 is 6th: both wrong
    logits[3, 6] = 1  # label 6: right
    labels = np.array([2, 4, 5, 6])
    compute = make_compute_metrics()
    expected = {"accuracy": 0.5, "top5_accuracy": 0.75}
    assert compute(EvalPrediction(predictions=logits, label_ids=labels)) == expected
    soft = np.eye(7, dtype=np.float32)[labels] * 0.7 + 0.3 / 7  # mixup-style label_ids
    assert compute(EvalPrediction(predictions=(logits, None), label_ids=soft)) == expected


def test_hub_metric_names_pass_through_to_evaluate_load():
    fake = mock.Mock()
    fake.return_value.compute.return_value = {"f1": 0.5}
    with mock.patch("evaluate.load", fake):
        compute = make_compute_metrics(("accuracy", "f1"))
    assert fake.call_args_list == [
        mock.call(
            str(REPO / "nmsparse_hf" / "data" / "metric_scripts" / "accuracy.py"),
            keep_in_memory=True,
        ),
        mock.call("f1", keep_in_memory=True),
    ]
    from transformers import EvalPrediction

    result = compute(EvalPrediction(predictions=np.eye(3), label_ids=np.arange(3)))
    assert result == {"f1": 0.5}
    assert fake.return_value.compute.call_args.kwargs["predictions"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Two real processes: the Trainer shards the stream, each sample is seen once per epoch


@pytest.mark.multiprocess
def test_two_ranks_see_every_streamed_sample_once_per_epoch(shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    steps_per_epoch = 3  # 24 samples / (2 ranks x batch 4)
    cmd = torchrun_command(
        REPO / "tests" / "_data_worker.py",
        "--data_dir",
        str(shards),
        "--out",
        str(out),
        "--steps_per_epoch",
        str(steps_per_epoch),
        "--batch_size",
        "4",
    )
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for mode in ("dispatch", "per_rank"):
        records = [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in records] == [0, 1]
        assert {(r["world_size"], r["trainer_world_size"], r["backend"]) for r in records} == {
            (2, 2, "gloo")
        }
        assert all(r["global_step"] == 2 * steps_per_epoch for r in records)
        epochs = []
        for epoch in range(2):
            steps = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
            per_rank = [[i for batch in r["seen"][steps] for i in batch] for r in records]
            assert all(len(ids) == 12 for ids in per_rank), (mode, epoch, per_rank)
            assert sorted(per_rank[0] + per_rank[1]) == list(range(24)), (mode, epoch, per_rank)
            epochs.append(per_rank)
        assert epochs[0] != epochs[1], f"{mode}: set_epoch did not reshuffle the second epoch"

"""timm's augmentation pipeline driven by timm's keys, and random draws keyed by (seed, epoch, sample).

The seed-style files in ``tests/seed_configs/`` are the two training configs shipped by the paper's
research repository (a timm fork), unchanged.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nmsparse_hf.data import (
    AugmentedDataset,
    DataArguments,
    DataArgumentsError,
    TimmMixCollator,
    augmentation_key,
    build_transforms,
    collate_fn,
    load_digits_dataset,
    seeded_rng,
    transforms_from_args,
)
from nmsparse_hf.data.arguments import parse_randaugment, timm_auto_augment
from nmsparse_hf.recipes.arguments import parse_args

SEED_CONFIGS = Path(__file__).resolve().parent / "seed_configs"


def _image(seed: int = 0, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _seed_recipe():
    return parse_args([str(SEED_CONFIGS / "vit_base_training.yaml"), "--use_cpu", "true"], "vit")


# ---------------------------------------------------------------------------------------------
# The seed's file -> timm's pipeline, with the seed's meaning


def test_seed_yaml_gives_timms_randaugment_at_full_strength():
    """``aa: rand-m15-n2-p1-mstd0``: timm's RandAugment, 2 ops from timm's list, each applied,
    magnitude 15 clipped by timm to its maximum 10 (torchvision's m15 of 31 bins is half)."""
    _, data_args, _, _, _ = _seed_recipe()
    assert data_args.randaugment == "m15-n2"
    assert timm_auto_augment(data_args.randaugment) == "rand-m15-n2-p1-mstd0"
    train_tf, _ = transforms_from_args(data_args)
    ra = next(t for t in train_tf.transforms if type(t).__name__ == "RandAugment")
    assert type(ra).__module__ == "timm.data.auto_augment"
    assert ra.num_layers == 2
    assert {op.name for op in ra.ops} >= {"Rotate", "ShearX", "Solarize", "Posterize", "Equalize"}
    assert {(op.magnitude, op.prob, op.magnitude_std) for op in ra.ops} == {(15, 1.0, 0)}

    from timm.data.auto_augment import AugmentOp

    rotate = next(op for op in ra.ops if op.name == "Rotate")
    image = _image()

    def rotated(op):
        random.seed(3)
        return np.asarray(op(image))

    full = AugmentOp("Rotate", prob=1.0, magnitude=10, hparams=rotate.hparams)
    half = AugmentOp("Rotate", prob=1.0, magnitude=7, hparams=rotate.hparams)
    assert np.array_equal(rotated(rotate), rotated(full))  # m15 == m10: full strength
    assert not np.array_equal(rotated(rotate), rotated(half))


def test_seed_yaml_augmentation_keys_mean_what_timm_means():
    _, data_args, args, _, _ = _seed_recipe()
    assert (data_args.mixup_alpha, data_args.cutmix_alpha) == (0.5, 0.0)
    assert (data_args.mixup_prob, data_args.mixup_switch_prob, data_args.mixup_mode) == (
        1.0,
        0.5,
        "batch",
    )
    assert data_args.train_interpolation == "random" and data_args.interpolation is None
    assert data_args.crop_scale == [0.08, 1.0] and data_args.hflip == 0.5
    assert data_args.random_erasing == 0.0 and data_args.color_jitter is None
    assert args.label_smoothing_factor == 0.0
    train_tf, eval_tf = transforms_from_args(data_args)
    crop = train_tf.transforms[1]
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation"
    assert [m.value for m in crop.interpolation] == ["bilinear", "bicubic"]  # random per image
    assert crop.scale == (0.08, 1.0)
    assert "ColorJitter" not in [type(t).__name__ for t in train_tf.transforms]


def test_timm_models_eval_transform_follows_their_pretrained_cfg():
    """timm resolves '' interpolation / None crop_pct from the model: vit_base_patch16_224 is
    bicubic, crop 0.9, mean/std 0.5 (what the seed's runs evaluated with)."""
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1, embed_dim=48
    )
    _, eval_tf = transforms_from_args(DataArguments(dataset_name="x/y"), model)
    resize, crop, norm = eval_tf.transforms[1], eval_tf.transforms[2], eval_tf.transforms[4]
    assert resize.size == int(224 / 0.9) and crop.size == (224, 224)
    assert resize.interpolation.value == "bicubic"
    assert torch.allclose(norm.mean, torch.tensor([0.5] * 3))


@pytest.mark.parametrize(
    ("spec", "timm_spec"),
    [
        ("m9-n2", "rand-m9-n2-p1-mstd0"),
        ("rand-m9-n2-mstd0.5", "rand-m9-n2-mstd0.5"),
        ("rand-m7-n3-p0.5-inc1", "rand-m7-n3-p0.5-inc1"),
        ("augmix-m5-w3", "augmix-m5-w3"),
        ("original", "original"),
    ],
)
def test_randaugment_spellings(spec, timm_spec):
    assert timm_auto_augment(spec) == timm_spec
    build_transforms(16, train=True, randaugment=spec)(_image())  # timm accepts it


def test_randaugment_timm_form_parses_magnitude():
    assert parse_randaugment("rand-m15-n2-p1-mstd0") == (15, 2)
    assert parse_randaugment("rand-n3") == (10, 3)  # timm's default magnitude


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cutmix_alpha": -1.0}, "cutmix_alpha"),
        ({"mixup_switch_prob": 2.0}, "mixup_switch_prob"),
        ({"mixup_mode": "row"}, "mixup_mode"),
        ({"random_erasing_mode": "zeros"}, "random_erasing_mode"),
        ({"train_interpolation": "cubic"}, "train_interpolation"),
        ({"crop_scale": [0.5, 0.1]}, "crop_scale"),
        ({"crop_scale": [0.1, 1.0], "min_crop_scale": 0.2}, "keep one"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"hflip": 1.5}, "hflip"),
        ({"bad_images": "ignore"}, "bad_images"),
    ],
)
def test_augmentation_settings_are_checked(kwargs, field):
    with pytest.raises(DataArgumentsError, match=field):
        DataArguments(**kwargs)


def test_hflip_true_means_timms_half():
    assert DataArguments(hflip=True).hflip == 0.5 and DataArguments(hflip=False).hflip == 0.0


# ---------------------------------------------------------------------------------------------
# Mixup + cutmix + label smoothing -> BCE soft targets


def _batch(n=8, classes=4, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.rand(3, size, size, generator=g),
            "labels": i % classes,
            "aug_key": augmentation_key(seed, 0, i),
        }
        for i in range(n)
    ]


def test_mixup_and_cutmix_switch_and_give_soft_targets_for_bce():
    from conftest import tiny_vit

    collator = TimmMixCollator(
        4, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, seed=0
    )
    kinds = set()
    for seed in range(12):
        examples = _batch(seed=seed)
        x = collate_fn(examples)["pixel_values"]
        out = collator(examples)
        y, mixed = out["labels"], out["pixel_values"]
        assert y.shape == (8, 4) and y.dtype == torch.float32
        assert torch.allclose(y.sum(dim=1), torch.ones(8), atol=1e-6)
        assert y.min() >= 0.1 / 4 - 1e-6  # smoothing keeps every class above off = s / C
        lam = (y[0, 0] - 0.025) / 0.9  # example 0 (class 0) is mixed with example 7 (class 3)
        same = (mixed == x).flatten(1).all(dim=1)
        if torch.equal(mixed, lam * x + (1 - lam) * x.flip(0)) or torch.allclose(
            mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6
        ):
            kinds.add("mixup")
        elif not same.all():  # cutmix: a box pasted from the flipped batch, the rest untouched
            pasted = (mixed != x).flatten(1).float().mean(dim=1)
            assert 0 < pasted[0] < 1
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}

    model = tiny_vit(hidden=32, image=16, patch=4, labels=4)
    model.config.problem_type = "multi_label_classification"
    out = model(**collator(_batch()))
    batch = collator(_batch())
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        model(pixel_values=batch["pixel_values"]).logits, batch["labels"]
    )
    assert torch.allclose(out.loss, expected)
    out.loss.backward()


def test_mixing_is_keyed_by_the_batch_not_by_history():
    collator = TimmMixCollator(4, mixup_alpha=0.8, cutmix_alpha=1.0, seed=0)
    first = collator(_batch(seed=1))
    for seed in range(5):  # other batches in between change nothing
        collator(_batch(seed=seed + 10))
    np.random.seed(123)  # nor does the global numpy state, which is left as it was
    again = collator(_batch(seed=1))
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert torch.equal(first["labels"], again["labels"])
    other_seed = TimmMixCollator(4, mixup_alpha=0.8, cutmix_alpha=1.0, seed=1)(_batch(seed=1))
    assert not torch.equal(first["labels"], other_seed["labels"])


def test_unmixed_targets_odd_batches_and_eval_collator():
    collator = TimmMixCollator(4, mixup_alpha=0.8, prob=0.0, label_smoothing=0.2)
    assert collator.mixup is None
    y = collator(_batch(n=3))["labels"]
    assert torch.allclose(y[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))
    odd = TimmMixCollator(4, mixup_alpha=0.8, seed=0)(_batch(n=5))
    assert torch.equal(odd["labels"][4], torch.eye(4)[0])  # the fifth stays unmixed
    assert not torch.equal(odd["labels"][:4], torch.eye(4)[[0, 1, 2, 3]])
    plain = collator.eval_collator()(_batch(n=3))
    assert torch.equal(plain["labels"], torch.eye(4)[[0, 1, 2]])


# ---------------------------------------------------------------------------------------------
# Per-example draws: a pure function of (seed, epoch, index)


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()["train"].select(range(12))


def _augmented(digits, seed=0):
    tf = build_transforms(16, train=True, randaugment="m9-n2", random_erasing=0.5)
    return AugmentedDataset(digits, tf, "image", "label", seed=seed)


def test_an_example_is_augmented_the_same_whatever_came_before(digits):
    ds = _augmented(digits)
    reference = [ds[i]["pixel_values"] for i in range(6)]
    random.seed(5)
    torch.manual_seed(5)
    before = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    for i in (5, 3, 3, 0, 4, 2, 1):  # another order, repeats, fresh dataset object
        assert torch.equal(_augmented(digits)[i]["pixel_values"], reference[i])
        assert torch.equal(ds[i]["pixel_values"], reference[i])
    assert (random.random(), torch.rand(1)) == before  # global RNG states untouched
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["pixel_values"], reference[0])  # a new epoch, new draws
    assert ds[0]["aug_key"] == augmentation_key(0, 1, 0)
    assert not torch.equal(_augmented(digits, seed=1)[0]["pixel_values"], reference[0])


def test_unkeyed_augmentation_depends_on_history(digits):
    """The failure the keyed pipeline prevents: drawing from the global stream, an example's
    augmentation depends on how many examples were transformed before it (a resumed run skips
    batches without transforming them)."""
    tf = build_transforms(16, train=True, randaugment="m9-n2")
    images = [digits[i]["image"] for i in range(4)]

    def third(skip_first: bool):
        random.seed(0)
        torch.manual_seed(0)
        if not skip_first:
            tf(images[0])
            tf(images[1])
        return tf(images[2])

    assert not torch.equal(third(True), third(False))
    with seeded_rng(augmentation_key(0, 0, 2)):
        a = tf(images[2])
    tf(images[0])
    with seeded_rng(augmentation_key(0, 0, 2)):
        b = tf(images[2])
    assert torch.equal(a, b)


def test_epoch_reaches_persistent_dataloader_workers(digits):
    ds = _augmented(digits)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=collate_fn
    )
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(torch.cat([b["pixel_values"] for b in loader]))
    for epoch in range(2):
        ds.set_epoch(epoch)
        expected = torch.stack([ds[i]["pixel_values"] for i in range(12)])
        assert torch.equal(epochs[epoch], expected)


# ---------------------------------------------------------------------------------------------
# The ImageNet recipes do what their comments and docs/AUGMENTATION.md say


def test_vit_imagenet_recipe_augmentation_is_the_seeds():
    from types import SimpleNamespace

    import timm

    from nmsparse_hf.recipes.arguments import shipped_config

    recipe = parse_args(
        [str(shipped_config("vit_b16_imagenet_mdgf_exp_1of32.yaml")), "--use_cpu", "true"], "vit"
    )
    d = recipe.data
    assert (d.mixup_alpha, d.cutmix_alpha, d.mixup_prob, d.mixup_mode) == (0.5, 0.0, 1.0, "batch")
    assert recipe.training.label_smoothing_factor == 0.0 and recipe.model.bce_loss
    vit_b = SimpleNamespace(
        pretrained_cfg=timm.models.get_pretrained_cfg("vit_base_patch16_224").to_dict()
    )
    train_tf, eval_tf = transforms_from_args(d, vit_b)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names == [
        "function",
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
    ]
    crop, flip, ra, norm = (train_tf.transforms[i] for i in (1, 2, 3, 5))
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert [m.value for m in crop.interpolation] == ["bilinear", "bicubic"]
    assert flip.p == 0.5 and ra.num_layers == 2
    assert {(op.magnitude, op.prob, op.magnitude_std) for op in ra.ops} == {(15, 1.0, 0)}
    assert torch.allclose(norm.mean, torch.tensor([0.5] * 3))
    resize, center = eval_tf.transforms[1], eval_tf.transforms[2]
    assert (resize.size, resize.interpolation.value, center.size) == (248, "bicubic", (224, 224))


def test_timm_wrapper_models_give_their_timm_data_config():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from nmsparse_hf.data import build_training_data

    model = TimmWrapperForImageClassification(
        TimmWrapperConfig(
            architecture="vit_tiny_patch16_224",
            num_labels=10,
            model_args={"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 48},
        )
    )
    dd = load_digits_dataset()
    args = DataArguments(image_size=16)
    data = build_training_data(args, dd["train"], dd["validation"], 10, model=model)
    resize = data.eval_transform.transforms[1]
    assert resize.interpolation.value == "bicubic" and resize.size == int(16 / 0.9)

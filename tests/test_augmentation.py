"""The training data stack: torchvision v2 pretraining crops and timm fine-tuning augmentation, as the authors run
them; per-sample seeding; Mixup in the collator; the 16-bit rule shared with the image processor."""

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import v2

from nepa_hf.data.augmentation import AugmentationArguments, MixupCollator
from nepa_hf.data.classification import MIXABLE_KEY, collate_image_batch
from nepa_hf.models.nepa.image_processing_nepa import NepaImageProcessor
from nepa_hf.data.transforms import ImageProcessorTransform, pretraining_transform, seeded, to_rgb

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def photo(photo_images):
    return photo_images[1]


def test_pretraining_transform_is_the_authors_torchvision_pipeline(photo):
    transform = pretraining_transform(48, MEAN, STD)
    crop = transform.transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == v2.InterpolationMode.BILINEAR
    # The authors' code: torchvision RandomResizedCrop(size) with its defaults, flip, ToTensor, Normalize.
    authors = T.Compose([T.RandomResizedCrop(48), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    rgb = to_rgb(photo)
    for seed in range(10):
        with seeded(seed):
            ours = transform(rgb)
        with seeded(seed):
            theirs = authors(rgb)
        assert ours.dtype == torch.float32 and ours.shape == (3, 48, 48)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # 1/255 vs x/255 rounding only


def test_seeded_is_reproducible_and_restores_the_callers_random_streams(photo):
    transform = AugmentationArguments().train_transform(32, MEAN, STD)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with seeded(123):
        first = transform(photo)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with seeded(123):
        again = transform(photo)
    with seeded(124):
        other = transform(photo)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_seeded_leaves_cuda_seeding_alone(photo, monkeypatch):
    """Per-sample seeding touches only the CPU generator: `torch.manual_seed` also calls `torch.cuda.manual_seed_all`,
    which on CUDA builds captures a stack trace per sample before CUDA starts (~10 ms each) and reseeds the GPUs."""
    cuda_seedings = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: cuda_seedings.append(seed))
    transform = AugmentationArguments().train_transform(32, MEAN, STD)
    for seed in range(3):
        with seeded(seed):
            transform(photo)
    assert cuda_seedings == []


def test_finetuning_transform_is_timms_create_transform(photo):
    """The defaults are the authors' timm call, and the transform is timm's own (same output under the same seed)."""
    ours = AugmentationArguments().train_transform(32, MEAN, STD)
    theirs = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                              re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)
    names = [type(t).__name__ for t in ours.transform.transforms]
    assert names == [type(t).__name__ for t in theirs.transforms]
    assert "RandAugment" in names and "RandomErasing" in names and "ColorJitter" not in names
    for seed in range(5):
        with seeded(seed):
            a = ours(photo)
        with seeded(seed):
            b = theirs(photo)
        assert torch.equal(a, b) and a.shape == (3, 32, 32)
    # Any PIL mode works: grayscale, RGBA and 16-bit images become RGB first.
    gray = Image.fromarray((np.arange(28 * 28) % 256).reshape(28, 28).astype(np.uint8))
    rgba = photo.convert("RGBA")
    sixteen = Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))
    for image in (gray, rgba, sixteen):
        assert ours(image).shape == (3, 32, 32)


def test_flags_switch_each_piece_off():
    args = AugmentationArguments(rand_augment="none", random_erasing_prob=0.0, hflip_prob=0.0, mixup_alpha=0.0,
                                 cutmix_alpha=0.0, crop_scale_min=0.5)
    names = [type(t).__name__ for t in args.train_transform(32, MEAN, STD).transform.transforms]
    assert "RandAugment" not in names and "RandomErasing" not in names and "RandomHorizontalFlip" not in names
    assert "ColorJitter" in names  # timm's colour jitter comes back without RandAugment, as in timm
    assert args.train_transform(32, MEAN, STD).transform.transforms[0].scale == (0.5, 1.0)
    assert args.collator(10, label_smoothing=0.1) is collate_image_batch  # no mixing: integer labels
    with pytest.raises(ValueError, match="crop_scale_min"):
        AugmentationArguments(crop_scale_min=0.0)
    with pytest.raises(ValueError, match="interpolation"):
        AugmentationArguments(interpolation="cubic")


def test_eval_processor_is_resize_256_bicubic_centre_crop_224(photo):
    processor = AugmentationArguments().eval_image_processor(224, MEAN, STD)
    assert isinstance(processor, NepaImageProcessor)
    assert processor.size.shortest_edge == 256 and processor.do_center_crop
    assert (processor.crop_size.height, processor.crop_size.width) == (224, 224) and processor.resample == 3
    pixels = ImageProcessorTransform(processor)(photo)
    # torchvision's Resize(256, bicubic) + CenterCrop(224) + ToTensor + Normalize on the PIL image.
    reference = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(MEAN, STD)])(photo.convert("RGB"))
    assert pixels.shape == (3, 224, 224)
    # The processor resizes tensors (antialiased bicubic), the reference PIL images: a few grey levels apart.
    assert (pixels - reference).abs().mean() < 0.01
    straight = AugmentationArguments(eval_crop_pct=1.0).eval_image_processor(32, MEAN, STD)
    assert (straight.size.height, straight.size.width) == (32, 32) and not straight.do_center_crop


def examples(count, mixable=True, num_labels=10):
    generator = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(3, 8, 8, generator=generator), "labels": i % num_labels} for i in range(count)]
    if mixable:
        for row in rows:
            row[MIXABLE_KEY] = True
    return rows


def test_mixup_collator_mixes_training_batches_into_smoothed_soft_targets():
    collator = AugmentationArguments().collator(10, label_smoothing=0.1)
    assert isinstance(collator, MixupCollator)
    mixup = collator.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.mode) == (
        0.8, 1.0, 1.0, 0.5, "batch")
    rows = examples(8)
    np.random.seed(0)
    batch = collator(rows)
    targets = batch["labels"]
    assert targets.shape == (8, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing puts eps / C on every class
    assert not torch.equal(batch["pixel_values"], torch.stack([r["pixel_values"] for r in rows]))
    # Each target mixes the sample's own class with its partner in the flipped batch (timm's "batch" mode).
    top2 = targets.topk(2, dim=1).indices
    for i, row in enumerate(rows):
        assert set(top2[i].tolist()) == {row["labels"], rows[7 - i]["labels"]}


def test_mixup_collator_leaves_evaluation_batches_alone_and_drops_an_odd_sample(caplog):
    collator = AugmentationArguments().collator(10, label_smoothing=0.1)
    rows = examples(5, mixable=False)
    batch = collator(rows)
    assert batch["labels"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(batch["pixel_values"], torch.stack([r["pixel_values"] for r in rows]))
    with caplog.at_level(logging.WARNING):
        mixed = collator(examples(5))
    assert mixed["labels"].shape == (4, 10) and "even batch" in caplog.text


def test_collate_refuses_unnormalised_integer_pixels():
    rows = [{"pixel_values": torch.zeros(3, 4, 4, dtype=torch.uint8), "labels": 0}] * 2
    with pytest.raises(ValueError, match="not normalised floats"):
        collate_image_batch(rows)


def test_16_bit_images_follow_the_image_processor_rule():
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 255, 128]  # value / 257, rounded
    assert np.array_equal(np.asarray(to_rgb(values)), rgb)  # uint16 arrays too


def test_16_bit_images_give_the_same_8_bit_values_through_the_processor_and_every_training_loader(tmp_path):
    """Item 4 of issue 14: one 16-bit rule (value / 257, rounded) for a 16-bit PNG, a uint16 grayscale array and a
    uint16 RGB array, through the image processor, the pretraining and fine-tuning loaders and the segmentation
    augmentation (none scales by the image's maximum, none clips, none refuses 16-bit colour)."""
    import datasets

    from nepa_hf.data.augmentation import RGBTransform
    from nepa_hf.data.classification import with_image_transform
    from nepa_hf.data.pretraining import PretrainingImageDataset
    from nepa_hf.data.segmentation import random_scale_crop_flip

    rng = np.random.default_rng(0)
    gray = (np.arange(8 * 12).reshape(8, 12) * 600 + 77).astype(np.uint16)  # up to 57077, far from its max rule
    color = rng.integers(0, 65536, size=(8, 12, 3), dtype=np.uint16)
    png = tmp_path / "gray16.png"
    Image.fromarray(gray).save(png)
    assert Image.open(png).mode.startswith("I")  # Pillow reads 16-bit PNGs in a 16-bit mode

    def eight_bit(array):
        expected = np.clip(np.round(array.astype(np.float64) / 257), 0, 255).astype(np.uint8)
        return np.repeat(expected[..., None], 3, axis=-1) if expected.ndim == 2 else expected

    capture = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32)])  # the RGB image the loader hands on, as is
    processor = NepaImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    for source, array in ((str(png), gray), (gray, gray), (color, color)):
        expected = torch.as_tensor(eight_bit(array)).permute(2, 0, 1).float()
        image = Image.open(source) if isinstance(source, str) else source
        through_processor = processor(image, return_tensors="pt").pixel_values[0]
        assert torch.equal(through_processor, expected)
        pretraining = PretrainingImageDataset([source], None, capture)[0]["pixel_values"]
        assert torch.equal(pretraining, expected)
        if isinstance(source, str):
            rows = datasets.Dataset.from_dict({"image": [source], "label": [0]})
        else:  # a uint16 array column (datasets' numpy format casts integers to int64 unless told the dtype)
            array_type = datasets.Array2D if array.ndim == 2 else datasets.Array3D
            features = datasets.Features({"image": array_type(array.shape, "uint16"), "label": datasets.Value("int64")})
            rows = datasets.Dataset.from_dict({"image": [source], "label": [0]}, features=features)
            rows = rows.with_format("numpy", dtype=np.uint16)
        for transform in (RGBTransform(capture), ImageProcessorTransform(processor)):
            finetuning = with_image_transform(rows, transform, "image", "label")[0]["pixel_values"]
            assert torch.equal(finetuning, expected)
        crop, _ = random_scale_crop_flip(image, np.zeros(array.shape[:2], np.uint8), array.shape[:2], rng,
                                         scale_range=(1.0, 1.0), flip_probability=0.0, cat_max_ratio=1.0)
        assert np.array_equal(crop, eight_bit(array))


def test_collators_drop_unreadable_examples_and_mixup_still_pairs_the_rest(caplog):
    """Item 7 of issue 14: unreadable examples (pixel_values None) are dropped by both collators; Mixup mixes the
    readable ones (dropping one more for an even batch); a batch with nothing readable is a clear error."""
    rows = examples(6)
    rows[2] = {**rows[2], "pixel_values": None}
    plain = collate_image_batch([{k: v for k, v in r.items() if k != MIXABLE_KEY} for r in rows])
    assert plain["labels"].tolist() == [0, 1, 3, 4, 5] and plain["pixel_values"].shape == (5, 3, 8, 8)
    collator = AugmentationArguments().collator(10, label_smoothing=0.1)
    with caplog.at_level(logging.WARNING):
        mixed = collator(rows)
    assert mixed["labels"].shape == (4, 10) and "even batch" in caplog.text
    single = collator([rows[0], {**rows[1], "pixel_values": None}])  # one left: smoothed soft target, unmixed
    assert single["labels"].shape == (1, 10) and single["labels"][0, 0] == pytest.approx(0.91)
    with pytest.raises(ValueError, match="All 2 images of a batch are unreadable"):
        collator([{**rows[0], "pixel_values": None}, {**rows[1], "pixel_values": None}])
    with pytest.raises(ValueError, match="pass the dataset returned by with_image_transform"):
        collate_image_batch([{"image": Image.new("RGB", (4, 4)), "label": 0}])


def test_mixable_marker_survives_the_trainers_column_removal():
    """A plain Trainer (remove_unused_columns=True) filters example dicts to the model's arguments; the dataset's
    examples are mappings it leaves alone, so Mixup still sees `mixable`."""
    import datasets
    from transformers.trainer_utils import RemoveColumnsCollator

    from nepa_hf.data.classification import with_image_transform

    rows = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (i * 30, 0, 0)) for i in range(4)],
                                       "label": [0, 1, 2, 3]})
    train = with_image_transform(rows, AugmentationArguments().train_transform(8, MEAN, STD), "image", "label",
                                 mixable=True)
    collator = RemoveColumnsCollator(AugmentationArguments().collator(10, 0.1), ["pixel_values", "labels"])
    assert collator([train[i] for i in range(4)])["labels"].shape == (4, 10)  # soft targets: mixed


def test_default_training_transform_runs_many_times_on_valid_images_of_supported_sizes(photo):
    """Issue 25 item 2: with timm's RandAugment at its top magnitude, posterize asks Pillow for 0 bits, which Pillow 13
    refuses (a few calls in a thousand raised); the lock and setup.cfg keep Pillow below 13. Every call must succeed."""
    transform = AugmentationArguments().train_transform(28, MEAN, STD)
    gray = Image.fromarray((np.arange(28 * 28) % 256).reshape(28, 28).astype(np.uint8))
    crops = [photo.resize((28, 28)), gray, photo.resize((64, 48)), photo.resize((224, 224))]
    for seed in range(1200):
        with seeded(seed):
            assert transform(crops[seed % len(crops)]).shape == (3, 28, 28)


def test_a_transform_error_is_raised_naming_the_image_and_not_counted_as_unreadable(tmp_path, caplog):
    """Issue 25 item 2: only reading/decoding errors make an image 'unreadable'; a transform that fails on a good
    image is a bug, raised with the image and the transform named, in fine-tuning and in pretraining data."""
    import datasets

    from nepa_hf.data.classification import with_image_transform
    from nepa_hf.data.pretraining import PretrainingImageDataset

    def posterize_zero_bits(image):
        raise ValueError("bits must be between or equal to 1 and 8")

    Image.new("RGB", (20, 16), (10, 200, 30)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = datasets.Dataset.from_dict({"image": [str(tmp_path / "good.png"), str(tmp_path / "broken.png")],
                                       "label": [0, 1]})
    images = with_image_transform(rows, posterize_zero_bits, "image", "label")
    with pytest.raises(RuntimeError, match=r"transform failed on image #0 \(.*good.png\) \(RGB, 20x16\).*bits must") as e:
        images[0]
    assert "posterize_zero_bits" in str(e.value) and isinstance(e.value.__cause__, ValueError)
    with caplog.at_level("WARNING"):
        assert images[1]["pixel_values"] is None  # the broken file is the unreadable one
    assert images.unreadable.count() == 1 and "broken.png" in caplog.text
    pretraining = PretrainingImageDataset(rows, "image", posterize_zero_bits)
    with pytest.raises(RuntimeError, match=r"transform failed on image #0 \(.*good.png\).*posterize_zero_bits"):
        pretraining[0]
    assert pretraining[1] == {"unreadable": 1}


def shifts_of(image: np.ndarray, padding: int) -> list[np.ndarray]:
    """Every crop of `image` zero-padded by `padding` px, at the image's size (the translations by up to `padding`)."""
    padded = np.pad(image, padding)
    size = image.shape[0]
    return [padded[top:top + size, left:left + size]
            for top in range(2 * padding + 1) for left in range(2 * padding + 1)]


def test_translation_crop_shifts_small_images_by_up_to_the_padding():
    """The small-image augmentation (--random_crop_padding): a zero-padded random crop, i.e. a shift by up to N px
    with the pixels otherwise unchanged, in pretraining (torchvision v2) and fine-tuning (timm's other stages)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).convert("RGB")
    pixels = np.asarray(image)[..., 0]
    shifts = shifts_of(pixels, 2)
    pretraining = pretraining_transform(28, MEAN, STD, crop_padding=2, hflip_prob=0.0)
    finetuning = AugmentationArguments(random_crop_padding=2, hflip_prob=0.0, rand_augment="none", color_jitter=0.0,
                                       random_erasing_prob=0.0).train_transform(28, MEAN, STD)
    seen = set()
    for seed in range(40):
        for transform in (pretraining, finetuning):
            with seeded(seed):
                out = transform(image)
            assert out.shape == (3, 28, 28)
            back = np.rint((out[0].numpy() * 0.5 + 0.5) * 255).astype(np.uint8)  # undo the normalisation
            matches = [index for index, shift in enumerate(shifts) if np.array_equal(back, shift)]
            assert matches, "the output is not a shift of the input by up to 2 px"
            seen.update(matches)
    assert len(seen) > 10  # the shift is random, over the whole range
    with seeded(0):  # padding 0 is a plain resize: the image itself
        identity = pretraining_transform(28, MEAN, STD, crop_padding=0, hflip_prob=0.0, scale=(1.0, 1.0),
                                         ratio=(1.0, 1.0))(image)
    assert np.array_equal(np.rint((identity[0].numpy() * 0.5 + 0.5) * 255).astype(np.uint8), pixels)
    with pytest.raises(ValueError, match="random_crop_padding must be >= 0"):
        AugmentationArguments(random_crop_padding=-1)


def test_normalisation_flags_take_one_value_or_one_per_channel():
    from nepa_hf.data.transforms import per_channel

    assert per_channel([0.286], 3, "--image_mean") == [0.286] * 3
    assert per_channel([0.1, 0.2, 0.3], 3, "--image_mean") == [0.1, 0.2, 0.3]
    assert per_channel([0.5], 1, "--image_std") == [0.5]
    with pytest.raises(ValueError, match="--image_std has 2 values for a 3-channel model"):
        per_channel([0.2, 0.3], 3, "--image_std")

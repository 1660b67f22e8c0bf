"""Transforms: decoding by content, the eval/CLIP views, and the DINO multi-crop recipe (each op
against a closed form; the recipe's probabilities over many cheap parameter draws)."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from agriclip_jax.testing import bad_corpus
from input_pipeline import transforms
from input_pipeline.transforms import BadRecord, MultiCropConfig


def _test_image(height=48, width=64, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str, **options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, **options)
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------

def test_decode_is_by_content_not_name():
  image = _test_image()
  png = transforms.decode_image(_encode(image, "PNG"))
  webp_lossless = transforms.decode_image(_encode(image, "WEBP", lossless=True))
  np.testing.assert_array_equal(png, image)
  np.testing.assert_array_equal(webp_lossless, image)
  assert png.dtype == np.uint8 and png.shape == (48, 64, 3)


def test_exif_orientation_is_applied():
  image = _test_image(40, 60)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  decoded = transforms.decode_image(_encode(image, "PNG", exif=exif.tobytes()))
  # Orientation 6 displays the stored image rotated 90 degrees clockwise = np.rot90(k=-1).
  np.testing.assert_array_equal(decoded, np.rot90(image, k=-1))
  # PyTorch's loaders keep the stored orientation; a spec with exif_transpose=False does the same.
  stored = transforms.decode_image(_encode(image, "PNG", exif=exif.tobytes()), exif_transpose=False)
  np.testing.assert_array_equal(stored, image)


def test_sixteen_bit_png_scales_full_range():
  values = np.linspace(0, 65535, 40 * 30).astype(np.uint16).reshape(30, 40)
  buffer = io.BytesIO()
  Image.fromarray(values).save(buffer, "PNG")
  decoded = transforms.decode_image(buffer.getvalue())
  expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  np.testing.assert_array_equal(decoded[..., 0], expected)
  assert (decoded[..., 0] == decoded[..., 2]).all() and decoded.max() == 255 and decoded.min() == 0


def test_transparency_is_composited_on_white():
  rgba = np.concatenate([_test_image(), np.random.default_rng(1).integers(0, 256, (48, 64, 1), dtype=np.uint8)], -1)
  decoded = transforms.decode_image(_encode(rgba, "PNG")).astype(np.float64)
  alpha = rgba[..., 3:].astype(np.float64) / 255
  expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
  assert np.abs(decoded - expected).max() <= 1.0


def test_cmyk_and_grayscale_become_rgb():
  image = _test_image()
  for mode in ("CMYK", "L"):
    buffer = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buffer, "JPEG")
    decoded = transforms.decode_image(buffer.getvalue())
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize("data, reason", [
    (None, "missing_image"),
    (b"", "empty_file"),
    (b"hello, I am text", "not_an_image"),
    (bad_corpus.png_header_claiming(40000, 40000), "too_many_pixels"),
    (_encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "image_too_small"),
])
def test_decode_failures_have_reasons(data, reason):
  with pytest.raises(BadRecord) as caught:
    transforms.decode_image(data)
  assert caught.value.reason == reason


def test_truncated_jpeg_is_reported_not_padded():
  data = _encode(_test_image(64, 64), "JPEG")
  with pytest.raises(BadRecord) as caught:
    transforms.decode_image(data[: len(data) // 2])
  assert caught.value.reason == "truncated_image"
  with pytest.raises(BadRecord) as caught:
    transforms.decode_image(data[:100])
  assert caught.value.reason == "corrupt_image"


def test_pixel_limit_is_configurable():
  data = _encode(_test_image(48, 64), "PNG")
  with pytest.raises(BadRecord, match="too_many_pixels"):
    transforms.decode_image(data, max_pixels=48 * 64 - 1)
  assert transforms.decode_image(data, max_pixels=48 * 64).shape == (48, 64, 3)


# ---------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------

def test_eval_pixels_centre_crop_without_resizing_when_short_side_fits():
  image = _test_image(32, 64)
  spec = transforms.preset("openclip", image_size=32)
  np.testing.assert_array_equal(transforms.eval_pixels(image, spec), image[:, 16:48])
  # 35 - 32 = 3 columns to lose: torchvision puts round(1.5) = 2 on the left, HF floor(1.5) = 1.
  narrow = _test_image(32, 35)
  np.testing.assert_array_equal(transforms.eval_pixels(narrow, spec), narrow[:, 2:34])
  hf = transforms.preset("hf-clip", image_size=32)
  np.testing.assert_array_equal(transforms.eval_pixels(narrow, hf), narrow[:, 1:33])
  square = transforms.PreprocessSpec("sq", 20, 20, transforms.CLIP_MEAN, transforms.CLIP_STD,
                                     resize="square")
  assert transforms.eval_pixels(image, square).shape == (20, 20, 3)


def test_eval_view_resizes_the_shorter_side_then_normalises_with_the_spec():
  image = _test_image(40, 100, seed=3)
  spec = transforms.preset("dino-eval", image_size=28)  # resize to int(28 * 256 / 224) = 32 first
  assert spec.resize_size == 32 and spec.interpolation == "bicubic"
  resized = Image.fromarray(image).resize((80, 32), Image.BICUBIC)  # int(32 * 100 / 40) = 80
  crop = np.asarray(resized)[2:30, 26:54]  # round((32 - 28) / 2) = 2, round((80 - 28) / 2) = 26
  expected = (crop / 255.0 - np.array(transforms.IMAGENET_MEAN)) / np.array(transforms.IMAGENET_STD)
  np.testing.assert_allclose(transforms.eval_view(image, spec), expected, atol=1e-5)


def test_preprocess_spec_round_trips_and_names_bad_values():
  for name in transforms.PRESETS:
    spec = transforms.preset(name, 64, pooling="last4")
    assert transforms.PreprocessSpec.from_dict(spec.to_dict()) == spec
  with pytest.raises(ValueError, match="unknown preprocessing 'clip'; choose one of openclip"):
    transforms.preset("clip")
  data = transforms.preset("openclip").to_dict()
  with pytest.raises(ValueError, match=r"m/config.json: preprocess spec 'openclip': interpolation='nearest'"):
    transforms.PreprocessSpec.from_dict({**data, "interpolation": "nearest"}, "m/config.json")
  with pytest.raises(ValueError, match=r"unknown keys \['size'\] and lacks \['image_size'\]"):
    transforms.PreprocessSpec.from_dict({**{k: v for k, v in data.items() if k != "image_size"},
                                         "size": 3})
  with pytest.raises(ValueError, match="resize_size=200"):
    transforms.PreprocessSpec.from_dict({**data, "resize_size": 200})


def test_normalise_matches_closed_form():
  image = _test_image(4, 5)
  for name, (mean, std) in transforms.NORMALISATIONS.items():
    expected = (image / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(transforms.normalise(image, name), expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown normalisation 'nope'"):
    transforms.normalise(image, "nope")


def test_resized_crop_boxes_respect_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    top, left, h, w = transforms.sample_resized_crop(rng, 60, 90, (0.05, 0.4))
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
    # Rounding of the side lengths moves area and ratio a little beyond the drawn values.
    assert 0.05 * 0.8 <= h * w / (60 * 90) <= 0.4 * 1.2
    assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15


def test_resized_crop_falls_back_to_centre_crop():
  # A 10 x 200 strip cannot hold a 3:4..4:3 box of 90-100 % area: torchvision's fallback.
  box = transforms.sample_resized_crop(np.random.default_rng(0), 10, 200, (0.9, 1.0))
  assert box == (0, (200 - round(10 * 4 / 3)) // 2, 10, round(10 * 4 / 3))


def test_clip_train_view_shape_and_determinism():
  image = _test_image(50, 70)
  a = transforms.clip_train_view(image, np.random.default_rng(5), transforms.ClipViewConfig(size=32))
  b = transforms.clip_train_view(image, np.random.default_rng(5), transforms.ClipViewConfig(size=32))
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------
# The operations of one crop, each against its closed form
# ---------------------------------------------------------------------------------------------------

def _plan(**changes) -> transforms.CropPlan:
  base = dict(box=(0, 0, 32, 32), size=32, flip=False, jitter=None, grayscale=False, blur_radius=None, solarize=False)
  return transforms.CropPlan(**{**base, **changes})


def test_identity_plan_returns_the_crop():
  image = _test_image(32, 32)
  np.testing.assert_array_equal(transforms.apply_crop_plan(Image.fromarray(image), _plan()), image)


def test_flip_grayscale_solarize_brightness_closed_forms():
  image = _test_image(32, 32)
  pil = Image.fromarray(image)
  np.testing.assert_array_equal(transforms.apply_crop_plan(pil, _plan(flip=True)), image[:, ::-1])
  gray = transforms.apply_crop_plan(pil, _plan(grayscale=True)).astype(np.float64)
  luma = image @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, PIL's "L"
  assert np.abs(gray[..., 0] - luma).max() <= 1.0 and (gray[..., 0] == gray[..., 2]).all()
  solar = transforms.apply_crop_plan(pil, _plan(solarize=True))
  np.testing.assert_array_equal(solar, np.where(image >= 128, 255 - image, image))
  bright = transforms.apply_crop_plan(pil, _plan(jitter=(("brightness", 1.3),))).astype(np.float64)
  assert np.abs(bright - np.clip(image * 1.3, 0, 255)).max() <= 1.0
  unchanged_hue = transforms.apply_crop_plan(pil, _plan(jitter=(("hue", 0.0),))).astype(np.float64)
  assert np.abs(unchanged_hue - image).mean() < 2.0  # only the HSV round trip's rounding


def test_blur_smooths_and_keeps_the_mean():
  image = _test_image(32, 32)
  blurred = transforms.apply_crop_plan(Image.fromarray(image), _plan(blur_radius=2.0)).astype(np.float64)
  assert abs(blurred.mean() - image.mean()) < 3.0
  assert np.diff(blurred, axis=1).std() < 0.5 * np.diff(image.astype(np.float64), axis=1).std()


# ---------------------------------------------------------------------------------------------------
# The multi-crop recipe
# ---------------------------------------------------------------------------------------------------

def test_multicrop_shapes_and_plans_match_output():
  config = MultiCropConfig(global_size=32, local_size=16, num_local=3)
  image = _test_image(40, 56)
  global_crops, local_crops = transforms.dino_multicrop(image, np.random.default_rng(3), config)
  assert global_crops.shape == (2, 32, 32, 3) and local_crops.shape == (3, 16, 16, 3)
  assert global_crops.dtype == local_crops.dtype == np.uint8
  global_plans, local_plans = transforms.sample_multicrop_plans(np.random.default_rng(3), 40, 56, config)
  pil = Image.fromarray(image)
  for crops, plans in ((global_crops, global_plans), (local_crops, local_plans)):
    for crop, plan in zip(crops, plans):
      np.testing.assert_array_equal(crop, transforms.apply_crop_plan(pil, plan))


def _within(observed: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
  return abs(observed - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p)) + 1e-9


def test_multicrop_recipe_frequencies():
  """20,000 draws of the DINO recipe's parameters: every probability within 5 binomial sigmas."""
  config = MultiCropConfig()
  rng = np.random.default_rng(0)
  draws = 20_000
  plans = [transforms.sample_multicrop_plans(rng, 144, 192, config) for _ in range(draws // 10)]
  global_1 = [g[0] for g, _ in plans]
  global_2 = [g[1] for g, _ in plans]
  local = [p for _, ls in plans for p in ls]
  every = global_1 + global_2 + local
  n = len(every)
  assert _within(sum(p.flip for p in every), n, 0.5)
  assert _within(sum(p.jitter is not None for p in every), n, 0.8)
  assert _within(sum(p.grayscale for p in every), n, 0.2)
  assert all(p.blur_radius is not None for p in global_1)
  assert _within(sum(p.blur_radius is not None for p in global_2), len(global_2), 0.1)
  assert _within(sum(p.blur_radius is not None for p in local), len(local), 0.5)
  assert _within(sum(p.solarize for p in global_2), len(global_2), 0.2)
  assert not any(p.solarize for p in global_1 + local)
  radii = np.array([p.blur_radius for p in every if p.blur_radius is not None])
  assert 0.1 <= radii.min() and radii.max() <= 2.0 and abs(radii.mean() - 1.05) < 0.02
  jitters = [dict(p.jitter) for p in every if p.jitter is not None]
  for name, low, high in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1)):
    values = np.array([j[name] for j in jitters])
    assert low <= values.min() and values.max() <= high and abs(values.mean() - (low + high) / 2) < 0.01
  # The four jitter ops run in a uniformly random order: each op leads about a quarter of the time.
  leaders = [p.jitter[0][0] for p in every if p.jitter is not None]
  for name in ("brightness", "contrast", "saturation", "hue"):
    assert _within(leaders.count(name), len(leaders), 0.25)
  areas = {"global": [p.box[2] * p.box[3] / (144 * 192) for p in global_1 + global_2],
           "local": [p.box[2] * p.box[3] / (144 * 192) for p in local]}
  assert 0.4 * 0.95 <= min(areas["global"]) and max(areas["global"]) <= 1.0
  assert 0.05 * 0.9 <= min(areas["local"]) and max(areas["local"]) <= 0.4 * 1.1
  assert {p.size for p in global_1 + global_2} == {224} and {p.size for p in local} == {96}
  assert len(local) == 8 * len(global_1)


def test_multicrop_config_validation():
  with pytest.raises(ValueError, match="grayscale_p"):
    MultiCropConfig(grayscale_p=1.5)
  with pytest.raises(ValueError, match="num_local"):
    MultiCropConfig(num_local=-1)

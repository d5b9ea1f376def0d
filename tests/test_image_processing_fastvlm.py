"""FastVLMImageProcessor: Apple's pad-to-square path, transformers' crop path, input types, errors, save/load."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm_hf.image_processing_fastvlm import FastVLMImageProcessor

try:  # transformers >= 5.4: the PIL backend has its own class
    from transformers import CLIPImageProcessorPil as PilCLIPImageProcessor
except ImportError:  # up to 5.3 the plain class is the PIL one
    from transformers import CLIPImageProcessor as PilCLIPImageProcessor

SIZE = 128


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def clip_oracle(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """transformers' CLIP preprocessing as Apple configures it: shortest edge, centre crop, /255, mean 0, std 1."""
    clip = PilCLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
    )
    return clip(image, return_tensors="np")["pixel_values"]


def padded_square(image: Image.Image, fill=(0, 0, 0)) -> Image.Image:
    """Apple's expand2square written out: centre the image on a square of the mean colour."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def pad_oracle(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """Apple's `process_images` without transformers: pad to a black square, PIL bicubic resize, divide by 255."""
    resized = padded_square(image.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float64) / 255
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def pad_processor():
    return FastVLMImageProcessor(size=SIZE)


@pytest.fixture(scope="module")
def crop_processor():
    return FastVLMImageProcessor(size=SIZE, image_mode="crop")


def pixels(processor, images, **kwargs) -> np.ndarray:
    return processor(images, **kwargs)["pixel_values"]


# ---------------------------------------------------------------------------------------------------------- pad mode


@pytest.mark.parametrize("width, height", [(150, 90), (77, 200), (300, 300), (40, 30)])
def test_pad_mode_matches_apple_reference_bit_for_bit(pad_processor, width, height):
    image = random_rgb(width, height)
    np.testing.assert_array_equal(pixels(pad_processor, image), pad_oracle(image))


def test_pad_mode_matches_clip_processor_on_padded_square(pad_processor):
    # Apple's exact path: expand2square, then the CLIP image processor (whose crop is a no-op on a square)
    image = random_rgb(173, 97, seed=1)
    np.testing.assert_array_equal(pixels(pad_processor, image), clip_oracle(padded_square(image)))


def test_pad_bands_of_non_square_image_are_exactly_black(pad_processor):
    white = Image.new("RGB", (SIZE, SIZE // 2), (255, 255, 255))  # no resampling: the canvas is already SIZE wide
    out = pixels(pad_processor, white)[0]
    quarter = SIZE // 4
    assert (out[:, :quarter] == 0).all() and (out[:, -quarter:] == 0).all()
    assert (out[:, quarter:-quarter] == 1).all()


def test_pad_bands_stay_black_after_resizing(pad_processor):
    white = Image.new("RGB", (200, 100), (255, 255, 255))  # content lands on rows 32..96 of 128
    out = pixels(pad_processor, white)[0]
    assert (out[:, :28] == 0).all() and (out[:, 100:] == 0).all()
    assert (out[:, 36:92] == 1).all()


def test_pad_colour_follows_image_mean():
    processor = FastVLMImageProcessor(size=SIZE, image_mean=[0.5, 0.25, 0.0])
    out = pixels(processor, Image.new("RGB", (SIZE, SIZE // 2), (255, 255, 255)))[0]
    expected = np.array([127, 63, 0], dtype=np.float64) / 255  # int(mean * 255), then rescaled
    np.testing.assert_array_equal(out[:, 0, 0], expected.astype(np.float32))


def test_pad_and_crop_differ_on_non_square_and_agree_on_square(pad_processor, crop_processor):
    wide = random_rgb(200, 100, seed=2)
    assert not np.array_equal(pixels(pad_processor, wide), pixels(crop_processor, wide))
    square = random_rgb(200, 200, seed=3)
    np.testing.assert_array_equal(pixels(pad_processor, square), pixels(crop_processor, square))


# --------------------------------------------------------------------------------------------------------- crop mode


@pytest.mark.parametrize("width, height", [(150, 90), (77, 201), (128, 128), (40, 30)])
def test_crop_mode_matches_transformers_clip_processor(crop_processor, width, height):
    image = random_rgb(width, height, seed=4)
    np.testing.assert_array_equal(pixels(crop_processor, image), clip_oracle(image))


def test_non_square_size_gives_that_shape():
    image = random_rgb(90, 150)
    for mode in ("pad", "crop"):
        processor = FastVLMImageProcessor(size={"height": 64, "width": 192}, image_mode=mode)
        assert pixels(processor, image).shape == (1, 3, 64, 192)


# --------------------------------------------------------------------------------------------------- input variety


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK"])
def test_pil_modes_are_converted_like_pil_convert_rgb(pad_processor, mode):
    image = random_rgb(100, 60, seed=5).convert(mode)
    np.testing.assert_array_equal(pixels(pad_processor, image), pad_oracle(image.convert("RGB")))


def test_rgba_alpha_is_dropped_not_composited(pad_processor):
    rgb = np.random.default_rng(6).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    transparent = Image.fromarray(np.dstack([rgb, np.zeros((60, 100), np.uint8)]))
    assert transparent.mode == "RGBA"
    np.testing.assert_array_equal(pixels(pad_processor, transparent), pad_oracle(Image.fromarray(rgb)))


def test_16_bit_greyscale_is_scaled_to_8_bit(pad_processor):
    grey = np.random.default_rng(7).integers(0, 256, (60, 100), dtype=np.uint8)
    sixteen_bit = Image.fromarray(grey.astype(np.uint16) * 257)  # 0..255 -> 0..65535
    assert sixteen_bit.mode == "I;16"
    np.testing.assert_array_equal(pixels(pad_processor, sixteen_bit), pad_oracle(Image.fromarray(grey)))


def test_numpy_and_torch_inputs_match_pil(pad_processor):
    hwc = np.random.default_rng(8).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    expected = pad_oracle(Image.fromarray(hwc))
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    inputs = {
        "numpy HWC uint8": hwc,
        "numpy CHW uint8": chw,
        "numpy HWC float": hwc.astype(np.float32) / 255,
        "torch CHW uint8": torch.from_numpy(chw),
        "torch CHW float": torch.from_numpy(chw).float() / 255,
        "torch CHW int64": torch.from_numpy(chw).long(),
    }
    for name, image in inputs.items():
        np.testing.assert_array_equal(pixels(pad_processor, image), expected, err_msg=name)


def test_greyscale_array_matches_pil_l(pad_processor):
    grey = np.random.default_rng(9).integers(0, 256, (60, 100), dtype=np.uint8)
    expected = pad_oracle(Image.fromarray(grey))
    np.testing.assert_array_equal(pixels(pad_processor, grey), expected)
    np.testing.assert_array_equal(pixels(pad_processor, grey[..., None]), expected)


def test_batches_and_nested_lists_are_flattened_in_order(pad_processor):
    images = [random_rgb(100, 60, seed=s) for s in range(3)]
    expected = np.concatenate([pad_oracle(image) for image in images])
    np.testing.assert_array_equal(pixels(pad_processor, [[images[0], images[1]], [], [images[2]]]), expected)
    np.testing.assert_array_equal(pixels(pad_processor, images), expected)
    batch = np.stack([np.asarray(image) for image in images])  # (3, H, W, C)
    np.testing.assert_array_equal(pixels(pad_processor, batch), expected)


def test_return_tensors(pad_processor):
    image = random_rgb(100, 60)
    as_torch = pixels(pad_processor, [image, image], return_tensors="pt")
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
    assert as_torch.shape == (2, 3, SIZE, SIZE)
    for return_tensors in (None, "np"):
        as_numpy = pixels(pad_processor, image, return_tensors=return_tensors)
        assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
        np.testing.assert_array_equal(as_numpy, as_torch[:1].numpy())


def test_per_call_overrides(pad_processor, crop_processor):
    image = random_rgb(150, 90)
    np.testing.assert_array_equal(pixels(pad_processor, image, image_mode="crop"), pixels(crop_processor, image))
    assert pixels(pad_processor, image, size=64).shape == (1, 3, 64, 64)
    square = random_rgb(90, 90)  # no padding, whose colour follows the mean
    normalized = pixels(pad_processor, square, do_normalize=True, image_mean=0.5, image_std=0.5)
    np.testing.assert_allclose(normalized, (pad_oracle(square) - 0.5) / 0.5, atol=1e-6)
    assert pixels(pad_processor, image, do_rescale=False).max() > 1


# -------------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("size", [100, {"height": 128, "width": 96}])
def test_size_not_a_multiple_of_patch_size_is_rejected(size):
    with pytest.raises(ValueError, match="multiple of `patch_size`=64"):
        FastVLMImageProcessor(size=size)
    with pytest.raises(ValueError, match="multiple of `patch_size`=64"):
        FastVLMImageProcessor(size=SIZE)(random_rgb(10, 10), size=size)


def test_unknown_image_mode_is_rejected():
    with pytest.raises(ValueError, match="'pad'.*'crop'.*got 'stretch'"):
        FastVLMImageProcessor(image_mode="stretch")


def test_file_paths_are_read(pad_processor, tmp_path):
    image = random_rgb(40, 30)
    image.save(tmp_path / "picture.png")
    from_path = pad_processor(str(tmp_path / "picture.png"), return_tensors="np")["pixel_values"]
    from_pathlib = pad_processor(tmp_path / "picture.png", return_tensors="np")["pixel_values"]
    assert np.array_equal(from_path, pad_processor(image, return_tensors="np")["pixel_values"])
    assert np.array_equal(from_pathlib, from_path)


def test_a_16_bit_file_is_read_like_the_opened_image(pad_processor, tmp_path):
    grey = np.random.default_rng(9).integers(0, 256, (30, 50), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "depth.png")
    np.testing.assert_array_equal(pixels(pad_processor, str(tmp_path / "depth.png")), pad_oracle(Image.fromarray(grey)))


def test_unreadable_files_name_the_file(pad_processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="Cannot read the image .*broken.png"):
        pad_processor(str(tmp_path / "broken.png"))
    with pytest.raises(ValueError, match="Cannot read the image .*missing.png"):
        pad_processor(str(tmp_path / "missing.png"))


@pytest.mark.parametrize(
    "bad, type_name",
    [
        (None, "NoneType"),
        (b"\x89PNG", "bytes"),
        ({"image": 1}, "dict"),
        ([random_rgb(8, 8), 3], "int"),
    ],
)
def test_unsupported_input_types_name_the_type(pad_processor, bad, type_name):
    with pytest.raises(TypeError, match=f"got {type_name}"):
        pad_processor(bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((8, 8, 3), 2.0, np.float32), r"Float images must hold values in \[0, 1\]"),
        (np.full((8, 8, 3), 300, np.int32), r"Integer images must hold values in \[0, 255\]"),
        (np.zeros((8, 8, 5), np.uint8), "Cannot find the channel axis"),
        (np.zeros((2, 2, 8, 8, 3), np.uint8), "Expected an image of shape"),
        ([], "No images"),
    ],
)
def test_unusable_arrays_are_rejected(pad_processor, bad, message):
    with pytest.raises(ValueError, match=message):
        pad_processor(bad)


def test_an_rgba_array_is_converted_as_the_same_pil_image_is(pad_processor):
    rgba = np.random.default_rng(0).integers(0, 256, (90, 150, 4), dtype=np.uint8)
    from_array = pad_processor(rgba, return_tensors="np")["pixel_values"]
    from_pil = pad_processor(Image.fromarray(rgba, mode="RGBA"), return_tensors="np")["pixel_values"]
    assert from_array.shape == (1, 3, 128, 128)
    np.testing.assert_array_equal(from_array, from_pil)


@pytest.mark.parametrize(
    "mode, colour, channels", [("RGBA", (10, 20, 30, 255), 4), ("LA", (10, 255), 2), ("L", 77, 1), ("RGB", (1, 2, 3), 3)]
)
def test_without_conversion_an_image_keeps_its_channels(pad_processor, mode, colour, channels):
    # square, uniform and opaque: resizing keeps every value (PIL resizes RGBA and LA with premultiplied alpha)
    square = Image.new(mode, (64, 64), colour)
    values = pad_processor(
        square, do_convert_rgb=False, image_mean=[0.0] * channels, image_std=[1.0] * channels, return_tensors="np"
    )["pixel_values"]
    expected = np.asarray(colour if channels > 1 else (colour,), dtype=np.float64) / 255
    assert values.shape == (1, channels, 128, 128)
    np.testing.assert_allclose(values[0, :, 5, 7], expected, rtol=1e-6)


def test_without_conversion_mean_and_std_need_one_value_per_channel(pad_processor):
    with pytest.raises(ValueError, match=r"`image_mean` must be one float or one per image channel \(4 here\)"):
        pad_processor(Image.new("RGBA", (8, 8)), do_convert_rgb=False, do_normalize=True)


@pytest.mark.parametrize("mode", ["P", "CMYK", "I;16"])
def test_without_conversion_other_modes_are_rejected(pad_processor, mode):
    with pytest.raises(ValueError, match=f"mode '{re.escape(mode)}' with `do_convert_rgb=False`"):
        pad_processor(Image.new(mode, (8, 8)), do_convert_rgb=False)


# ----------------------------------------------------------------------------------------------------- save and load


def test_save_load_round_trip(tmp_path):
    processor = FastVLMImageProcessor(
        size={"height": 128, "width": 192},
        image_mode="crop",
        resample=Image.Resampling.BILINEAR,
        do_normalize=True,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.3, 0.4],
    )
    processor.save_pretrained(tmp_path)
    loaded = FastVLMImageProcessor.from_pretrained(tmp_path)

    assert loaded.to_dict() == processor.to_dict()
    assert (loaded.size, loaded.image_mode, loaded.resample) == ({"height": 128, "width": 192}, "crop", 2)
    image = random_rgb(150, 90)
    np.testing.assert_array_equal(pixels(loaded, image), pixels(processor, image))
    assert FastVLMImageProcessor.from_pretrained(tmp_path, image_mode="pad").image_mode == "pad"

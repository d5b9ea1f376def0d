"""Opening image files: one line naming the image and what is wrong with it, the same from the command line (which
adds URLs) and from fine-tuning rows (which add PIL images and undecoded `datasets.Image` entries)."""

import io

import numpy as np
import pytest
from PIL import Image

from fastvlm_hf.cli.loading import load_image as load_for_the_command
from fastvlm_hf.cli.messages import CLIError
from fastvlm_hf.image_loading import ImageLoadError, load_image
from fastvlm_hf.training import RowError
from fastvlm_hf.training import load_image as load_for_a_row

PIXELS = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_files(folder):
    """(path, the message every loader gives for it) of each kind of file that does not open."""
    (folder / "notes.png").write_text("this is not a png")
    (folder / "truncated.png").write_bytes(png_bytes()[:-40])
    return [
        (folder / "missing.png", f"image not found: {folder / 'missing.png'}"),
        (folder, f"expected an image file, got a directory: {folder}"),
        (folder / "notes.png", f"not an image file Pillow can read: {folder / 'notes.png'}"),
        (folder / "truncated.png", f"cannot read image {folder / 'truncated.png'}: "),
    ]


@pytest.mark.parametrize(
    "load, error_type",
    [(load_image, ImageLoadError), (load_for_the_command, CLIError), (load_for_a_row, RowError)],
    ids=["loader", "command", "row"],
)
def test_a_file_that_does_not_open_is_one_line_naming_it(tmp_path, load, error_type):
    for path, message in bad_files(tmp_path):
        with pytest.raises(error_type) as raised:
            load(str(path))
        assert str(raised.value).startswith(message), str(raised.value)
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("load", [load_image, load_for_the_command, load_for_a_row], ids=["loader", "command", "row"])
def test_an_image_file_is_decoded_as_it_is(tmp_path, load):
    (tmp_path / "picture.png").write_bytes(png_bytes())
    image = load(str(tmp_path / "picture.png"))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), PIXELS)


def test_the_loader_decodes_now_and_leaves_no_file_open(tmp_path):
    (tmp_path / "picture.png").write_bytes(png_bytes())
    image = load_image(tmp_path / "picture.png")  # a path-like object too
    (tmp_path / "picture.png").unlink()  # the pixels are in memory already
    assert np.array_equal(np.asarray(image), PIXELS)
    assert getattr(image, "fp", None) is None


def test_image_bytes_are_named_by_the_name_given(tmp_path):
    assert np.array_equal(np.asarray(load_image(png_bytes())), PIXELS)
    with pytest.raises(ImageLoadError, match="^not an image file Pillow can read: image bytes$"):
        load_image(b"not an image")
    with pytest.raises(ImageLoadError, match="^not an image file Pillow can read: photo.png$"):
        load_image(b"not an image", "photo.png")
    with pytest.raises(RowError, match="^not an image file Pillow can read: photo.png$"):
        load_for_a_row({"bytes": b"not an image", "path": "photo.png"})


def test_the_error_is_a_value_error_that_keeps_its_cause(tmp_path):
    with pytest.raises(ValueError) as raised:
        load_image(tmp_path / "missing.png")
    assert isinstance(raised.value, ImageLoadError) and isinstance(raised.value.__cause__, FileNotFoundError)


def test_a_decompression_bomb_is_left_to_the_caller(tmp_path, monkeypatch):
    Image.fromarray(PIXELS).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice this many pixels
    with pytest.raises(Image.DecompressionBombError):
        load_image(tmp_path / "huge.png")
    with pytest.raises(CLIError, match="too large to open safely"):
        load_for_the_command(str(tmp_path / "huge.png"))

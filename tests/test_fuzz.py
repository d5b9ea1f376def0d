"""Random inputs: the image processor, the processor and the command line's parser give a correct result or one of
their documented errors, never another exception."""

import contextlib
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fastvlm_hf import FastVLMImageProcessor, FastVLMProcessor
from fastvlm_hf.cli import build_parser

SIZE = 128
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PIL_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]
# Ours are ValueError (what is wrong with a value) and TypeError (an input of the wrong kind).
DOCUMENTED_ERRORS = (ValueError, TypeError)

sides = st.integers(min_value=1, max_value=4096)


@st.composite
def flat_sizes(draw):
    """Sizes from 1×1 to 4096×64 and back, at most 2**18 pixels, so that an example stays fast."""
    width = draw(sides)
    height = draw(st.integers(min_value=1, max_value=min(4096, 2**18 // width)))
    return (width, height) if draw(st.booleans()) else (height, width)


@st.composite
def pil_images(draw):
    width, height = draw(flat_sizes())
    return Image.new(draw(st.sampled_from(PIL_MODES)), (width, height))


@st.composite
def arrays(draw):
    width, height = draw(flat_sizes())
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, bool]))
    shape = (height, width) if channels is None else (height, width, channels)
    if draw(st.booleans()) and channels is not None:
        shape = (channels, height, width)
    scale = draw(st.sampled_from([1, 255, 1000, -1]))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).random(shape) * scale
    return values.astype(dtype)


@FUZZ
@given(image=st.one_of(pil_images(), arrays()), mode=st.sampled_from(["pad", "crop"]))
def test_the_image_processor_gives_a_square_rgb_image_or_a_documented_error(image, mode):
    processor = FastVLMImageProcessor(size=SIZE, image_mode=mode)
    try:
        pixels = processor(image, return_tensors="np")["pixel_values"]
    except DOCUMENTED_ERRORS as error:
        assert str(error)  # a message that says what was wrong
        return
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return FastVLMProcessor(image_processor=FastVLMImageProcessor(size=SIZE), tokenizer=tiny_tokenizer)


words = st.sampled_from(["Describe", "the", "image", "<image>", "\n", "cat", "?", "<|im_start|>", " "])


@FUZZ
@given(parts=st.lists(words, max_size=12), num_images=st.integers(0, 3))
def test_the_processor_expands_each_placeholder_or_says_how_they_disagree(processor, parts, num_images):
    text = "".join(parts)
    images = [Image.new("RGB", (40 + 10 * index, 30)) for index in range(num_images)]
    try:
        inputs = processor(images=images or None, text=text)
    except ValueError as error:
        assert text.count("<image>") != num_images and "placeholder" in str(error)
        return
    assert text.count("<image>") == num_images
    assert inputs["input_ids"][0].count(processor.image_token_id) == num_images * (SIZE // 64) ** 2
    if num_images:
        assert inputs["pixel_values"].shape == (num_images, 3, SIZE, SIZE)


arguments = st.sampled_from(
    ["predict", "chat", "bench", "convert", "--image", "x.png", "--prompt", "hi", "--model", "m", "--device", "cuda",
     "--dtype", "float16", "--load-in-4bit", "--load-in-8bit", "--resolution", "100", "-1", "0", "--num-beams", "2",
     "--temperature", "nan", "--top-p", "2", "--json", "--stats", "--to", "apple", "--max-shard-size", "lots", "a",
     "b", "--help", "--version", "--", "--max-new-tokens", "--repeats", "--image-mode", "crop"]
)  # fmt: skip


@FUZZ
@given(argv=st.lists(arguments, max_size=8))
def test_the_parser_accepts_or_exits_with_a_usage_error_never_a_traceback(argv):
    parser = build_parser()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as exit:
            assert exit.code in (0, 2)

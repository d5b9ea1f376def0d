"""FastVLMProcessor: image-token expansion, placeholder and truncation checks, the chat template, save/load."""

import typing

import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm_hf.image_processing_fastvlm import FastVLMImageProcessor, FastVLMImageProcessorKwargs
from fastvlm_hf.processing_fastvlm import FastVLMProcessor, FastVLMProcessorKwargs

SIZE = 128
TOKENS_PER_IMAGE = (SIZE // 64) ** 2
IMAGE_TOKEN_ID = 3  # `<image>` in the tiny tokenizer
PAD_TOKEN_ID = 0
REFERENCE_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return FastVLMProcessor(image_processor=FastVLMImageProcessor(size=SIZE), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))


def user_message(*parts):
    return [{"role": "user", "content": list(parts)}]


def expanded_ids(tokenizer, prompt: str, tokens_per_image: int = TOKENS_PER_IMAGE) -> list[int]:
    """What the processor should produce, computed with the tokenizer alone."""
    return tokenizer(prompt.replace("<image>", "<image>" * tokens_per_image))["input_ids"]


# ------------------------------------------------------------------------------------------------- image tokens


def test_image_token_id_and_count(processor):
    assert processor.image_token_id == IMAGE_TOKEN_ID
    assert processor.num_image_tokens(1024, 1024) == 256
    assert processor.num_image_tokens(128, 192) == 6


def test_call_expands_each_placeholder(processor, tiny_tokenizer, image):
    text = "<image>\nDescribe the image."
    out = processor(images=image, text=text, return_tensors="pt")

    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["input_ids"][0].tolist() == expanded_ids(tiny_tokenizer, text)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == TOKENS_PER_IMAGE
    assert out["pixel_values"].shape == (1, 3, SIZE, SIZE)
    np.testing.assert_array_equal(out["pixel_values"].numpy(), processor.image_processor(image)["pixel_values"])


@pytest.mark.parametrize("size, expected_tokens", [(512, 64), (1536, 576)])
def test_image_tokens_follow_the_processed_size(tiny_tokenizer, size, expected_tokens):
    processor = FastVLMProcessor(image_processor=FastVLMImageProcessor(size=size), tokenizer=tiny_tokenizer)
    out = processor(images=Image.new("RGB", (32, 24)), text="<image>\nDescribe the image.", return_tensors="pt")
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == expected_tokens
    assert out["pixel_values"].shape == (1, 3, size, size)


@pytest.mark.parametrize("size", [None, 192])
def test_the_number_of_tokens_an_image_costs_is_what_the_call_expands(processor, image, size):
    # What transformers and vLLM ask before they build inputs: one entry per image, whatever its original size.
    kwargs = {} if size is None else {"size": size}
    counts = processor._get_num_multimodal_tokens(image_sizes=[(60, 100), (1000, 30)], **kwargs)
    inputs = processor(images=[image], text="<image>", **kwargs)
    expected = inputs["input_ids"][0].count(IMAGE_TOKEN_ID)
    assert counts.num_image_tokens == [expected, expected] and counts.num_image_patches == [1, 1]
    assert expected == (TOKENS_PER_IMAGE if size is None else (192 // 64) ** 2)


def test_replacement_offsets_say_where_each_placeholder_went(processor, tiny_tokenizer, image):
    # What vLLM asks for to find each image's tokens in a prompt.
    texts = ["A <image> and <image>.", "No image.", "<image>"]
    out = processor(
        images=[[image, image], [], [image]], text=texts, padding=True, return_text_replacement_offsets=True,
        return_tensors="pt",
    )
    offsets = out["text_replacement_offsets"]
    assert [len(entries) for entries in offsets] == [2, 0, 1]
    replacement = "<image>" * TOKENS_PER_IMAGE
    for text, entries, ids in zip(texts, offsets, out["input_ids"].tolist()):
        expanded, end = "", 0
        for entry in entries:
            (start, stop), (new_start, new_stop) = entry["span"], entry["new_span"]
            assert (entry["type"], entry["text"], entry["replacement"]) == ("image", "<image>", replacement)
            assert text[start:stop] == "<image>"
            expanded += text[end:start] + replacement
            assert expanded[new_start:new_stop] == replacement
            end = stop
        expanded += text[end:]
        assert ids[: len(tiny_tokenizer(expanded)["input_ids"])] == tiny_tokenizer(expanded)["input_ids"]
    assert "text_replacement_offsets" not in processor(images=[image], text="<image>")


def test_replace_image_token_is_the_expansion_of_one_image(processor, image):
    image_inputs = processor.image_processor([image, image], size=192)
    assert processor.replace_image_token(image_inputs, 1) == "<image>" * 9


def test_the_kwargs_type_hints_resolve():
    # vLLM reads them to sort out which request options go to the processor.
    typing.get_type_hints(FastVLMProcessorKwargs)
    typing.get_type_hints(FastVLMImageProcessorKwargs)


@pytest.mark.parametrize("modality", ["videos", "audio", "audios"])
def test_only_images_and_text_are_taken(processor, image, modality):
    with pytest.raises(ValueError, match=f"FastVLM takes only images and text; got {modality}"):
        processor(images=[image], text="<image>", **{modality: [np.zeros((4, 3, 8, 8))]})
    with pytest.raises(ValueError, match=f"FastVLM takes only images and text; got {modality}"):
        processor(images=[[image], []], text=["<image>", "Hi"], **{modality: [[], [np.zeros((4, 3, 8, 8))]]})


@pytest.mark.parametrize("no_media", [None, [], [[], []]])
def test_empty_videos_and_audio_are_accepted(processor, image, no_media):
    """Generic callers (lmms-eval's chat models) pass empty media lists, or one empty list per text."""
    texts = ["<image>\nDescribe the image.", "Hello world!"]
    expected = processor(images=[[image], []], text=texts, padding=True, return_tensors="pt")
    out = processor(images=[[image], []], text=texts, padding=True, return_tensors="pt", videos=no_media,
                    audio=no_media, audios=no_media)  # fmt: skip
    assert out.keys() == expected.keys()
    for key in expected:
        assert torch.equal(out[key], expected[key])


def test_images_are_matched_to_their_texts(processor, tiny_tokenizer, image):
    texts = ["<image><image>\nCount the objects.", "<image>\nWhat is in this picture?"]
    out = processor(images=[[image, image], [image]], text=texts, padding=True, return_tensors="pt")
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist() == [2 * TOKENS_PER_IMAGE, TOKENS_PER_IMAGE]
    assert out["pixel_values"].shape[0] == 3


def test_text_only_call(processor, tiny_tokenizer):
    out = processor(text=["Hello world!", "The quick brown fox"], padding=True)
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert out["input_ids"][0][: len(tiny_tokenizer("Hello world!")["input_ids"])] == tiny_tokenizer("Hello world!")[
        "input_ids"
    ]


# ----------------------------------------------------------------------------------------- placeholder mismatches


@pytest.mark.parametrize(
    "num_images, text, message",
    [
        (2, "<image>\nDescribe the image.", "2 images but 1 `<image>` placeholder in the text"),
        (1, "<image><image>\nDescribe the image.", "1 image but 2 `<image>` placeholders in the text"),
        (1, "Describe the image.", "1 image but 0 `<image>` placeholders in the text"),
        (0, "<image>\nDescribe the image.", "0 images but 1 `<image>` placeholder in the text"),
    ],
)
def test_placeholder_count_must_match_images(processor, image, num_images, text, message):
    images = [image] * num_images if num_images else None
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


def test_placeholder_count_is_checked_per_text(processor, image):
    texts = ["<image>\nDescribe the image.", "<image>\nDescribe the image."]  # 2 placeholders for 2 images in all
    with pytest.raises(ValueError, match="Text 0 has 2 images but 1 `<image>` placeholder"):
        processor(images=[[image, image], []], text=texts)


def test_tokenizer_without_image_token_is_reported(image, tiny_tokenizer):
    processor = FastVLMProcessor(FastVLMImageProcessor(size=SIZE), tiny_tokenizer, image_token="<img>")
    with pytest.raises(ValueError, match="no '<img>' token"):
        processor(images=image, text="<img>\nDescribe the image.")


# ---------------------------------------------------------------------------------------------------- truncation


def test_truncation_through_image_tokens_raises(processor, tiny_tokenizer, image):
    text = "Describe the image.\n<image>"
    needed = len(expanded_ids(tiny_tokenizer, text))
    message = rf"need {TOKENS_PER_IMAGE} image tokens but 2 were kept.*max_length={needed}"
    with pytest.raises(ValueError, match=message):
        processor(images=image, text=text, truncation=True, max_length=needed - 2)


def test_truncation_that_keeps_image_tokens_works(processor, tiny_tokenizer, image):
    text = "<image>\nDescribe the image."
    full = expanded_ids(tiny_tokenizer, text)
    out = processor(images=image, text=text, truncation=True, max_length=len(full) - 3, return_tensors="pt")
    assert out["input_ids"][0].tolist() == full[:-3]
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == TOKENS_PER_IMAGE


# --------------------------------------------------------------------------------------------------- chat template


def test_chat_template_renders_apple_prompt(processor):
    messages = user_message({"type": "image"}, {"type": "text", "text": "Describe the image."})
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == REFERENCE_PROMPT


def test_chat_template_layout_of_images_texts_and_system(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Count."}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}, {"type": "text", "text": "Explain."}]},
    ]
    assert processor.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image><image>\nCount.<|im_end|>\n"
        "<|im_start|>assistant\nTwo.<|im_end|>\n"
        "<|im_start|>user\nWhy?\nExplain.<|im_end|>\n"
    )


def test_text_only_chat(processor, tiny_tokenizer):
    as_string = [{"role": "user", "content": "Hello world!"}]
    as_parts = user_message({"type": "text", "text": "Hello world!"})
    prompt = processor.apply_chat_template(as_string, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello world!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(as_parts, add_generation_prompt=True) == prompt
    # 4.57 tokenizes chats only with list contents
    out = processor.apply_chat_template(as_parts, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert out["input_ids"] == [tiny_tokenizer(prompt)["input_ids"]]


def test_apply_chat_template_with_image_in_message(processor, tiny_tokenizer, image):
    # what pipeline("image-text-to-text") calls
    messages = user_message({"type": "image", "image": image}, {"type": "text", "text": "Describe the image."})
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert out["input_ids"][0].tolist() == expanded_ids(tiny_tokenizer, REFERENCE_PROMPT)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == TOKENS_PER_IMAGE
    assert out["pixel_values"].shape == (1, 3, SIZE, SIZE) and out["pixel_values"].dtype == torch.float32


def test_batched_chats_with_left_padding(processor, tiny_tokenizer, image):
    with_image = user_message({"type": "image", "image": image}, {"type": "text", "text": "Describe the image."})
    text_only = user_message({"type": "text", "text": "Hello world!"})
    out = processor.apply_chat_template(
        [with_image, text_only],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    long_ids = expanded_ids(tiny_tokenizer, REFERENCE_PROMPT)
    short_ids = tiny_tokenizer(processor.apply_chat_template(text_only, add_generation_prompt=True))["input_ids"]
    num_pad = len(long_ids) - len(short_ids)

    assert out["input_ids"].shape == (2, len(long_ids))
    assert out["input_ids"][0].tolist() == long_ids
    assert out["input_ids"][1].tolist() == [PAD_TOKEN_ID] * num_pad + short_ids
    assert out["attention_mask"][1].tolist() == [0] * num_pad + [1] * len(short_ids)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist() == [TOKENS_PER_IMAGE, 0]
    assert out["pixel_values"].shape == (1, 3, SIZE, SIZE)


# ----------------------------------------------------------------------------------------------------- save and load


def test_save_load_round_trip(tmp_path, tiny_tokenizer, image):
    processor = FastVLMProcessor(
        image_processor=FastVLMImageProcessor(size=192, image_mode="crop"), tokenizer=tiny_tokenizer
    )
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()

    loaded = FastVLMProcessor.from_pretrained(tmp_path)

    assert isinstance(loaded.image_processor, FastVLMImageProcessor)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_token == "<image>"
    messages = user_message({"type": "image", "image": image}, {"type": "text", "text": "Describe the image."})
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    expected = processor.apply_chat_template(messages, **kwargs)
    actual = loaded.apply_chat_template(messages, **kwargs)
    assert torch.equal(actual["input_ids"], expected["input_ids"])
    assert torch.equal(actual["pixel_values"], expected["pixel_values"])
    assert (actual["input_ids"] == IMAGE_TOKEN_ID).sum() == 9


def test_custom_chat_template_is_saved_and_loaded(tmp_path, tiny_tokenizer):
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    processor = FastVLMProcessor(FastVLMImageProcessor(size=SIZE), tiny_tokenizer, chat_template=template)
    processor.save_pretrained(tmp_path)
    loaded = FastVLMProcessor.from_pretrained(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "Hi"}]) == "Hi"

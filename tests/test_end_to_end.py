"""The transformers entry points users call: Auto classes, the pipeline, chat templates, batched generation."""

import copy
import importlib

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, pipeline

import fastvlm_hf
from fastvlm_hf import FastVLMForConditionalGeneration, FastVLMImageProcessor, FastVLMProcessor


def picture(width=160, height=96, color=(200, 40, 40)):
    image = Image.new("RGB", (width, height), (240, 240, 240))
    image.paste(color, (width // 4, height // 4, width // 2, height // 2))
    return image


def chat(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint_dir):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32).eval()
    return model, processor


def test_auto_classes_resolve_to_fastvlm(loaded, tiny_checkpoint_dir):
    model, processor = loaded
    assert type(model) is FastVLMForConditionalGeneration
    assert type(processor) is FastVLMProcessor
    assert type(processor.image_processor) is FastVLMImageProcessor
    assert type(AutoImageProcessor.from_pretrained(tiny_checkpoint_dir)) is FastVLMImageProcessor
    assert processor.image_token_id == model.config.image_token_id


def test_importing_twice_is_harmless(tiny_checkpoint_dir):
    importlib.reload(fastvlm_hf)
    assert AutoConfig.from_pretrained(tiny_checkpoint_dir).model_type == "fastvlm"
    assert AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_dir).__class__.__name__ == "FastVLMForConditionalGeneration"


@torch.no_grad()
def test_chat_template_then_generate(loaded):
    model, processor = loaded
    inputs = processor.apply_chat_template(
        chat(picture(), "Describe the image."), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 4
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert isinstance(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True), str)


@torch.no_grad()
def test_pipeline_with_a_chat_message_holding_a_pil_image(tiny_checkpoint_dir, loaded):
    model, processor = loaded
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint_dir), dtype=torch.float32)
    assert type(pipe.model) is FastVLMForConditionalGeneration
    messages = chat(picture(), "Describe the image.")
    result = pipe(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False})
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant"

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply["content"] == expected


@torch.no_grad()
def test_batched_generation_with_left_padding_equals_one_by_one(loaded):
    model, processor = loaded
    conversations = [
        chat(picture(color=(10, 200, 10)), "Describe the image."),
        chat(picture(96, 160, color=(10, 10, 200)), "What is in this picture? Count the objects on the table."),
    ]
    batch = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        padding=True, padding_side="left",
    )
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for index, conversation in enumerate(conversations):
        single = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[index], alone[0])


@torch.no_grad()
def test_image_mode_changes_what_the_model_sees(loaded):
    model, processor = loaded
    image = picture(200, 64)
    prompt = processor.apply_chat_template(chat(image, "Describe the image."), add_generation_prompt=True, tokenize=False)
    padded = processor(images=[image], text=prompt, return_tensors="pt")
    cropped = processor(images=[image], text=prompt, return_tensors="pt", image_mode="crop")
    assert not torch.equal(padded["pixel_values"], cropped["pixel_values"])
    # The tiny checkpoint's initial weights all but erase the image (features differ by ~1e-11 between pictures);
    # weights drawn at a larger scale let it through.
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.model.vision_tower.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    assert not torch.allclose(model(**padded).logits, model(**cropped).logits, rtol=1e-3, atol=1e-4)


def test_auto_processor_takes_the_image_mode(tiny_checkpoint_dir):
    cropping = AutoProcessor.from_pretrained(tiny_checkpoint_dir, image_mode="crop")
    assert cropping.image_processor.image_mode == "crop"
    assert AutoProcessor.from_pretrained(tiny_checkpoint_dir).image_processor.image_mode == "pad"
    wide = picture(200, 64)
    cropped = cropping.image_processor(wide, return_tensors="pt")["pixel_values"]
    padded = AutoProcessor.from_pretrained(tiny_checkpoint_dir).image_processor(wide, return_tensors="pt")["pixel_values"]
    assert not torch.equal(cropped, padded)
    assert cropped[0, :, 0].abs().sum() > 0 and padded[0, :, 0].abs().sum() == 0  # no black band on top when cropped

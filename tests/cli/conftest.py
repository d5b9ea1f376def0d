"""The CLI tests' tiny checkpoint, with weights whose answers depend on the image and the prompt, its
reference model, and two images."""

import pytest
import torch
from helpers.tiny_model import save_decisive_checkpoint
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


@pytest.fixture(scope="session")
def checkpoint(tiny_config, tiny_processor, tmp_path_factory):
    """The tiny FastVLM with weights drawn large enough that its answers depend on the image and the prompt (the
    shared tiny model answers the same whitespace whatever it is shown, which no equality test could fail on)."""
    return save_decisive_checkpoint(tiny_config, tiny_processor, tmp_path_factory.mktemp("tiny-fastvlm-cli"))


@pytest.fixture(scope="session")
def reference(checkpoint):
    """The checkpoint's processor and model, loaded as a user of transformers would, with its weights packed as the CLI
    packs them on CPU: packed and plain float32 kernels round differently, which could flip a greedy token on a near
    tie, so the answers are compared between models that compute alike."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.pack_weights()
    return processor, model


def _save_image(path, background, square):
    image = Image.new("RGB", (180, 120), background)
    image.paste(square, (20, 20, 90, 90))
    image.save(path)
    return path


@pytest.fixture(scope="session")
def image_path(tmp_path_factory):
    return _save_image(tmp_path_factory.mktemp("images") / "scene.png", (250, 250, 250), (30, 160, 30))


@pytest.fixture(scope="session")
def other_image_path(tmp_path_factory):
    return _save_image(tmp_path_factory.mktemp("images") / "night.png", (0, 0, 0), (255, 255, 255))

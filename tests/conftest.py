"""Fixtures the tests share: the tiny tokenizer, config, model, processor and checkpoints, built with tests/helpers/;
first of all, the torchvision shim."""

import importlib.util
import os

# First of all, before anything imports torchvision: let PyPI's CUDA torchvision (pulled by the test extra's timm)
# import on the CPU torch wheel, here and in the tests' subprocesses. See torchvision_shim/sitecustomize.py.
_SHIM_DIR = os.path.join(os.path.dirname(__file__), "torchvision_shim")
_shim_spec = importlib.util.spec_from_file_location("_torchvision_shim", os.path.join(_SHIM_DIR, "sitecustomize.py"))
_torchvision_shim = importlib.util.module_from_spec(_shim_spec)
_shim_spec.loader.exec_module(_torchvision_shim)
if _torchvision_shim.APPLIED:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_SHIM_DIR, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402
from helpers.call_counts import count_calls  # noqa: E402
from helpers.tiny_model import TINY_VISION_CONFIG, tiny_text_config  # noqa: E402
from helpers.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from fastvlm_hf.testing import give_weights_a_working_scale, randomize_non_parameter_state  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def onednn_calls(monkeypatch):
    """The calls of torch's private oneDNN operators, the ones fastvlm_hf's CPU fast routes run, counted by name."""
    import torch

    return count_calls(monkeypatch, torch.ops.mkldnn, ["_convolution_pointwise", "_linear_pointwise"])


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    from fastvlm_hf import FastVLMConfig

    return FastVLMConfig(
        vision_config=TINY_VISION_CONFIG,
        text_config=tiny_text_config(len(tiny_tokenizer)),
        image_token_id=tiny_tokenizer.convert_tokens_to_ids("<image>"),
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    import torch
    from fastvlm_hf import FastVLMForConditionalGeneration

    torch.manual_seed(0)
    model = FastVLMForConditionalGeneration(tiny_config)
    randomize_non_parameter_state(model)
    give_weights_a_working_scale(model)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    from fastvlm_hf import FastVLMImageProcessor, FastVLMProcessor

    image_size = TINY_VISION_CONFIG["image_size"]
    return FastVLMProcessor(image_processor=FastVLMImageProcessor(size=image_size), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tiny_model, tiny_processor, tmp_path_factory):
    """A tiny FastVLM checkpoint in this package's layout, with its processor, as `save_pretrained` writes it."""
    path = tmp_path_factory.mktemp("tiny-fastvlm")
    tiny_model.save_pretrained(path)
    tiny_processor.save_pretrained(path)
    return path


# A random checkpoint in Apple's Hub layout (see helpers/checkpoints.py), shared by the checkpoint and conversion tests.
@pytest.fixture(scope="module")
def apple_tokenizer():
    from helpers.checkpoints import QWEN2_SPECIAL_TOKENS

    return build_tiny_tokenizer(special_tokens=QWEN2_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def reference_model(apple_tokenizer):
    from helpers.checkpoints import build_reference_model

    return build_reference_model(apple_tokenizer)


@pytest.fixture(scope="module")
def apple_dir(tmp_path_factory, reference_model, apple_tokenizer):
    from helpers.checkpoints import write_apple_checkpoint

    return write_apple_checkpoint(tmp_path_factory.mktemp("apple") / "FastVLM-tiny", reference_model, apple_tokenizer)

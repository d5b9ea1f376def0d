"""Shared offline fixtures: a tiny byte-level BPE tokenizer trained in-process."""

import collections
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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from fastvlm_hf.testing import give_weights_a_working_scale, randomize_non_parameter_state  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

_TRAINING_TEXT = [
    "You are a helpful assistant.",
    "Describe the image.",
    "What is in this picture? A cat sits on a red sofa next to a window.",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant",
    "There are two dogs playing in the park with a yellow ball.",
    "Count the objects. How many apples are on the table?",
    "Hello world! 0123456789 , . ; : ? ! ' \" ( ) [ ] { } - _ / \\ \n",
]


def build_tiny_tokenizer(vocab_size: int = 320, special_tokens: list[str] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_TRAINING_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


# A FastViTHD with the real topology (5 stages, stride 64, RepMixer ×3 + attention ×2) at toy widths.
TINY_VISION_CONFIG = {
    "depths": [1, 1, 1, 2, 1],
    "embed_dims": [8, 16, 32, 64, 128],
    "hidden_size": 256,
    "attention_head_dim": 16,
    "image_size": 128,
}


def tiny_text_config(vocab_size: int, tie_word_embeddings: bool = True) -> dict:
    return {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie_word_embeddings,
    }


def give_weights_decisive_answers(model, seed: int = 1) -> None:
    """Draw the weight matrices large enough that a tiny model's greedy answers depend on the image and the prompt
    (at initialisation scale it answers the same whitespace whatever it is shown, which no equality test could fail
    on): fan-in scale in the vision tower, unit scale elsewhere."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                std = parameter[0].numel() ** -0.5 if "vision_tower" in name else 1.0
                parameter.normal_(0, std, generator=generator)


def _needs_native_bfloat16():
    from fastvlm_hf.cpu import has_native_bfloat16

    return pytest.mark.skipif(
        not has_native_bfloat16(),
        reason="this CPU computes bfloat16 without native support (no AVX512-BF16, AMX or AVX-512 BW/VL/DQ), where "
        "the bfloat16 kernels under test do not run",
    )


needs_native_bfloat16 = _needs_native_bfloat16()


def assert_logits_close(actual, expected, tolerance: float = 1e-5) -> None:
    """Equal up to float32 rounding, relative to the largest logit: the same computation can round differently in
    another batch or after a reload (other kernels), far below what a misplaced image or weight changes."""
    assert actual.shape == expected.shape
    difference = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert difference <= tolerance, f"logits differ by {difference:.3g} of the largest"


def count_calls(monkeypatch, owner, names) -> collections.Counter:
    """Wraps each function `owner.<name>` of `names` so that its calls are counted, by name, in the returned Counter."""
    calls = collections.Counter()
    for name in names:

        def counted(*args, _name=name, _function=getattr(owner, name), **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


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


# A random checkpoint in Apple's Hub layout (see checkpoint_helpers.py), shared by the checkpoint and conversion tests.
@pytest.fixture(scope="module")
def apple_tokenizer():
    from checkpoint_helpers import QWEN2_SPECIAL_TOKENS

    return build_tiny_tokenizer(special_tokens=QWEN2_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def reference_model(apple_tokenizer):
    from checkpoint_helpers import build_reference_model

    return build_reference_model(apple_tokenizer)


@pytest.fixture(scope="module")
def apple_dir(tmp_path_factory, reference_model, apple_tokenizer):
    from checkpoint_helpers import write_apple_checkpoint

    return write_apple_checkpoint(tmp_path_factory.mktemp("apple") / "FastVLM-tiny", reference_model, apple_tokenizer)

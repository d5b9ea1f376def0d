"""Following the installed transformers: the cache's name, output classes, deprecations, untested releases."""

import dataclasses
import importlib
import inspect
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    DynamicCache,
    Qwen2ForCausalLM,
    Qwen2Model,
    pipeline,
)
from transformers import modeling_outputs
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

import fastvlm_hf
from fastvlm_hf import FastVLMForConditionalGeneration, FastVLMModel, compat
from fastvlm_hf.chat import ChatSession
from fastvlm_hf.compat import CACHE_NAME, cache_of
from fastvlm_hf.modeling_fastvlm import FastVLMCausalLMOutputWithPast, FastVLMModelOutputWithPast

README = Path(__file__).resolve().parents[1] / "README.md"
CACHE_NAMES = {"cache", "past_key_values"}  # the name before and after transformers 5.24


def parameter_names(function) -> set[str]:
    return set(inspect.signature(function).parameters)


@pytest.mark.parametrize(
    "ours, theirs", [(FastVLMForConditionalGeneration, Qwen2ForCausalLM), (FastVLMModel, Qwen2Model)]
)
def test_forward_names_the_cache_as_transformers_own_models_do(ours, theirs):
    # `generate` passes the cache under its own name and checks the names it passes against the signature.
    assert parameter_names(ours.forward) & CACHE_NAMES == parameter_names(theirs.forward) & CACHE_NAMES == {CACHE_NAME}


@pytest.mark.parametrize(
    "ours, plain, multimodal",
    [
        (FastVLMCausalLMOutputWithPast, CausalLMOutputWithPast, "MultimodalCausalLMOutputWithPast"),
        (FastVLMModelOutputWithPast, BaseModelOutputWithPast, "MultimodalBaseModelOutputWithPast"),
    ],
)
def test_outputs_extend_transformers_own_output_classes(ours, plain, multimodal):
    # From 5.24 on transformers' vision-language models return its multimodal outputs (with `image_outputs`).
    theirs = getattr(modeling_outputs, multimodal, plain)
    assert issubclass(ours, theirs)
    own_fields = [field.name for field in dataclasses.fields(ours)]
    assert own_fields == [field.name for field in dataclasses.fields(theirs)] + ["image_hidden_states"]


def prompt(config, num_images=1):
    return torch.tensor([[1, 5, 6] + [config.image_token_id] * 4 * num_images + [7, 8, 2, 1]])


def pixels(num_images=1):
    return torch.rand(num_images, 3, 128, 128, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_the_image_encoders_output_is_returned_where_transformers_has_the_field(tiny_model, tiny_config):
    output = tiny_model(input_ids=prompt(tiny_config), pixel_values=pixels())
    fields = {field.name for field in dataclasses.fields(type(output))}
    if not hasattr(modeling_outputs, "MultimodalCausalLMOutputWithPast"):
        assert "image_outputs" not in fields  # before 5.24: nothing of our own in its place
        return
    assert torch.equal(output.image_outputs.pooler_output, output.image_hidden_states)
    assert output.image_outputs.last_hidden_state.shape[:2] == (1, tiny_config.vision_config.hidden_size)


@torch.no_grad()
def test_the_cache_passed_in_is_filled_and_returned(tiny_model, tiny_config):
    cache = DynamicCache()
    ids = prompt(tiny_config)
    output = tiny_model(input_ids=ids, pixel_values=pixels(), **{CACHE_NAME: cache})
    assert cache_of(output) is cache and cache.get_seq_length() == ids.shape[1]
    inner = tiny_model.model(input_ids=ids[:, -1:], **{CACHE_NAME: cache})
    assert cache_of(inner) is cache and cache.get_seq_length() == ids.shape[1] + 1


@torch.no_grad()
def test_the_old_cache_name_still_works_with_transformers_own_deprecation_warning(tiny_model, tiny_config):
    if CACHE_NAME == "past_key_values":
        pytest.skip("before transformers 5.24 `past_key_values` is the cache's only name")
    cache, ids = DynamicCache(), prompt(tiny_config)
    with pytest.warns(FutureWarning, match="past_key_values"):
        output = tiny_model(input_ids=ids, pixel_values=pixels(), past_key_values=cache)
    assert cache_of(output) is cache and cache.get_seq_length() == ids.shape[1]


# Deprecations transformers raises about its own internals, whatever the model.
NOT_ON_OUR_BEHALF = (
    # 5.0's image-text-to-text pipeline passes its own `generation_config` along with the caller's arguments.
    "Passing `generation_config` together with generation-related arguments",
)
# Deprecation warnings other libraries raise about their use of transformers (regular expressions).
RAISED_BY_OTHER_LIBRARIES = (
    # TRL reads the attribute transformers 5.25 renamed to `is_activation_checkpointing`.
    r"`is_gradient_checkpointing` is deprecated",
)


class _DeprecationLog(logging.Handler):
    """Collects the deprecation notices transformers logs (it logs some, such as the old cache name's, instead of
    warning)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower() and not message.startswith(NOT_ON_OUR_BEHALF):
            self.messages.append(message)


@pytest.fixture
def deprecations_fail():
    """Deprecation warnings raised while the test runs fail it, and so do deprecation notices transformers logs."""
    log = _DeprecationLog()
    transformers_logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process notices show again
    transformers_logger.addHandler(log)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            for message in RAISED_BY_OTHER_LIBRARIES:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        transformers_logger.removeHandler(log)
    assert log.messages == []


def chat_messages(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def picture():
    image = Image.new("RGB", (160, 96), (240, 240, 240))
    image.paste((200, 40, 40), (40, 24, 80, 48))
    return image


@torch.no_grad()
def test_forward_generate_chat_and_pipeline_raise_no_deprecation(tiny_checkpoint_dir, deprecations_fail):
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint_dir)
    inputs = processor.apply_chat_template(
        chat_messages(picture(), "Describe the image."),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape

    cache = DynamicCache()
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, **{CACHE_NAME: cache})
    follow_up = torch.cat([first, inputs["input_ids"][:, -4:]], dim=1)
    model.generate(input_ids=follow_up, max_new_tokens=3, do_sample=False, **{CACHE_NAME: cache})
    assert cache.get_seq_length() > first.shape[1]

    session = ChatSession(model, processor, [picture()], {"max_new_tokens": 3, "do_sample": False})
    session.ask("Describe the image.")
    session.ask("What colour is it?")
    assert session.cache.get_seq_length() > session.prompt_tokens

    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    result = pipe(text=chat_messages(picture(), "Describe the image."), max_new_tokens=3,
                  generate_kwargs={"do_sample": False})
    assert result[0]["generated_text"][-1]["role"] == "assistant"


def test_fine_tuning_with_peft_and_trl_raises_no_deprecation(tiny_processor, tiny_tokenizer, tmp_path, deprecations_fail):
    """The training path as `fastvlm-hf finetune` runs it: LoRA through TRL's SFTTrainer with activation
    checkpointing, then the adapter merged and saved."""
    trl = pytest.importorskip("trl")
    pytest.importorskip("peft")
    from helpers.training import COLOURS, assistant, build_trainable_model, user

    from fastvlm_hf.compat import checkpointing_arguments
    from fastvlm_hf.training import lora_config, merge_adapter, prepare_model_for_training, sft_trainer

    side = tiny_processor.image_processor.size["height"]
    rows = [{"images": [Image.new("RGB", (side, side), rgb)],
             "messages": [user("Describe the image.", 1), assistant(f"A {colour} square.")]}
            for colour, rgb in COLOURS.items()]  # fmt: skip
    model = build_trainable_model(tiny_tokenizer)
    model.save_pretrained(tmp_path / "base")
    prepare_model_for_training(model)
    arguments = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, bf16=False, **checkpointing_arguments(True),
    )  # fmt: skip
    trainer = sft_trainer(model, tiny_processor, rows, arguments, peft_config=lora_config(model))
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "base", tmp_path / "adapter").save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()


@pytest.mark.parametrize("lines_past_the_newest_tested", [1, 10])
def test_a_transformers_newer_than_the_newest_tested_gets_one_line(lines_past_the_newest_tested):
    tested = version.parse(compat.NEWEST_TESTED_TRANSFORMERS)
    newer = version.parse(f"{tested.major}.{tested.minor + lines_past_the_newest_tested}.0")
    with pytest.warns(compat.UntestedTransformersWarning) as caught:
        compat.warn_if_untested_transformers(newer)
    assert len(caught) == 1
    notice = str(caught[0].message)
    assert "\n" not in notice
    assert f"tested with transformers up to {compat.NEWEST_TESTED_TRANSFORMERS}.x" in notice and str(newer) in notice
    assert "issue tracker" in notice


@pytest.mark.parametrize("release", ["4.57.6", "5.0.0", "{tested}.0", "{tested}.9"])
def test_tested_transformers_releases_get_no_notice(release):
    installed = version.parse(release.format(tested=compat.NEWEST_TESTED_TRANSFORMERS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.warn_if_untested_transformers(installed)


def test_importing_gives_the_notice_exactly_when_the_installed_transformers_is_newer_than_the_newest_tested():
    tested = version.parse(compat.NEWEST_TESTED_TRANSFORMERS)
    installed = version.parse(transformers.__version__)
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import fastvlm_hf"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    newer = (installed.major, installed.minor) > (tested.major, tested.minor)
    assert ("UntestedTransformersWarning" in result.stderr) == newer, result.stderr


def test_importing_on_a_newer_transformers_gives_the_notice(monkeypatch):
    tested = version.parse(compat.NEWEST_TESTED_TRANSFORMERS)
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", version.parse(f"{tested.major}.{tested.minor + 1}.0"))
    with pytest.warns(compat.UntestedTransformersWarning):
        importlib.reload(fastvlm_hf)


def test_readme_requirements_name_the_newest_tested_transformers():
    paragraphs = README.read_text().split("\n\n")
    requirements = next(paragraph for paragraph in paragraphs if paragraph.startswith("Requirements:"))
    assert f"{compat.NEWEST_TESTED_TRANSFORMERS}." in requirements

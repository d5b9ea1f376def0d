"""Fine-tuning with PEFT and TRL (`fastvlm_hf.training`): labels, batches, LoRA that learns, adapters that save,
reload and merge, gradient checkpointing, QLoRA on CPU, and the checks of bad rows."""

import json
import re

import pytest
import torch
from helpers.tiny_model import TINY_VISION_CONFIG
from helpers.training import COLOURS, assistant, build_trainable_model, user
from PIL import Image
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from fastvlm_hf import FastVLMForConditionalGeneration, conversion
from fastvlm_hf.compat import checkpointing_arguments, kbit_training_arguments
from fastvlm_hf.training import (
    IGNORE_INDEX,
    DataError,
    FastVLMDataCollator,
    RowError,
    load_rows,
    lora_config,
    lora_target_modules,
    merge_adapter,
    prepare_model_for_training,
    sft_trainer,
)

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

# Checkpointing settings go under the installed transformers' and PEFT's names (each renamed them once, and warns on
# the old ones): a deprecated name used here fails the test.
pytestmark = pytest.mark.filterwarnings("error:`gradient_checkpointing(_kwargs)?` is deprecated")

IMAGE_SIDE = TINY_VISION_CONFIG["image_size"]
IMAGE_TOKENS = (IMAGE_SIDE // 64) ** 2


def square(colour):
    return Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), COLOURS[colour])


def colour_rows():
    """Four examples a model can only answer by looking at the image."""
    return [
        {"images": [square(colour)], "messages": [user("Describe the image.", 1), assistant(f"A {colour} square.")]}
        for colour in COLOURS
    ]


def sft_args(output_dir, steps, **overrides):
    settings = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **checkpointing_arguments(False),
        "seed": 0,
        "bf16": False,  # float32 throughout: the comparisons below are to 1e-5
    }
    return trl.SFTConfig(**{**settings, **overrides})


def labelled_text(tokenizer, batch, row):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return tokenizer.decode(ids[labels != IGNORE_INDEX])


# ----------------------------------------------------------------------------------------------------------------------
# The collator


def test_labels_count_only_the_assistant_turns_of_a_two_turn_conversation(tiny_processor, tiny_tokenizer):
    row = {
        "images": [square("red")],
        "messages": [user("Describe the image.", images=1), assistant("A red square."),
                     user("How many apples?"), assistant("Two apples.")],
    }  # fmt: skip
    # By hand: the chat template's text, cut where the loss starts and stops counting.
    pieces = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
         + "<image>" * IMAGE_TOKENS + "\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n", False),
        ("A red square.<|im_end|>", True),
        ("\n<|im_start|>user\nHow many apples?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Two apples.<|im_end|>", True),
        ("\n", False),
    ]  # fmt: skip
    expected_ids, expected_labels = [], []
    for text, counts in pieces:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_labels += ids if counts else [IGNORE_INDEX] * len(ids)

    batch = FastVLMDataCollator(tiny_processor)([row])
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == expected_labels
    assert batch["attention_mask"].all()
    image_positions = batch["input_ids"][0] == tiny_processor.image_token_id
    assert image_positions.sum() == IMAGE_TOKENS and (batch["labels"][0][image_positions] == IGNORE_INDEX).all()
    assert labelled_text(tiny_tokenizer, batch, 0) == "A red square.<|im_end|>Two apples.<|im_end|>"


def test_a_batch_mixes_image_counts_including_none(tiny_processor, tiny_tokenizer, tiny_model):
    rows = [
        {"images": [square("red"), square("blue")],
         "messages": [user("Compare them.", images=2), assistant("Red, then blue.")]},
        {"messages": [{"role": "user", "content": "No picture here."}, {"role": "assistant", "content": "Fine."}]},
        {"images": [square("green")], "messages": [user("Colour?", images=1), assistant("Green.")]},
    ]  # fmt: skip
    batch = FastVLMDataCollator(tiny_processor)(rows)
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIDE, IMAGE_SIDE)  # the batch's images, in row order
    image_tokens = (batch["input_ids"] == tiny_processor.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [2 * IMAGE_TOKENS, 0, IMAGE_TOKENS]
    lengths = batch["attention_mask"].sum(dim=1)
    for row, length in enumerate(lengths.tolist()):  # right padding, never counted
        assert (batch["input_ids"][row, length:] == tiny_tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    assert [labelled_text(tiny_tokenizer, batch, row) for row in range(3)] == [
        "Red, then blue.<|im_end|>", "Fine.<|im_end|>", "Green.<|im_end|>",
    ]  # fmt: skip
    with torch.no_grad():
        assert torch.isfinite(tiny_model(**batch).loss)

    text_only = FastVLMDataCollator(tiny_processor)(rows[1:2])
    assert "pixel_values" not in text_only
    with torch.no_grad():
        assert torch.isfinite(tiny_model(**text_only).loss)


def test_max_length_truncates_text_but_never_image_tokens(tiny_processor):
    row = {"images": [square("red")], "messages": [user("Describe the image.", 1), assistant("A red square. " * 8)]}
    full = FastVLMDataCollator(tiny_processor).encode(row)
    first_answer_token = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    truncated = FastVLMDataCollator(tiny_processor, max_length=first_answer_token + 3).encode(row)
    assert truncated.input_ids == full.input_ids[: first_answer_token + 3]
    last_image_token = max(i for i, token in enumerate(full.input_ids) if token == tiny_processor.image_token_id)
    with pytest.raises(RowError, match="would cut image tokens"):
        FastVLMDataCollator(tiny_processor, max_length=last_image_token).encode(row)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA with TRL's SFTTrainer


@pytest.fixture(scope="module")
def trained(tiny_processor, tiny_tokenizer, tmp_path_factory):
    """30 LoRA steps with TRL's SFTTrainer on the four colour rows, as a user runs them."""
    model = build_trainable_model(tiny_tokenizer)
    prepare_model_for_training(model)
    vision_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    output = tmp_path_factory.mktemp("lora")
    peft_config = lora_config(model, lora_dropout=0.0)
    trainer = sft_trainer(model, tiny_processor, colour_rows(), sft_args(output, steps=30), peft_config=peft_config)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.model.eval()
    return {"trainer": trainer, "model": trainer.model, "losses": losses, "vision_before": vision_before, "dir": output}


def test_thirty_lora_steps_on_four_examples_drive_the_loss_below_30_percent(trained):
    losses = trained["losses"]
    assert len(losses) == 30
    assert losses[-1] < 0.3 * losses[0], losses


def test_lora_targets_the_language_models_linear_layers_only(trained, tiny_tokenizer):
    model = trained["model"]
    assert lora_target_modules(model) == lora_target_modules(build_trainable_model(tiny_tokenizer))  # also once wrapped
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert lora_layers and all(".language_model.layers." in name for name in lora_layers)
    suffixes = {name.rsplit(".", 1)[-1] for name in lora_layers}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_the_frozen_vision_tower_is_left_exactly_as_it_was(trained):
    """Its BatchNorm statistics included: training mode must not re-estimate them from the batches."""
    after = trained["model"].get_base_model().model.vision_tower.state_dict()
    for key, before in trained["vision_before"].items():
        assert torch.equal(after[key], before), key


def test_a_frozen_vision_tower_stays_out_of_the_backward_pass(tiny_processor, tiny_tokenizer):
    model = build_trainable_model(tiny_tokenizer)
    prepare_model_for_training(model)
    features = []
    model.model.vision_tower.register_forward_hook(lambda module, args, output: features.append(output[0]))
    peft_model = peft.get_peft_model(model, lora_config(model)).train()
    peft_model.enable_input_require_grads()  # as PEFT and transformers' checkpointing call it: it hooks the stem too
    batch = FastVLMDataCollator(tiny_processor)(colour_rows()[:2])
    peft_model(**batch).loss.backward()
    assert torch.is_grad_enabled()
    assert not features[-1].requires_grad  # nothing of the tower recorded for backward
    assert all(p.grad is not None for name, p in peft_model.named_parameters() if "lora_" in name)

    model.model.vision_tower.final_conv.reparam_conv.weight.requires_grad_(True)  # a tower being trained
    peft_model(**batch).loss.backward()
    assert features[-1].requires_grad and model.model.vision_tower.final_conv.reparam_conv.weight.grad is not None


def _inputs(processor, rows):
    batch = FastVLMDataCollator(processor)(rows)
    return {k: v for k, v in batch.items() if k != "labels"}


def test_adapter_saves_and_reloads_to_identical_logits(trained, tiny_processor, tiny_tokenizer, tmp_path):
    model = trained["model"]
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 16

    reloaded = peft.PeftModel.from_pretrained(build_trainable_model(tiny_tokenizer), tmp_path / "adapter").eval()
    inputs = _inputs(tiny_processor, colour_rows())
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_merged_model_equals_the_adapter_model_and_saves_loads_and_converts(trained, tiny_processor, tmp_path):
    model = trained["model"]
    inputs = _inputs(tiny_processor, colour_rows())
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    base = tmp_path / "base"
    build_trainable_model(tiny_processor.tokenizer).save_pretrained(base)
    tiny_processor.save_pretrained(base)

    merged = merge_adapter(base, tmp_path / "adapter", dtype=torch.float32).eval()
    assert type(merged) is FastVLMForConditionalGeneration
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    # float32: the next-token probabilities agree to 1e-5 (the logits, up to about 10 here, to a few 1e-5)
    torch.testing.assert_close(merged_logits.softmax(-1), adapter_logits.softmax(-1), rtol=0, atol=1e-5)
    assert torch.equal(merged_logits.argmax(-1), adapter_logits.argmax(-1))

    merged.save_pretrained(tmp_path / "merged")
    tiny_processor.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "fastvlm"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, merged(**inputs).logits)

    conversion.convert(str(tmp_path / "merged"), tmp_path / "apple", to="apple")
    assert json.loads((tmp_path / "apple" / "config.json").read_text())["model_type"] == "llava_qwen2"
    from_apple = FastVLMForConditionalGeneration.from_pretrained(tmp_path / "apple", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(from_apple(**inputs).logits, merged(**inputs).logits)


def test_the_projector_trains_in_full_or_with_lora_by_option(tiny_tokenizer):
    model = build_trainable_model(tiny_tokenizer)
    assert lora_config(model).modules_to_save is None
    assert lora_config(model, projector="full").modules_to_save == ["multi_modal_projector"]
    assert lora_config(model, train_vision_tower=True).modules_to_save == ["vision_tower"]
    with_projector = lora_target_modules(model, projector=True)
    assert set(with_projector) - set(lora_target_modules(model)) == {
        "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2",
    }  # fmt: skip
    peft_model = peft.get_peft_model(model, lora_config(model, projector="full"))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("multi_modal_projector.modules_to_save" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)


def test_packed_weights_cannot_be_trained(tiny_tokenizer):
    model = build_trainable_model(tiny_tokenizer).eval()
    model.pack_weights()
    for call in (lora_target_modules, lora_config, prepare_model_for_training):
        with pytest.raises(ValueError, match=r"unpack_weights\(\)"):
            call(model)
    model.unpack_weights()
    assert lora_target_modules(model)


# ----------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def _gradients(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_processor, tiny_tokenizer, use_reentrant):
    model = build_trainable_model(tiny_tokenizer).train()
    prepare_model_for_training(model)
    batch = FastVLMDataCollator(tiny_processor)(colour_rows()[:2])
    plain = _gradients(model, batch)

    # 5.24 renamed `gradient_checkpointing_enable` (still there, deprecated) to `activation_checkpointing_enable`
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable({"use_reentrant": use_reentrant})  # the checkpoint function's kwargs, first under both names
    checkpointed_layers = []
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False):
            function = module._gradient_checkpointing_func

            def counting(*args, _name=name, _function=function, **kwargs):
                checkpointed_layers.append(_name)
                return _function(*args, **kwargs)

            module._gradient_checkpointing_func = counting
    checkpointed = _gradients(model, batch)

    vision_blocks = sum(TINY_VISION_CONFIG["depths"])
    assert sum(".vision_tower.stages." in name for name in set(checkpointed_layers)) == vision_blocks
    assert sum(".language_model.layers." in name for name in set(checkpointed_layers)) == 2
    assert checkpointed.keys() == plain.keys() and any("vision_tower" in name for name in plain)
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=0, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# QLoRA: bitsandbytes 4-bit on CPU

QUANT_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4}  # multiples of 64 for bnb on CPU


def test_qlora_on_a_4bit_model_trains_and_saves(tiny_processor, tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    build_trainable_model(tiny_tokenizer, **QUANT_TEXT).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "base", quantization_config=quantization)
    model = peft.prepare_model_for_kbit_training(model, **kbit_training_arguments(True, {"use_reentrant": False}))
    prepare_model_for_training(model)
    args = sft_args(tmp_path / "run", steps=3, **checkpointing_arguments(True, {"use_reentrant": False}))
    trainer = sft_trainer(model, tiny_processor, colour_rows(), args, peft_config=lora_config(model))
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n)

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base_4bit = AutoModelForImageTextToText.from_pretrained(tmp_path / "base", quantization_config=quantization)
    base_4bit = prepare_model_for_training(peft.prepare_model_for_kbit_training(base_4bit))  # as it was trained
    reloaded = peft.PeftModel.from_pretrained(base_4bit, tmp_path / "adapter").eval()
    for name, parameter in reloaded.named_parameters():  # TRL trains a quantized model's adapter in bfloat16, as QLoRA
        if "lora_" in name:
            parameter.data = parameter.data.to(torch.bfloat16)
    inputs = _inputs(tiny_processor, colour_rows()[:1])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, trainer.model(**inputs).logits)


def test_qlora_with_bfloat16_compute_trains_under_autocast_on_cpu(tiny_processor, tiny_tokenizer, tmp_path):
    """What `fastvlm-hf finetune --load-in-4bit` does on a CPU by default: the frozen tower, cast to float32 by
    `prepare_model_for_kbit_training`, runs under bfloat16 autocast."""
    pytest.importorskip("bitsandbytes")
    build_trainable_model(tiny_tokenizer, **QUANT_TEXT).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "base", quantization_config=quantization, dtype=torch.bfloat16
    )
    model = peft.prepare_model_for_kbit_training(model, **kbit_training_arguments(True, {"use_reentrant": False}))
    model = prepare_model_for_training(model)
    args = sft_args(tmp_path / "run", steps=2, bf16=True)
    trainer = sft_trainer(model, tiny_processor, colour_rows(), args, peft_config=lora_config(model))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# ----------------------------------------------------------------------------------------------------------------------
# Bad rows


@pytest.fixture
def bad_data(tmp_path):
    """A JSONL file with one good row and one row of every kind of mistake, images beside it."""
    square("red").save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    good = {"images": ["red.png"], "messages": [user("Describe the image.", 1), assistant("A red square.")]}
    rows = [
        good,
        {"images": ["red.png", "red.png"], "messages": [user("Two?", 1), assistant("Yes.")]},  # 2 images, 1 entry
        {"images": ["missing.png"], "messages": [user("Where?", 1), assistant("Gone.")]},
        {"images": ["broken.png"], "messages": [user("What?", 1), assistant("Nothing.")]},
        {"images": ["red.png"], "messages": [user("Describe the image.", 1)]},  # no assistant turn
        {"images": ["red.png"],  # its image comes after 60 tokens
         "messages": [user("Describe a tree. " * 12), assistant("Green."), user("And this?", 1), assistant("Red.")]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n{not json\n")
    return path


# The row (line) each mistake is on, and what its message says.
BAD_ROWS = {
    2: "2 images but 1 <image> placeholder",
    3: "image not found: .*missing.png",
    4: "not an image file Pillow can read: .*broken.png",
    5: "no assistant turn",
    6: "more than max length 60, and truncating it would cut image tokens",
    7: "not valid JSON",
}


def test_every_bad_row_is_named_by_file_and_row_before_training(bad_data, tiny_processor):
    with pytest.raises(DataError) as raised:
        load_rows(bad_data, FastVLMDataCollator(tiny_processor, max_length=60))
    message = str(raised.value)
    assert message.startswith("6 of 7 rows cannot be trained on")
    assert [bad_row.row for bad_row in raised.value.bad_rows] == list(BAD_ROWS)
    for bad_row in raised.value.bad_rows:
        assert bad_row.source == str(bad_data)
        assert re.search(BAD_ROWS[bad_row.row], bad_row.reason), bad_row
        assert f"{bad_data}, row {bad_row.row}: " in message
    assert "--skip-bad-rows" in message


def test_skip_bad_rows_keeps_the_good_rows_and_counts_the_others(bad_data, tiny_processor):
    data = load_rows(bad_data, FastVLMDataCollator(tiny_processor, max_length=60), skip_bad_rows=True)
    assert len(data.rows) == 1 and data.rows[0]["images"] == [str(bad_data.parent / "red.png")]  # beside the file
    assert [bad_row.row for bad_row in data.skipped] == list(BAD_ROWS)


def test_rows_of_a_dataset_are_checked_too(tiny_processor):
    rows = colour_rows() + [{"images": [], "messages": [user("Look:", 1), assistant("At nothing.")]}]
    with pytest.raises(DataError, match=r"dataset, row 5: 0 images but 1 <image> placeholder"):
        load_rows(rows, FastVLMDataCollator(tiny_processor))

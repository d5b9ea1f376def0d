"""Apple's and transformers' checkpoint layouts: key maps, config translation, loading through the Auto classes."""

import json
import re
import shutil

import pytest
import torch
import transformers
from helpers.apple_layout import apple_layout
from helpers.checkpoints import (
    CHATML_TEMPLATE,
    IMAGE_SIDE,
    NATIVE_VISION_CONFIG,
    apple_config_json,
    apple_state_dict,
    architecture,
    assert_same_logits,
    build_reference_model,
    model_inputs,
    write_apple_checkpoint,
    write_native_checkpoint,
)
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipeline,
)

from fastvlm_hf import (
    FastVLMConfig,
    FastVLMForConditionalGeneration,
    FastVLMImageProcessor,
    FastVLMModel,
    FastVLMProcessor,
    checkpoints,
)
from fastvlm_hf.compat import IS_TRANSFORMERS_5
from fastvlm_hf.configuration_fastvlm import FastVLMTransformersConfig
from fastvlm_hf.processing_fastvlm import DEFAULT_CHAT_TEMPLATE


# ----------------------------------------------------------------------------------------------------------------------
# Key maps


def test_apple_keys_map_onto_every_weight_of_ours_and_back(reference_model):
    ours = reference_model.state_dict()
    apple = checkpoints.from_fastvlm_state_dict(ours, checkpoints.APPLE)
    assert not any(key.startswith(("model.vision_tower.stages", "model.multi_modal_projector")) for key in apple)
    assert "model.vision_tower.vision_tower.model.network.10.0.convffn.conv.bn.running_var" in apple
    assert "model.vision_tower.vision_tower.model.network.8.proj.0.lkb_reparam.weight" in apple
    assert "model.vision_tower.vision_tower.model.network.9.reparam_conv.bias" in apple
    assert "model.vision_tower.vision_tower.model.network.7.1.layer_scale_2" in apple
    assert "model.vision_tower.vision_tower.model.conv_exp.se.expand.weight" in apple

    apple["model.vision_tower.vision_tower.model.head.proj"] = torch.zeros(1)
    back = checkpoints.to_fastvlm_state_dict(apple, checkpoints.APPLE)
    assert list(back) == list(ours)  # every name, the unused head dropped
    assert all(back[key] is ours[key] for key in ours)
    again = checkpoints.from_fastvlm_state_dict(back, checkpoints.APPLE)
    assert again.keys() == apple.keys() - {"model.vision_tower.vision_tower.model.head.proj"}


def test_apple_key_map_matches_the_released_checkpoints_key_for_key_and_shape_for_shape(reference_model):
    config = reference_model.config
    expected = apple_layout(config.vision_config, config.text_config)
    ours = reference_model.state_dict()
    mapped = checkpoints.from_fastvlm_state_dict(ours, checkpoints.APPLE)
    used = {apple_key: entry for apple_key, entry in expected.items() if entry[0] is not None}
    assert set(mapped) | {"lm_head.weight"} == set(used)
    for apple_key, (our_key, shape) in used.items():
        if apple_key in mapped:
            assert mapped[apple_key] is ours[our_key], (apple_key, our_key)
        assert tuple(ours[our_key].shape) == shape, (our_key, shape)
    assert checkpoints.to_fastvlm_state_dict(apple_state_dict(reference_model), checkpoints.APPLE).keys() == ours.keys()


def test_timm_keys_map_onto_ours_and_back(reference_model):
    ours = reference_model.state_dict()
    native = checkpoints.from_fastvlm_state_dict(ours, checkpoints.TRANSFORMERS)
    assert "model.vision_tower.timm_model.stages.3.pos_emb.reparam_conv.weight" in native
    assert "model.vision_tower.timm_model.final_conv.se.fc1.weight" in native
    assert "model.language_model.embed_tokens.weight" in native
    back = checkpoints.to_fastvlm_state_dict(native, checkpoints.TRANSFORMERS)
    assert list(back) == list(ours) and all(back[key] is ours[key] for key in ours)
    assert checkpoints.from_fastvlm_state_dict(back, checkpoints.TRANSFORMERS).keys() == native.keys()


@pytest.mark.parametrize("layout", [checkpoints.APPLE, checkpoints.TRANSFORMERS])
def test_renames_leave_our_keys_alone(reference_model, layout):
    """What lets the same table load our own checkpoints, and 5.x apply every rule in turn."""
    ours = list(reference_model.state_dict())
    assert list(checkpoints.to_fastvlm_state_dict(dict.fromkeys(ours), layout)) == ours


@pytest.mark.parametrize("layout", [checkpoints.APPLE, checkpoints.TRANSFORMERS])
def test_key_mapping_renames_alike_whether_patterns_apply_once_or_in_turn(reference_model, layout):
    """transformers 4.57 applies the first matching `key_mapping` pattern, 5.x applies all of them in order."""
    ours = reference_model.state_dict()
    foreign = list(checkpoints.from_fastvlm_state_dict(ours, layout))
    mapping = checkpoints.key_mapping(layout).items()

    def first_match(key):
        for pattern, replacement in mapping:
            renamed, count = re.subn(pattern, replacement, key)
            if count:
                return renamed
        return key

    def in_turn(key):
        for pattern, replacement in mapping:
            key = re.sub(pattern, replacement, key)
        return key

    assert [first_match(key) for key in foreign] == list(ours)
    assert [in_turn(key) for key in foreign] == list(ours)


@pytest.mark.skipif(not IS_TRANSFORMERS_5, reason="transformers 4.57 has no checkpoint conversion mapping")
@pytest.mark.parametrize("layout", [checkpoints.APPLE, checkpoints.TRANSFORMERS, checkpoints.FASTVLM])
def test_one_list_of_weight_renamings_renames_every_layout(reference_model, layout):
    """What vLLM applies, in turn and whatever the layout: transformers' renamings of both foreign tables together."""
    ours = reference_model.state_dict()
    renamings = checkpoints.weight_renamings()

    def in_turn(key):
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    assert [in_turn(key) for key in checkpoints.from_fastvlm_state_dict(ours, layout)] == list(ours)


# ----------------------------------------------------------------------------------------------------------------------
# Config translation


def test_apple_config_reads_into_a_fastvlm_config(apple_dir, reference_model):
    config = AutoConfig.from_pretrained(apple_dir)
    assert type(config) is FastVLMConfig
    assert architecture(config.vision_config) == architecture(reference_model.config.vision_config)
    assert config.vision_config.image_size == IMAGE_SIDE  # from the tower's name
    text, expected = config.text_config, reference_model.config.text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.vocab_size) == (
        "qwen2", expected.hidden_size, expected.num_hidden_layers, expected.vocab_size
    )
    assert text.eos_token_id == 2 and not hasattr(text, "mm_vision_tower")
    assert config.image_token_id == reference_model.config.image_token_id
    assert config.tie_word_embeddings is True
    assert "auto_map" not in config.to_dict()  # Apple's remote code is not ours to point to
    assert config.architectures == ["FastVLMForConditionalGeneration"]  # what serving engines pick the model by


def test_apple_config_defaults(reference_model, apple_tokenizer):
    apple = apple_config_json(reference_model, apple_tokenizer)
    for key in ("image_token_index", "vision_config"):
        del apple[key]
    apple.update(mm_vision_tower="mobileclip_l_1024", mm_hidden_size=3072, tie_word_embeddings=False)
    config = FastVLMConfig.from_dict(checkpoints.fastvlm_config_dict(apple))
    assert config.image_token_id == 151646  # the first free id of Qwen2's tokenizer
    assert config.tie_word_embeddings is False  # FastVLM-7B
    assert architecture(config.vision_config) == architecture(FastVLMConfig().vision_config)  # FastViTHD at 1024


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mm_vision_tower": "clip-vit-large-336"}, r"'clip-vit-large-336'.*'mobileclip_l_<resolution>'"),
        ({"mm_hidden_size": 1024}, r"`mm_hidden_size` is 1024 .* outputs 256 channels"),
        ({"mm_projector_type": "linear"}, r"'linear'.*mlp2x_gelu"),
    ],
)
def test_unsupported_apple_configs_say_what_they_found(tmp_path, reference_model, apple_tokenizer, overrides, message):
    (tmp_path / "config.json").write_text(json.dumps(apple_config_json(reference_model, apple_tokenizer, **overrides)))
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        FastVLMForConditionalGeneration.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Loading Apple's layout


@pytest.mark.parametrize("auto_class", [AutoModelForImageTextToText, AutoModelForCausalLM])
def test_apple_checkpoint_loads_through_auto_classes_without_remote_code(apple_dir, reference_model, auto_class):
    model, loading_info = auto_class.from_pretrained(apple_dir, dtype=torch.float32, output_loading_info=True)
    assert type(model) is FastVLMForConditionalGeneration
    assert not any(loading_info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert_same_logits(model, reference_model)


def test_apple_checkpoint_loads_as_base_model(apple_dir, reference_model):
    model = AutoModel.from_pretrained(apple_dir, dtype=torch.float32).eval()
    assert type(model) is FastVLMModel
    inputs = model_inputs(reference_model.config)
    with torch.no_grad():
        expected = reference_model.model(**inputs).last_hidden_state
        assert torch.equal(model(**inputs).last_hidden_state, expected)


def test_sharded_apple_checkpoint_loads(tmp_path, reference_model, apple_tokenizer):
    directory = write_apple_checkpoint(tmp_path, reference_model, apple_tokenizer, shards=3)
    assert not (directory / "model.safetensors").exists()
    assert_same_logits(FastVLMForConditionalGeneration.from_pretrained(directory, dtype=torch.float32), reference_model)


def test_tied_output_embedding_follows_the_config_not_the_stored_copy(tmp_path, reference_model, apple_tokenizer):
    stored_copy = torch.randn_like(reference_model.lm_head.weight)
    state_dict = apple_state_dict(reference_model, lm_head=stored_copy)
    directory = write_apple_checkpoint(tmp_path, reference_model, apple_tokenizer, state_dict=state_dict)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert_same_logits(model, reference_model)


def test_untied_output_embedding_is_loaded(tmp_path, apple_tokenizer):
    reference = build_reference_model(apple_tokenizer, tie_word_embeddings=False, seed=1)  # as FastVLM-7B
    directory = write_apple_checkpoint(tmp_path, reference, apple_tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    assert_same_logits(model, reference)


def test_apple_checkpoint_stops_generating_at_im_end(apple_dir):
    model = AutoModelForImageTextToText.from_pretrained(apple_dir, dtype=torch.float32)
    assert model.generation_config.eos_token_id == 2  # `<|im_end|>`, which Apple's generation_config.json lacks


def test_missing_and_unexpected_weights_fail_naming_them(tmp_path, reference_model, apple_tokenizer):
    state_dict = apple_state_dict(reference_model)
    del state_dict["model.mm_projector.2.bias"]
    state_dict["model.image_newline"] = torch.zeros(64, dtype=torch.bfloat16)
    state_dict["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    directory = write_apple_checkpoint(tmp_path, reference_model, apple_tokenizer, state_dict=state_dict)
    message = (
        r"1 missing weight \('model.multi_modal_projector.linear_2.bias'\); "
        r"1 unexpected weight \('model.image_newline'\); "
        r"1 misshapen weight \('model.language_model.layers.0.mlp.up_proj.weight'\)"
    )
    with pytest.raises(ValueError, match=message):
        AutoModelForImageTextToText.from_pretrained(directory)


def test_mlx_export_fails_naming_what_it_found(tmp_path, reference_model, apple_tokenizer):
    """Apple's MLX repos: the vision tower is a Core ML package, the safetensors hold only the LLM and projector."""
    mlx_names = {
        "model.mm_projector.0.": "multi_modal_projector.linear_0.",
        "model.mm_projector.2.": "multi_modal_projector.linear_2.",
    }
    state_dict = {}
    for key, tensor in apple_state_dict(reference_model).items():
        if not key.startswith("model.vision_tower."):
            prefix = next((p for p in mlx_names if key.startswith(p)), None)
            state_dict[mlx_names[prefix] + key[len(prefix):] if prefix else "language_model." + key] = tensor
    directory = write_apple_checkpoint(tmp_path, reference_model, apple_tokenizer, state_dict=state_dict)
    (directory / "fastvithd.mlpackage").mkdir()
    found = r"found fastvithd.mlpackage and \d+ other weights \('language_model.lm_head.weight'"
    with pytest.raises(ValueError, match=rf"no vision-tower weights: {found}.*MLX/Core ML"):
        AutoModelForImageTextToText.from_pretrained(directory)


def test_saving_a_loaded_apple_model_writes_our_layout(apple_dir, reference_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(apple_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "fastvlm"
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(reference_model.state_dict()) - {"lm_head.weight"}  # tied: not stored
    assert_same_logits(AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32), reference_model)


# ----------------------------------------------------------------------------------------------------------------------
# Processor and pipeline on Apple's layout


def test_processor_from_apple_checkpoint(apple_dir, apple_tokenizer, reference_model):
    processor = AutoProcessor.from_pretrained(apple_dir)
    assert type(processor) is FastVLMProcessor
    image_processor = processor.image_processor
    assert type(image_processor) is FastVLMImageProcessor
    assert (image_processor.image_mode, image_processor.size) == ("pad", {"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    assert processor.image_token_id == len(apple_tokenizer) == reference_model.config.image_token_id
    assert processor.tokenizer.added_tokens_decoder[processor.image_token_id].special
    assert len(processor.tokenizer) <= reference_model.config.text_config.vocab_size  # no resize needed
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE  # not the tokenizer's text-only one
    assert processor.tokenizer.chat_template == CHATML_TEMPLATE

    image = Image.new("RGB", (160, 96), (200, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 4
    assert "<image>" not in processor.decode(inputs["input_ids"][0], skip_special_tokens=True)
    with torch.no_grad():
        assert reference_model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_processor_takes_a_given_tokenizer_and_adds_the_image_token_to_it(apple_dir, reference_model):
    """As vLLM loads it: its own tokenizer passed in, which then knows `<image>` too."""
    tokenizer = AutoTokenizer.from_pretrained(apple_dir)
    processor = AutoProcessor.from_pretrained(apple_dir, tokenizer=tokenizer)
    assert processor.tokenizer is tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == reference_model.config.image_token_id


def test_processor_uses_the_checkpoints_own_chat_template(tmp_path, reference_model, apple_tokenizer):
    directory = write_apple_checkpoint(tmp_path, reference_model, apple_tokenizer)
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert AutoProcessor.from_pretrained(directory).chat_template == "{{ messages[0]['content'] }}"


def test_processor_refuses_an_image_token_id_the_model_does_not_expect(tmp_path, reference_model, apple_tokenizer):
    directory = write_apple_checkpoint(tmp_path, reference_model, apple_tokenizer, image_token_index=7)
    with pytest.raises(ValueError, match=rf"gives '<image>' the id {len(apple_tokenizer)} but the model expects 7"):
        AutoProcessor.from_pretrained(directory)


def test_processor_and_model_read_and_translate_the_checkpoints_config_once_each(apple_dir, monkeypatch):
    """A load reads config.json once and hands what it read on: the processor to its image processor and to the image
    token check, the model to its key mapping and its quantization settings. The translation to our config is done
    once, by the processor; the model needs only the layout."""
    reads, translations = [], []

    def counted(calls, function):
        def counting(*args, **kwargs):
            calls.append(args)
            return function(*args, **kwargs)

        return counting

    monkeypatch.setattr(checkpoints.hub, "read_config_dict", counted(reads, checkpoints.hub.read_config_dict))
    translate = checkpoints.hub.fastvlm_config_dict
    monkeypatch.setattr(checkpoints.hub, "fastvlm_config_dict", counted(translations, translate))
    AutoProcessor.from_pretrained(apple_dir)
    assert (len(reads), len(translations)) == (1, 1)
    AutoModelForImageTextToText.from_pretrained(apple_dir, dtype=torch.float32)
    assert (len(reads), len(translations)) == (2, 1)


def test_pipeline_generates_on_apple_checkpoint(apple_dir):
    pipe = pipeline("image-text-to-text", model=str(apple_dir))
    image = Image.new("RGB", (96, 160), (20, 120, 220))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    output = pipe(text=messages, max_new_tokens=3, generate_kwargs={"do_sample": False})
    assert type(pipe.model) is FastVLMForConditionalGeneration
    assert output[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(output[0]["generated_text"][-1]["content"], str)


# ----------------------------------------------------------------------------------------------------------------------
# transformers' native layout

@pytest.fixture(scope="module")
def native_reference(apple_tokenizer):
    return build_reference_model(apple_tokenizer, tie_word_embeddings=False, vision_config=NATIVE_VISION_CONFIG)


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory, native_reference):
    if not hasattr(transformers, "FastVlmConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no native fast_vlm")
    return write_native_checkpoint(tmp_path_factory.mktemp("native"), native_reference)


def test_native_checkpoint_loads_with_identical_logits(native_dir, native_reference):
    model = FastVLMForConditionalGeneration.from_pretrained(native_dir, dtype=torch.float32)
    assert architecture(model.config.vision_config) == architecture(native_reference.config.vision_config)
    assert model.config.tie_word_embeddings is False
    assert_same_logits(model, native_reference)


def test_native_config_reader_gives_a_fastvlm_config(native_dir, native_reference):
    """The reader the vLLM plugin registers for `fast_vlm`, so that vLLM serves these checkpoints with our model."""
    config = FastVLMTransformersConfig.from_dict(json.loads((native_dir / "config.json").read_text()))
    assert type(config) is FastVLMConfig
    assert architecture(config.vision_config) == architecture(native_reference.config.vision_config)
    assert config.architectures == ["FastVLMForConditionalGeneration"]


def test_native_config_with_another_tower_fails(native_dir, tmp_path):
    config = json.loads((native_dir / "config.json").read_text())
    config["vision_config"]["architecture"] = "fastvit_mci4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'fastvit_mci4'.*'fastvit_mci3'"):
        FastVLMConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# `AutoImageProcessor` on every layout


def _a_wide_picture():
    image = Image.new("RGB", (160, 96), (240, 240, 240))
    image.paste((200, 40, 40), (40, 24, 80, 48))
    return image


@pytest.mark.parametrize("layout", ["fastvlm", "llava_qwen2", "fast_vlm"])
def test_auto_image_processor_gives_the_preprocessing_auto_processor_gives(
    layout, request, tiny_checkpoint_dir, apple_dir, apple_tokenizer, tmp_path
):
    """Apple's repos (and a native checkpoint that ships no image processor config) have no
    `preprocessor_config.json`: `AutoImageProcessor` still gives FastVLM's processor with Apple's padding, the one
    inside FastVLM's processor."""
    folder = {"fastvlm": tiny_checkpoint_dir, "llava_qwen2": apple_dir}.get(layout)
    if folder is None:
        folder = shutil.copytree(request.getfixturevalue("native_dir"), tmp_path / "native")
        apple_tokenizer.save_pretrained(folder)
    image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
    expected = FastVLMProcessor.from_pretrained(folder).image_processor
    assert type(image_processor) is FastVLMImageProcessor
    assert image_processor.to_dict() == expected.to_dict()
    if layout != "fastvlm":  # ours keeps whatever was saved; the others get Apple's preprocessing
        assert image_processor.image_mode == "pad"
        side = FastVLMConfig.from_pretrained(folder).vision_config.image_size
        assert image_processor.size == {"height": side, "width": side}
    picture = _a_wide_picture()
    torch.testing.assert_close(
        image_processor(picture, return_tensors="pt")["pixel_values"],
        expected(picture, return_tensors="pt")["pixel_values"],
        rtol=0, atol=0,
    )


def test_auto_image_processor_still_fails_for_a_folder_that_is_not_fastvlm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(OSError, match="preprocessor_config.json"):
        transformers.AutoImageProcessor.from_pretrained(tmp_path)


def test_importing_twice_wraps_auto_image_processor_once():
    import importlib

    import fastvlm_hf

    before = transformers.AutoImageProcessor.from_pretrained.__func__
    importlib.reload(fastvlm_hf)
    assert transformers.AutoImageProcessor.from_pretrained.__func__ is before

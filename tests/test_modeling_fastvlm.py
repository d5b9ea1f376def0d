"""FastVLM model: image features, placeholder scattering, generation, loss, tying and serialisation."""

import copy
import math

import pytest
import torch
from helpers.assertions import assert_logits_close
from helpers.tiny_model import TINY_VISION_CONFIG, tiny_text_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    CompileConfig,
    DynamicCache,
    Qwen2ForCausalLM,
    Qwen2Model,
)

from fastvlm_hf import FastVLMConfig, FastVLMForConditionalGeneration, FastVLMModel
from fastvlm_hf.compat import CACHE_NAME
from fastvlm_hf.testing import give_weights_a_working_scale, randomize_non_parameter_state

IMAGE_SIDE = 128  # 2×2 = 4 image tokens per image with the tiny encoder
TOKENS_PER_IMAGE = 4


def prompt_ids(config, text_before=(1, 5, 6), text_after=(7, 8, 2, 1), num_images=1):
    image = [config.image_token_id] * TOKENS_PER_IMAGE
    return torch.tensor([list(text_before) + image * num_images + list(text_after)])


def pixels(num_images=1, seed=0):
    return torch.rand(num_images, 3, IMAGE_SIDE, IMAGE_SIDE, generator=torch.Generator().manual_seed(seed))


def test_config_defaults_are_fastvlm_0_5b():
    config = FastVLMConfig()
    assert config.text_config.model_type == "qwen2"
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (896, 24)
    assert config.vision_config.hidden_size == 3072
    assert config.image_token_id == 151646 and config.image_token_index == 151646
    assert config.tie_word_embeddings is True
    assert config.num_image_tokens == 256


def test_language_model_is_transformers_qwen2_with_sdpa(tiny_model):
    assert type(tiny_model.model.language_model) is Qwen2Model
    assert tiny_model.model.language_model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_image_features_are_projected_row_major_tokens(tiny_model):
    pv = pixels(2)
    output = tiny_model.get_image_features(pv)
    features = output.pooler_output  # transformers 5.x's convention: the projected features as `pooler_output`
    assert features.shape == (2, TOKENS_PER_IMAGE, 64)
    feature_map = tiny_model.model.vision_tower(pv).last_hidden_state  # (2, 256, 2, 2)
    assert torch.equal(output.last_hidden_state, feature_map)
    tokens = torch.stack([feature_map[:, :, r, c] for r in range(2) for c in range(2)], dim=1)
    projector = tiny_model.model.multi_modal_projector
    hidden = tokens @ projector.linear_1.weight.T + projector.linear_1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    expected = hidden @ projector.linear_2.weight.T + projector.linear_2.bias
    assert torch.allclose(features, expected, atol=1e-5)


@torch.no_grad()
def test_features_replace_the_image_token_embeddings(tiny_model, tiny_config):
    ids = prompt_ids(tiny_config, num_images=2)
    pv = pixels(2)
    out = tiny_model(input_ids=ids, pixel_values=pv, output_hidden_states=True)
    embeddings = out.hidden_states[0][0]
    is_image = ids[0] == tiny_config.image_token_id
    assert torch.equal(embeddings[is_image], out.image_hidden_states.reshape(-1, 64))
    text_embeddings = tiny_model.get_input_embeddings()(ids[0][~is_image])
    assert torch.equal(embeddings[~is_image], text_embeddings)
    assert out.logits.shape == (1, ids.shape[1], tiny_config.text_config.vocab_size)


def test_token_feature_mismatch_names_both_counts(tiny_model, tiny_config):
    ids = prompt_ids(tiny_config, num_images=1)
    with pytest.raises(ValueError, match=r"4 image tokens but 2 image\(s\) give 8 features"):
        tiny_model(input_ids=ids, pixel_values=pixels(2))
    truncated = ids[:, :5]  # cuts through the image tokens
    with pytest.raises(ValueError, match="2 image tokens but 1 image"):
        tiny_model(input_ids=truncated, pixel_values=pixels(1))


@torch.no_grad()
def test_text_only_forward_and_generate(tiny_model):
    ids = torch.tensor([[1, 5, 6, 7, 2, 1]])
    out = tiny_model(input_ids=ids)
    assert out.image_hidden_states is None
    generated = tiny_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 10)


@torch.no_grad()
def test_batch_with_different_image_counts_matches_single_prompts(tiny_model, tiny_config):
    one = prompt_ids(tiny_config, num_images=1, text_after=(7, 8, 9, 2, 1))  # 3 + 4 + 5 tokens
    two = prompt_ids(tiny_config, num_images=2, text_after=(7,))  # 3 + 8 + 1 tokens
    assert one.shape == two.shape
    pv_one, pv_two = pixels(1, seed=1), pixels(2, seed=2)
    batched = tiny_model(input_ids=torch.cat([one, two]), pixel_values=torch.cat([pv_one, pv_two])).logits
    # three images at once take other encoder kernels than one or two, which round differently
    assert_logits_close(batched[0], tiny_model(input_ids=one, pixel_values=pv_one).logits[0], tolerance=1e-4)
    assert_logits_close(batched[1], tiny_model(input_ids=two, pixel_values=pv_two).logits[0], tolerance=1e-4)
    swapped = tiny_model(input_ids=torch.cat([one, two]), pixel_values=torch.cat([pv_two[:1], pv_one, pv_two[1:]]))
    assert not torch.allclose(swapped.logits[0], batched[0], rtol=1e-2, atol=1e-2)  # each image lands in its row


@torch.no_grad()
def test_greedy_generate_equals_uncached_argmax_loop(tiny_model, tiny_config):
    ids, pv = prompt_ids(tiny_config), pixels()
    generated = tiny_model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False)
    sequence = ids
    for _ in range(6):
        logits = tiny_model(input_ids=sequence, pixel_values=pv, use_cache=False).logits
        sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)


@torch.no_grad()
def test_generate_encodes_images_only_on_prefill(tiny_model, tiny_config):
    calls = []
    hook = tiny_model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        tiny_model.generate(input_ids=prompt_ids(tiny_config), pixel_values=pixels(), max_new_tokens=5, do_sample=False)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_labels_give_shifted_cross_entropy_and_gradients_reach_the_encoder(tiny_config):
    torch.manual_seed(0)
    model = FastVLMForConditionalGeneration(tiny_config).train()
    ids, pv = prompt_ids(tiny_config), pixels()
    labels = ids.clone()
    labels[ids == tiny_config.image_token_id] = -100
    out = model(input_ids=ids, pixel_values=pv, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    for part in (model.model.vision_tower.stem, model.model.multi_modal_projector, model.model.language_model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_logits_to_keep_returns_last_positions_only(tiny_model, tiny_config):
    ids, pv = prompt_ids(tiny_config), pixels()
    with torch.no_grad():
        full = tiny_model(input_ids=ids, pixel_values=pv).logits
        last = tiny_model(input_ids=ids, pixel_values=pv, logits_to_keep=1).logits
    assert last.shape[1] == 1 and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_tied_and_untied_heads(tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    tied = FastVLMForConditionalGeneration(FastVLMConfig(vision_config=TINY_VISION_CONFIG, text_config=tiny_text_config(vocab)))
    assert tied.config.tie_word_embeddings is True
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()

    untied_config = FastVLMConfig(vision_config=TINY_VISION_CONFIG, text_config=tiny_text_config(vocab, tie_word_embeddings=False))
    assert untied_config.tie_word_embeddings is False
    untied = FastVLMForConditionalGeneration(untied_config)
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    untied.save_pretrained(tmp_path)
    reloaded = FastVLMForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, untied.lm_head.weight)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.get_input_embeddings().weight)


def test_auto_classes_round_trip_with_identical_logits(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FastVLMConfig)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is FastVLMForConditionalGeneration
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    ids, pv = prompt_ids(tiny_config), pixels()
    with torch.no_grad():
        assert_logits_close(reloaded(input_ids=ids, pixel_values=pv).logits, tiny_model(input_ids=ids, pixel_values=pv).logits)
    base = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(base) is FastVLMModel


def test_from_config_on_meta_device_then_load(tiny_model, tmp_path):
    """transformers 5 builds models on the meta device; every tensor must still come from the checkpoint."""
    tiny_model.save_pretrained(tmp_path)
    with torch.device("meta"):
        meta_model = FastVLMForConditionalGeneration(tiny_model.config)
    assert all(t.device.type == "meta" for t in meta_model.state_dict().values())
    reloaded = FastVLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    for name in ("model.vision_tower.stages.0.blocks.0.mlp.conv.bn.running_var", "model.vision_tower.stages.0.blocks.0.layer_scale.gamma"):
        assert torch.equal(reloaded.state_dict()[name], tiny_model.state_dict()[name])


def test_random_init_is_sane(tiny_config):
    model = FastVLMForConditionalGeneration._from_config(tiny_config)
    state = model.state_dict()
    gamma = state["model.vision_tower.stages.3.blocks.0.layer_scale_1.gamma"]
    assert torch.all(gamma == tiny_config.vision_config.layer_scale_init_value)
    assert torch.all(state["model.vision_tower.stages.0.blocks.0.mlp.conv.bn.running_var"] == 1)
    assert torch.all(state["model.vision_tower.stages.3.blocks.0.norm.weight"] == 1)
    std = state["model.multi_modal_projector.linear_1.weight"].std()
    assert 0.01 < std < 0.03  # initializer_range 0.02


def test_device_map_auto_loads(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto", dtype=torch.float32)
    ids, pv = prompt_ids(tiny_config), pixels()
    with torch.no_grad():
        assert_logits_close(model(input_ids=ids, pixel_values=pv).logits, tiny_model(input_ids=ids, pixel_values=pv).logits)


def count_vision_calls(model):
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("pass_pixels_again", [False, True])
@torch.no_grad()
def test_second_turn_from_the_cache_equals_a_full_prefill_without_encoding_again(
    tiny_model, tiny_config, pass_pixels_again
):
    pv = pixels()
    cache = DynamicCache()
    first = tiny_model.generate(
        input_ids=prompt_ids(tiny_config), pixel_values=pv, max_new_tokens=4, do_sample=False, **{CACHE_NAME: cache}
    )
    follow_up = torch.cat([first, torch.tensor([[2, 1, 9, 10, 11, 2, 1]])], dim=1)
    cached_length = cache.get_seq_length()

    calls, handle = count_vision_calls(tiny_model)
    try:
        second = tiny_model.generate(
            input_ids=follow_up,
            pixel_values=pv if pass_pixels_again else None,
            max_new_tokens=5,
            do_sample=False,
            **{CACHE_NAME: cache},
        )
    finally:
        handle.remove()
    assert calls == []  # the image is in the cache
    assert cache.get_seq_length() > cached_length  # the turn continued from it

    fresh = tiny_model.generate(input_ids=follow_up, pixel_values=pv, max_new_tokens=5, do_sample=False)
    assert torch.equal(second, fresh)


@torch.no_grad()
def test_a_new_image_in_a_follow_up_turn_is_the_only_one_encoded(tiny_model, tiny_config):
    pv = pixels(num_images=2)
    cache = DynamicCache()
    first = tiny_model.generate(
        input_ids=prompt_ids(tiny_config), pixel_values=pv[:1], max_new_tokens=3, do_sample=False, **{CACHE_NAME: cache}
    )
    new_turn = [2, 1, 9] + [tiny_config.image_token_id] * TOKENS_PER_IMAGE + [10, 2, 1]
    follow_up = torch.cat([first, torch.tensor([new_turn])], dim=1)

    calls, handle = count_vision_calls(tiny_model)
    try:
        second = tiny_model.generate(
            input_ids=follow_up, pixel_values=pv, max_new_tokens=4, do_sample=False, **{CACHE_NAME: cache}
        )
    finally:
        handle.remove()
    assert calls == [1]  # one image, the new one

    fresh = tiny_model.generate(input_ids=follow_up, pixel_values=pv, max_new_tokens=4, do_sample=False)
    assert torch.equal(second, fresh)


def test_image_tokens_without_pixel_values_are_refused(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="4 image tokens but no `pixel_values`"):
        tiny_model(input_ids=prompt_ids(tiny_config))


@torch.no_grad()
def test_embeddings_alone_are_taken_as_they_are(tiny_model, tiny_config):
    # vLLM passes only `inputs_embeds`, the image features already at the image positions.
    embeds = tiny_model.get_input_embeddings()(prompt_ids(tiny_config))
    hidden_states = tiny_model.model.language_model(inputs_embeds=embeds).last_hidden_state
    assert torch.equal(tiny_model(inputs_embeds=embeds).logits, tiny_model.lm_head(hidden_states))


def image_sensitive_model(config, seed, num_hidden_layers=None):
    """A tiny FastVLM whose image reaches the logits (see `give_weights_a_working_scale`)."""
    config = copy.deepcopy(config)
    if num_hidden_layers is not None:
        config.text_config.num_hidden_layers = num_hidden_layers
    model = FastVLMForConditionalGeneration(config).eval()
    randomize_non_parameter_state(model)
    give_weights_a_working_scale(model, seed)
    return model


@torch.no_grad()
def test_assisted_decoding_with_an_image_gives_the_main_models_greedy_tokens(tiny_config):
    main = image_sensitive_model(tiny_config, seed=0)
    assistant = image_sensitive_model(tiny_config, seed=1, num_hidden_layers=1)  # a smaller drafter, other weights
    ids, pv = prompt_ids(tiny_config), pixels()
    kwargs = {"max_new_tokens": 8, "do_sample": False}  # 4.57 refuses `min_new_tokens` with an assistant
    expected = main.generate(input_ids=ids, pixel_values=pv, **kwargs)
    assert not torch.equal(expected, main.generate(input_ids=ids, pixel_values=pv.flip(-1), **kwargs))

    calls, handle = count_vision_calls(assistant)
    try:
        assisted = main.generate(input_ids=ids, pixel_values=pv, assistant_model=assistant, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(assisted, expected)
    assert calls == [1]  # the drafter saw the image once, on its first call


@torch.no_grad()
def test_decoding_steps_compile_as_one_graph_with_a_static_cache(tiny_config):
    model = image_sensitive_model(tiny_config, seed=0)
    assert model._can_compile_fullgraph
    kwargs = {"input_ids": prompt_ids(tiny_config), "pixel_values": pixels(), "max_new_tokens": 6,
              "min_new_tokens": 6, "do_sample": False}
    eager = model.generate(**kwargs)
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only, unless told otherwise
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(**kwargs, cache_implementation="static", compile_config=compile_config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # fullgraph: one graph, or an error
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("flag, field", [("output_hidden_states", "hidden_states"), ("output_attentions", "attentions")])
@torch.no_grad()
def test_output_flags_set_on_the_config_are_honoured(tiny_config, flag, field):
    config = copy.deepcopy(tiny_config)
    config._attn_implementation = "eager"  # attention weights need the eager attention
    setattr(config, flag, True)
    model = FastVLMForConditionalGeneration(config).eval()
    output = model(input_ids=prompt_ids(config), pixel_values=pixels())
    assert len(getattr(output, field)) == config.text_config.num_hidden_layers + (field == "hidden_states")
    assert getattr(model(input_ids=prompt_ids(config), pixel_values=pixels(), **{flag: False}), field) is None


@torch.no_grad()
def test_image_features_follow_transformers_output_conventions(tiny_model):
    pv = pixels(2)
    output = tiny_model.get_image_features(pv, output_hidden_states=True)
    assert len(output.hidden_states) == 1 + len(TINY_VISION_CONFIG["depths"])  # the stem, then each stage
    as_tuple = tiny_model.get_image_features(pv, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], output.last_hidden_state) and torch.equal(as_tuple[1], output.pooler_output)


def test_the_output_head_has_the_language_models_tensor_parallel_plan():
    # Qwen2 shards its input embedding; a tied head without a plan of its own mixes sharded and whole tensors.
    # (test_tensor_parallel.py runs it.)
    assert FastVLMForConditionalGeneration._tp_plan == {"lm_head": Qwen2ForCausalLM._tp_plan["lm_head"]}


class Joined(Exception):
    """Raised by `JoinRecorder` once the image features have joined the text embeddings."""


class JoinRecorder(torch.overrides.TorchFunctionMode):
    """Records the (device, dtype) of the text embeddings, the image features and the mask at the `masked_scatter`
    that joins them, then stops the forward pass there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.masked_scatter:
            embeds, mask, source = args[:3]
            self.join = {"embeds": (embeds.device.type, embeds.dtype), "features": (source.device.type, source.dtype),
                         "mask": mask.device.type}  # fmt: skip
            raise Joined
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_image_features_move_to_the_text_embeddings_device_and_dtype(tiny_config):
    # The language model on another device than the tower (a device map): here the meta device, in bfloat16, and the
    # tower on the CPU in float32. Meta tensors take operands from any device, so the join is checked by recording.
    model = FastVLMForConditionalGeneration(copy.deepcopy(tiny_config)).eval()
    model.model.language_model.to("meta", torch.bfloat16)
    recorder = JoinRecorder()
    with pytest.raises(Joined), recorder:
        model(input_ids=prompt_ids(tiny_config), pixel_values=pixels())
    assert next(model.model.vision_tower.parameters()).device.type == "cpu"
    assert recorder.join == {"embeds": ("meta", torch.bfloat16), "features": ("meta", torch.bfloat16), "mask": "meta"}


@torch.no_grad()
def test_return_dict_false_or_unset_on_the_config_gives_the_outputs_as_tuples(tiny_config):
    model = FastVLMForConditionalGeneration(copy.deepcopy(tiny_config)).eval()
    inputs = {"input_ids": prompt_ids(model.config), "pixel_values": pixels()}
    for module, output in [(model, model(**inputs)), (model.model, model.model(**inputs))]:
        as_tuple = module(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(output.to_tuple())
        for value, expected in zip(as_tuple, output.to_tuple()):
            assert torch.equal(value, expected) if isinstance(expected, torch.Tensor) else type(value) is type(expected)
    model.config.return_dict = False
    assert torch.equal(model(**inputs)[0], model(**inputs, return_dict=True).logits)
    assert torch.equal(model.get_image_features(inputs["pixel_values"])[1], model.model(**inputs)[-1])

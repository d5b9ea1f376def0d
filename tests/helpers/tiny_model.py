"""The tiny FastVLM of the tests: FastViTHD's real topology at toy widths, a two-layer Qwen2, and weights
drawn so that the outputs depend on the inputs."""

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


def save_decisive_checkpoint(config, processor, path):
    """Saves, to `path`, the FastVLM of `config` (seed 0) with `give_weights_decisive_answers`' weights, and
    `processor`; returns `path`."""
    import torch

    from fastvlm_hf import FastVLMForConditionalGeneration

    torch.manual_seed(0)
    model = FastVLMForConditionalGeneration(config).eval()
    give_weights_decisive_answers(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path

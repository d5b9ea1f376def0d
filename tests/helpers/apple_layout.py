"""Apple's released checkpoint layout, written out by hand from the list of the Hub checkpoints' keys and shapes (the
table of `docs/checkpoint-layouts.md`, "Weights"), for any tower and language
model size. It is an independent source: tests build Apple-layout checkpoints from it and check the package's key map
against it, key for key and shape for shape."""

APPLE_VISION_PREFIX = "model.vision_tower.vision_tower.model."
OUR_VISION_PREFIX = "model.vision_tower."
REPMIXER_STAGES = (0, 1, 2)  # FastViTHD's first three stages mix tokens with RepMixer, the last two with attention
NETWORK_INDEX_OF_BLOCKS = (0, 2, 4, 7, 10)  # Apple's `network` list: each stage's blocks...
NETWORK_INDEX_OF_DOWNSAMPLE = {1: 1, 2: 3, 3: 5, 4: 8}  # ...the patch embedding into stages 1-4...
NETWORK_INDEX_OF_POS_EMB = {3: 6, 4: 9}  # ...and the conditional positional encoding of the attention stages
MLP_RATIO = 4  # ConvFFN hidden width / block width
SE_RATIO = 1 / 16  # squeeze-excite width / output width of the final convolution


def apple_layout(vision, text) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """{Apple's key: (this package's key, shape)} of a whole FastVLM checkpoint; `None` for the CLIP head Apple's
    checkpoints store and the model never uses. `vision` and `text` are the two sub-configs."""
    layout = {}

    def vision_entry(apple_key, our_key, shape):
        layout[APPLE_VISION_PREFIX + apple_key] = (OUR_VISION_PREFIX + our_key, tuple(shape))

    def conv(apple_name, our_name, out_channels, in_per_group, kernel, bias=True):
        vision_entry(f"{apple_name}.weight", f"{our_name}.weight", (out_channels, in_per_group, kernel, kernel))
        if bias:
            vision_entry(f"{apple_name}.bias", f"{our_name}.bias", (out_channels,))

    def conv_ffn(apple_block, our_block, width):
        hidden = width * MLP_RATIO
        conv(f"{apple_block}.convffn.conv.conv", f"{our_block}.mlp.conv.conv", width, 1, 7, bias=False)
        for statistic in ("weight", "bias", "running_mean", "running_var"):
            vision_entry(f"{apple_block}.convffn.conv.bn.{statistic}", f"{our_block}.mlp.conv.bn.{statistic}", (width,))
        vision_entry(f"{apple_block}.convffn.conv.bn.num_batches_tracked", f"{our_block}.mlp.conv.bn.num_batches_tracked", ())
        conv(f"{apple_block}.convffn.fc1", f"{our_block}.mlp.fc1", hidden, width, 1)
        conv(f"{apple_block}.convffn.fc2", f"{our_block}.mlp.fc2", width, hidden, 1)

    stem_width = vision.embed_dims[0]
    conv("patch_embed.0.reparam_conv", "stem.0.reparam_conv", stem_width, vision.num_channels, 3)
    conv("patch_embed.1.reparam_conv", "stem.1.reparam_conv", stem_width, 1, 3)
    conv("patch_embed.2.reparam_conv", "stem.2.reparam_conv", stem_width, stem_width, 1)

    for stage, (depth, width) in enumerate(zip(vision.depths, vision.embed_dims)):
        if stage in NETWORK_INDEX_OF_DOWNSAMPLE:
            network = NETWORK_INDEX_OF_DOWNSAMPLE[stage]
            ours = f"stages.{stage}.downsample.proj"
            conv(f"network.{network}.proj.0.lkb_reparam", f"{ours}.0.reparam_conv", width, 1, 7)
            conv(f"network.{network}.proj.1.reparam_conv", f"{ours}.1.reparam_conv", width, width, 1)
        if stage in NETWORK_INDEX_OF_POS_EMB:
            network = NETWORK_INDEX_OF_POS_EMB[stage]
            conv(f"network.{network}.reparam_conv", f"stages.{stage}.pos_emb.reparam_conv", width, 1, 7)
        for block in range(depth):
            apple_block = f"network.{NETWORK_INDEX_OF_BLOCKS[stage]}.{block}"
            our_block = f"stages.{stage}.blocks.{block}"
            if stage in REPMIXER_STAGES:
                conv(f"{apple_block}.token_mixer.reparam_conv", f"{our_block}.token_mixer.reparam_conv", width, 1, 3)
                vision_entry(f"{apple_block}.layer_scale", f"{our_block}.layer_scale.gamma", (width, 1, 1))
            else:
                vision_entry(f"{apple_block}.norm.weight", f"{our_block}.norm.weight", (width,))
                vision_entry(f"{apple_block}.norm.bias", f"{our_block}.norm.bias", (width,))
                vision_entry(f"{apple_block}.token_mixer.qkv.weight", f"{our_block}.token_mixer.qkv.weight", (3 * width, width))
                vision_entry(f"{apple_block}.token_mixer.proj.weight", f"{our_block}.token_mixer.proj.weight", (width, width))
                vision_entry(f"{apple_block}.token_mixer.proj.bias", f"{our_block}.token_mixer.proj.bias", (width,))
                vision_entry(f"{apple_block}.layer_scale_1", f"{our_block}.layer_scale_1.gamma", (width, 1, 1))
                vision_entry(f"{apple_block}.layer_scale_2", f"{our_block}.layer_scale_2.gamma", (width, 1, 1))
            conv_ffn(apple_block, our_block, width)

    output_width = vision.hidden_size
    squeezed = int(output_width * SE_RATIO)
    conv("conv_exp.reparam_conv", "final_conv.reparam_conv", output_width, 1, 3)  # one group per input channel
    conv("conv_exp.se.reduce", "final_conv.se.fc1", squeezed, output_width, 1)
    conv("conv_exp.se.expand", "final_conv.se.fc2", output_width, squeezed, 1)
    layout[APPLE_VISION_PREFIX + "head.proj"] = (None, (output_width, 768))

    width = text.hidden_size
    layout["model.mm_projector.0.weight"] = ("model.multi_modal_projector.linear_1.weight", (width, output_width))
    layout["model.mm_projector.0.bias"] = ("model.multi_modal_projector.linear_1.bias", (width,))
    layout["model.mm_projector.2.weight"] = ("model.multi_modal_projector.linear_2.weight", (width, width))
    layout["model.mm_projector.2.bias"] = ("model.multi_modal_projector.linear_2.bias", (width,))

    head_dim = width // text.num_attention_heads
    kv_width = head_dim * text.num_key_value_heads
    layout["model.embed_tokens.weight"] = ("model.language_model.embed_tokens.weight", (text.vocab_size, width))
    for layer in range(text.num_hidden_layers):
        apple, ours = f"model.layers.{layer}", f"model.language_model.layers.{layer}"
        shapes = {
            "self_attn.q_proj.weight": (width, width),
            "self_attn.q_proj.bias": (width,),
            "self_attn.k_proj.weight": (kv_width, width),
            "self_attn.k_proj.bias": (kv_width,),
            "self_attn.v_proj.weight": (kv_width, width),
            "self_attn.v_proj.bias": (kv_width,),
            "self_attn.o_proj.weight": (width, width),
            "mlp.gate_proj.weight": (text.intermediate_size, width),
            "mlp.up_proj.weight": (text.intermediate_size, width),
            "mlp.down_proj.weight": (width, text.intermediate_size),
            "input_layernorm.weight": (width,),
            "post_attention_layernorm.weight": (width,),
        }
        for name, shape in shapes.items():
            layout[f"{apple}.{name}"] = (f"{ours}.{name}", shape)
    layout["model.norm.weight"] = ("model.language_model.norm.weight", (width,))
    layout["lm_head.weight"] = ("lm_head.weight", (text.vocab_size, width))  # stored even when the config ties it
    return layout

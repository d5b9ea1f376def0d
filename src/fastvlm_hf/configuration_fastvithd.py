"""Configuration of the FastViTHD vision encoder."""

from __future__ import annotations

from .compat import PretrainedConfig

TOKEN_MIXERS = ("repmixer", "attention")


class FastViTHDConfig(PretrainedConfig):
    r"""
    Configuration of [`FastViTHDModel`], the hybrid convolution/attention image encoder of FastVLM, in the
    re-parameterised (inference) form in which Apple released its weights. The defaults are FastViTHD as used by
    FastVLM: a 1024×1024 image becomes a 3072×16×16 feature map, i.e. 256 tokens.

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input image.
        image_size (`int`, *optional*, defaults to 1024):
            Resolution the checkpoint was trained at. Any side that is a multiple of `patch_size` works.
        depths (`list[int]`, *optional*, defaults to `[2, 12, 24, 4, 2]`):
            Number of blocks in each stage.
        embed_dims (`list[int]`, *optional*, defaults to `[96, 192, 384, 768, 1536]`):
            Channels of each stage. The stem outputs `embed_dims[0]` channels.
        mlp_ratios (`list[float]`, *optional*, defaults to `[4.0] * 5`):
            Hidden width of each stage's ConvFFN relative to the stage width.
        token_mixers (`list[str]`, *optional*, defaults to `["repmixer"] * 3 + ["attention"] * 2`):
            `"repmixer"` (a re-parameterised depthwise convolution) or `"attention"` per stage.
        pos_embeds (`list[bool]`, *optional*, defaults to `[False, False, False, True, True]`):
            Whether a stage starts with a conditional positional encoding (RepCPE).
        downsamples (`list[bool]`, *optional*, defaults to `[False, True, True, True, True]`):
            Whether a stage starts with a patch embedding that halves the resolution and widens the channels.
        stem_kernel_size (`int`, *optional*, defaults to 3):
            Kernel of the two strided stem convolutions.
        stem_stride (`int`, *optional*, defaults to 2):
            Stride of each of the two strided stem convolutions.
        repmixer_kernel_size (`int`, *optional*, defaults to 3):
            Kernel of the RepMixer depthwise convolution.
        pos_embed_kernel_size (`int`, *optional*, defaults to 7):
            Kernel of the RepCPE depthwise convolution.
        downsample_kernel_size (`int`, *optional*, defaults to 7):
            Kernel of the grouped patch-embedding convolution.
        downsample_stride (`int`, *optional*, defaults to 2):
            Stride of each patch embedding.
        convffn_kernel_size (`int`, *optional*, defaults to 7):
            Kernel of the ConvFFN depthwise convolution.
        attention_head_dim (`int`, *optional*, defaults to 32):
            Channels per attention head; a stage of width `d` has `d // attention_head_dim` heads.
        qkv_bias (`bool`, *optional*, defaults to `False`):
            Whether the attention's query/key/value projection has a bias.
        final_conv_kernel_size (`int`, *optional*, defaults to 3):
            Kernel of the grouped convolution that widens the last stage to `hidden_size`.
        hidden_size (`int`, *optional*, defaults to 3072):
            Channels of the output feature map (the features handed to the language model's projector).
        se_ratio (`float`, *optional*, defaults to 0.0625):
            Width of the squeeze-excite bottleneck relative to `hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the convolutional blocks and ConvFFNs (exact GELU by default).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the channel LayerNorm in front of each attention token mixer.
        batch_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the ConvFFN BatchNorm.
        layer_scale_init_value (`float`, *optional*, defaults to 1e-5):
            Initial value of the layer scales (used only for randomly initialised models).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of convolution and linear weights.

    Example:

    ```python
    >>> import fastvlm_hf
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_config(fastvlm_hf.FastViTHDConfig())
    >>> model.config.patch_size
    64
    ```"""

    model_type = "fastvithd"

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 1024,
        depths: list[int] | None = None,
        embed_dims: list[int] | None = None,
        mlp_ratios: list[float] | None = None,
        token_mixers: list[str] | None = None,
        pos_embeds: list[bool] | None = None,
        downsamples: list[bool] | None = None,
        stem_kernel_size: int = 3,
        stem_stride: int = 2,
        repmixer_kernel_size: int = 3,
        pos_embed_kernel_size: int = 7,
        downsample_kernel_size: int = 7,
        downsample_stride: int = 2,
        convffn_kernel_size: int = 7,
        attention_head_dim: int = 32,
        qkv_bias: bool = False,
        final_conv_kernel_size: int = 3,
        hidden_size: int = 3072,
        se_ratio: float = 0.0625,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        batch_norm_eps: float = 1e-5,
        layer_scale_init_value: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.image_size = image_size
        self.depths = list(depths if depths is not None else [2, 12, 24, 4, 2])
        self.embed_dims = list(embed_dims if embed_dims is not None else [96, 192, 384, 768, 1536])
        num_stages = len(self.depths)
        self.mlp_ratios = list(mlp_ratios if mlp_ratios is not None else [4.0] * num_stages)
        self.token_mixers = list(token_mixers if token_mixers is not None else ["repmixer"] * 3 + ["attention"] * 2)
        self.pos_embeds = list(pos_embeds if pos_embeds is not None else [False, False, False, True, True])
        self.downsamples = list(downsamples if downsamples is not None else [False] + [True] * (num_stages - 1))
        self.stem_kernel_size = stem_kernel_size
        self.stem_stride = stem_stride
        self.repmixer_kernel_size = repmixer_kernel_size
        self.pos_embed_kernel_size = pos_embed_kernel_size
        self.downsample_kernel_size = downsample_kernel_size
        self.downsample_stride = downsample_stride
        self.convffn_kernel_size = convffn_kernel_size
        self.attention_head_dim = attention_head_dim
        self.qkv_bias = qkv_bias
        self.final_conv_kernel_size = final_conv_kernel_size
        self.hidden_size = hidden_size
        self.se_ratio = se_ratio
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.batch_norm_eps = batch_norm_eps
        self.layer_scale_init_value = layer_scale_init_value
        self.initializer_range = initializer_range
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        per_stage = {
            "embed_dims": self.embed_dims,
            "mlp_ratios": self.mlp_ratios,
            "token_mixers": self.token_mixers,
            "pos_embeds": self.pos_embeds,
            "downsamples": self.downsamples,
        }
        for name, values in per_stage.items():
            if len(values) != len(self.depths):
                raise ValueError(f"`{name}` has {len(values)} entries but `depths` has {len(self.depths)} stages.")
        unknown = sorted(set(self.token_mixers) - set(TOKEN_MIXERS))
        if unknown:
            raise ValueError(f"Unknown token mixer(s) {unknown}; expected one of {list(TOKEN_MIXERS)}.")
        for dim, mixer in zip(self.embed_dims, self.token_mixers):
            if mixer == "attention" and dim % self.attention_head_dim:
                raise ValueError(f"Attention stage width {dim} is not a multiple of head dim {self.attention_head_dim}.")
        if self.hidden_size % self.embed_dims[-1]:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of the last stage width ({self.embed_dims[-1]}): "
                "the final convolution is grouped by input channel."
            )

    @property
    def patch_size(self) -> int:
        """Total stride: one output token per `patch_size × patch_size` pixels."""
        return self.stem_stride**2 * self.downsample_stride ** sum(self.downsamples)

    @property
    def se_hidden_size(self) -> int:
        return int(self.hidden_size * self.se_ratio)

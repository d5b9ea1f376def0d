"""Convert a FastVLM checkpoint of any layout into this package's layout, or into transformers' native one.

The source is a Hub id or a local folder holding one of the three layouts of `fastvlm_hf.checkpoints`: Apple's
(`apple/FastVLM-0.5B`, `model_type: "llava_qwen2"`), transformers' native (`"fast_vlm"`) or this package's
(`"fastvlm"`). The output is a folder with sharded safetensors, `config.json`, `generation_config.json` (ending at
`<|im_end|>`), the tokenizer with its `<image>` token, the processor config and `chat_template.jinja`.

    python conversion/convert_checkpoint.py apple/FastVLM-0.5B FastVLM-0.5B-hf --verify
    python conversion/convert_checkpoint.py apple/FastVLM-0.5B FastVLM-0.5B-native --to transformers --verify

`--to transformers` writes what transformers' own `FastVlmForConditionalGeneration` loads (5.x, with timm): timm's key
names, a `fast_vlm` config and a `LlavaProcessor` (whose CLIP image processor crops instead of padding).
`--verify` reloads the result and compares its float32 logits with the source's on a test image and prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from PIL import Image
from safetensors.torch import save_file
import transformers
from transformers import CLIPImageProcessor, GenerationConfig, LlavaProcessor

from fastvlm_hf import FastVLMForConditionalGeneration, FastVLMProcessor, checkpoints

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ("fastvlm", "transformers")
END_OF_TURN = "<|im_end|>"
VERIFY_TOLERANCE = 1e-5


def convert(source: str, output: str | Path, to: str = "fastvlm", dtype: str = "auto", max_shard_size: str = "5GB"):
    """Loads `source` (any layout) and writes it to `output` in the layout `to` ("fastvlm" or "transformers")."""
    model = FastVLMForConditionalGeneration.from_pretrained(source, dtype=DTYPES[dtype])
    processor = FastVLMProcessor.from_pretrained(source)
    model.generation_config = generation_config(model, processor.tokenizer)
    output = Path(output)
    if to == "fastvlm":
        model.save_pretrained(output, max_shard_size=max_shard_size)
        processor.save_pretrained(output)
    else:
        save_transformers_layout(model, processor, output, max_shard_size)


def generation_config(model: FastVLMForConditionalGeneration, tokenizer) -> GenerationConfig:
    """Greedy decoding that ends at the end of the assistant's turn."""
    text_config = model.config.get_text_config(decoder=True)
    return GenerationConfig(
        bos_token_id=getattr(text_config, "bos_token_id", None),
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN),
        pad_token_id=tokenizer.pad_token_id,
    )


def save_transformers_layout(model, processor, output: Path, max_shard_size: str) -> None:
    """Weights under timm's names, a `fast_vlm` config.json and a `LlavaProcessor`, as transformers' native model
    saves them."""
    if not hasattr(transformers, "FastVlmConfig"):
        raise SystemExit(
            f"--to transformers needs transformers 5.x, which has a native fast_vlm; this is {transformers.__version__}."
        )
    output.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict()
    if model.config.tie_word_embeddings:
        del state_dict["lm_head.weight"]  # tied: transformers restores it from the input embedding
    save_sharded(checkpoints.from_fastvlm_state_dict(state_dict, checkpoints.TRANSFORMERS), output, max_shard_size)
    config = transformers.FastVlmConfig(**checkpoints.transformers_config_kwargs(model.config))
    config.architectures = ["FastVlmForConditionalGeneration"]
    config.dtype = model.dtype
    config.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    side = processor.image_processor.size["height"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.image_processor.patch_size,
        vision_feature_select_strategy="full",
        chat_template=processor.chat_template,
    ).save_pretrained(output)


def save_sharded(state_dict: dict[str, torch.Tensor], output: Path, max_shard_size: str) -> None:
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        shard = {key: state_dict[key].contiguous() for key in keys}
        save_file(shard, output / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def verify(source: str, output: str | Path) -> float:
    """The largest difference between the float32 logits of `source` and `output` on a test image and prompt;
    raises if it exceeds `VERIFY_TOLERANCE`."""
    processor = FastVLMProcessor.from_pretrained(source)
    inputs = verification_inputs(processor)
    logits = []
    for checkpoint in (source, output):
        model = FastVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    difference = (logits[0] - logits[1]).abs().max().item()
    if difference > VERIFY_TOLERANCE:
        raise RuntimeError(
            f"The float32 logits of {output} differ from those of {source} by up to {difference:.3g} "
            f"(tolerance {VERIFY_TOLERANCE}); with a lower --dtype than the source's, this is the rounding."
        )
    return difference


def verification_inputs(processor: FastVLMProcessor) -> dict[str, torch.Tensor]:
    """A prompt with one image: a fixed random picture, not square, so that the padding shows."""
    side = processor.image_processor.size["height"]
    pixels = np.random.default_rng(0).integers(0, 256, size=(side, side * 3 // 4, 3), dtype=np.uint8)
    content = [{"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": "Describe the image."}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Hub id or local folder, in Apple's, transformers' or this package's layout")
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--to", choices=TARGETS, default="fastvlm", help="layout to write (default: fastvlm)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights' dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument("--verify", action="store_true", help=f"fail unless float32 logits agree to {VERIFY_TOLERANCE}")
    args = parser.parse_args(argv)
    convert(args.source, args.output, to=args.to, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"Wrote {args.output} ({args.to} layout).")
    if args.verify:
        print(f"Verified: float32 logits agree to {verify(args.source, args.output):.3g}.")


if __name__ == "__main__":
    sys.exit(main())

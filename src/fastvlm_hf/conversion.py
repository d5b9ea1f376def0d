"""Convert a FastVLM checkpoint of any layout into this package's layout, transformers' native one or Apple's.

The source is a Hub id or a local folder holding one of the three layouts of `fastvlm_hf.checkpoints`: Apple's
(`apple/FastVLM-0.5B`, `model_type: "llava_qwen2"`), transformers' native (`"fast_vlm"`) or this package's
(`"fastvlm"`). The output is a folder with sharded safetensors, `config.json`, `generation_config.json` (ending at
`<|im_end|>`), the tokenizer with its `<image>` token, the processor config, `chat_template.jinja` and a model card
(`README.md`, see `fastvlm_hf.model_card`).

    fastvlm-hf convert apple/FastVLM-0.5B FastVLM-0.5B-hf --verify
    fastvlm-hf convert apple/FastVLM-0.5B FastVLM-0.5B-native --to transformers --verify
    fastvlm-hf convert my-finetuned-fastvlm my-finetuned-fastvlm-apple --to apple --verify
    fastvlm-hf convert apple/FastVLM-0.5B FastVLM-0.5B-hf --verify --push-to-hub me/FastVLM-0.5B-hf

(`fastvlm_hf.cli` parses these arguments; `python conversion/convert_checkpoint.py` takes the same ones.)

`--to transformers` writes what transformers' own `FastVlmForConditionalGeneration` loads (5.x, with timm): timm's key
names, a `fast_vlm` config and a `LlavaProcessor` (whose CLIP image processor crops instead of padding).
`--to apple` writes Apple's own layout back (`llava_qwen2`), e.g. for a fine-tuned model that Apple's Core ML and MLX
export scripts are to take.
`--verify` reloads the result and compares its float32 logits with the source's on a test image and prompt.
`--push-to-hub REPO` uploads the folder to the Hub model repo REPO (created if missing), after `--verify` passed.

The output folder appears only once complete (and verified, with `--verify`): the conversion writes a hidden sibling
folder and renames it at the end, so that a failure or an interruption leaves nothing behind; the hidden folder of a
run that was killed outright is removed by the next run for the same output (see `output_folder`). An existing
output folder is replaced only with `--overwrite`, and only then; an output that is, holds or lies inside the source
folder is refused.

Weights are read safely: safetensors, or `.bin` files through `torch.load(weights_only=True)` (transformers'
`from_pretrained` default on 4.57 and 5.x, passed explicitly here), which refuses pickled objects other than tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from huggingface_hub import HfApi, split_torch_state_dict_into_shards
from huggingface_hub.utils import tqdm
from PIL import Image
from safetensors.torch import save_file
from transformers import GenerationConfig, LlavaProcessor

from . import checkpoints, model_card
from .compat import HAS_NATIVE_FAST_VLM
from .modeling_fastvlm import FastVLMForConditionalGeneration
from .output_folder import check_output, complete_or_nothing
from .processing_fastvlm import FastVLMProcessor

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ("fastvlm", "transformers", "apple")
END_OF_TURN = "<|im_end|>"
VERIFY_TOLERANCE = 1e-5


class ConversionError(RuntimeError):
    """A conversion that cannot be done or did not come out right; the message says why and what to do."""


def convert(
    source: str,
    output: str | Path,
    to: str = "fastvlm",
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    repo_id: str | None = None,
    *,
    verify: bool = False,
    overwrite: bool = False,
    local_files_only: bool = False,
) -> float | None:
    """Loads `source` (any layout) and writes it to `output` in the layout `to` ("fastvlm", "transformers" or "apple"),
    with a model card that names the model `repo_id` (default: the output folder's name). With `verify`, the written
    model's logits must match the source's (see `verify`, whose result this returns) before `output` appears.

    `output` appears complete or not at all (see the module's documentation); it may be an empty folder, and any other
    existing one only with `overwrite`. `local_files_only`: read a Hub `source` from the local cache only."""
    if to not in TARGETS:
        raise ConversionError(f"Unknown target layout {to!r}: choose one of {', '.join(TARGETS)}.")
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if to == "transformers" and not HAS_NATIVE_FAST_VLM:
        raise ConversionError(
            f"--to transformers needs transformers 5.x, which has a native fast_vlm; this is {transformers.__version__}."
        )
    try:
        split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)  # reads the size, before any loading
    except ValueError as error:
        raise ConversionError(f"Bad --max-shard-size {max_shard_size!r}: {error}") from error
    output = Path(output)
    check_output(source, output, overwrite, error=ConversionError, what="conversion")
    model = load_model(source, DTYPES[dtype], local_files_only=local_files_only)
    processor = FastVLMProcessor.from_pretrained(source, local_files_only=local_files_only)
    model.generation_config = generation_config(model, processor.tokenizer)
    savers = {"fastvlm": save_fastvlm_layout, "transformers": save_transformers_layout, "apple": save_apple_layout}
    with complete_or_nothing(output) as folder:
        savers[to](model, processor, folder, max_shard_size)
        card = model_card.render(
            model.config,
            repo_id=repo_id or output.resolve().name,
            source=source,
            layout=to,
            num_parameters=model.num_parameters(),
            dtype=str(model.dtype).removeprefix("torch."),
        )
        (folder / "README.md").write_text(card, encoding="utf-8")
        del model  # the verification loads two more
        return _verify(source, folder, local_files_only, name=output) if verify else None


def load_model(source: str, dtype, **kwargs) -> FastVLMForConditionalGeneration:
    """The model of `source`, with `.bin` weights read by `torch.load(weights_only=True)`; a `.bin` that holds other
    pickled objects is refused with a `ConversionError`."""
    try:
        return FastVLMForConditionalGeneration.from_pretrained(source, dtype=dtype, weights_only=True, **kwargs)
    except (OSError, pickle.UnpicklingError) as error:
        if not _caused_by_unpickling(error):
            raise
        raise ConversionError(
            f"Refusing to read the weights of {source}: a .bin file there holds pickled Python objects other than "
            "tensors, which could run code when loaded. Convert a safetensors copy of the checkpoint, or one from a "
            "source you trust re-saved with safetensors."
        ) from error


def _caused_by_unpickling(error: BaseException | None) -> bool:
    # transformers 5 lets torch's UnpicklingError through; 4.57 raises an OSError while handling it.
    while error is not None:
        if isinstance(error, pickle.UnpicklingError):
            return True
        error = error.__cause__ or error.__context__
    return False


def generation_config(model: FastVLMForConditionalGeneration, tokenizer) -> GenerationConfig:
    """Greedy decoding that ends at the end of the assistant's turn."""
    text_config = model.config.get_text_config(decoder=True)
    return GenerationConfig(
        bos_token_id=getattr(text_config, "bos_token_id", None),
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN),
        pad_token_id=tokenizer.pad_token_id,
    )


def _state_dict_to_save(model) -> dict[str, torch.Tensor]:
    state_dict = model.state_dict()
    if model.config.tie_word_embeddings:
        del state_dict["lm_head.weight"]  # tied: from_pretrained restores it from the input embedding
    return state_dict


def save_fastvlm_layout(model, processor, output: Path, max_shard_size: int | str) -> None:
    """Weights, config and processor as `save_pretrained` writes them, in this package's layout."""
    save_sharded(_state_dict_to_save(model), output, max_shard_size)
    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    processor.save_pretrained(output)


def save_transformers_layout(model, processor, output: Path, max_shard_size: int | str) -> None:
    """Weights under timm's names, a `fast_vlm` config.json and a `LlavaProcessor`, as transformers' native model
    saves them."""
    state_dict = checkpoints.from_fastvlm_state_dict(_state_dict_to_save(model), checkpoints.TRANSFORMERS)
    save_sharded(state_dict, output, max_shard_size)
    config = transformers.FastVlmConfig(**checkpoints.transformers_config_kwargs(model.config))
    config.architectures = ["FastVlmForConditionalGeneration"]
    config.dtype = model.dtype
    config.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    side = processor.image_processor.size["height"]
    # From transformers 5.x on, CLIPImageProcessor needs torchvision; without it the name gives CLIPImageProcessorPil,
    # with a warning. That class writes the same processor config, with or without torchvision.
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_processor_class(
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


def save_apple_layout(model, processor, output: Path, max_shard_size: int | str) -> None:
    """Weights under Apple's names and Apple's flat `llava_qwen2` config.json, as Apple's Hub repos hold them, so that
    Apple's own code (its predict.py, its Core ML and MLX export scripts) takes the model; the tokenizer with its
    `<image>` token, no processor files (Apple's repos have none).

    Like Apple's, the weights include `lm_head.weight` even when the config ties it to the input embedding. They do not
    include the CLIP projection head of Apple's image tower (`...vision_tower.vision_tower.model.head.proj`): FastVLM
    never uses it and drops it on loading."""
    state_dict = model.state_dict()
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"].clone()  # its own storage, even when tied
    save_sharded(checkpoints.from_fastvlm_state_dict(state_dict, checkpoints.APPLE), output, max_shard_size)
    config = checkpoints.apple_config_dict(model.config, dtype=str(model.dtype).removeprefix("torch."))
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(output)
    processor.tokenizer.save_pretrained(output)


def save_sharded(state_dict: dict[str, torch.Tensor], output: Path, max_shard_size: int | str) -> None:
    """Safetensors shards of at most `max_shard_size`, with an index when there is more than one; a progress bar on
    stderr counts the tensors written (`HF_HUB_DISABLE_PROGRESS_BARS=1` hides it)."""
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    with tqdm(total=len(state_dict), unit="tensor", desc="Writing weights", file=sys.stderr) as progress:
        for filename, keys in split.filename_to_tensors.items():
            shard = {key: state_dict[key].contiguous() for key in keys}
            save_file(shard, output / filename, metadata={"format": "pt"})
            progress.update(len(keys))
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def verify(source: str, output: str | Path, local_files_only: bool = False) -> float:
    """The largest difference between the float32 logits of `source` and `output` on a test image and prompt,
    relative to the largest logit; raises a `ConversionError` if it exceeds `VERIFY_TOLERANCE`. (Relative: the same
    weights can round differently in float32 once reloaded, by more than 1e-5 on logits of a real model's size.)"""
    return _verify(source, output, local_files_only, name=output)


def _verify(source: str, output: str | Path, local_files_only: bool, name: str | Path) -> float:
    processor = FastVLMProcessor.from_pretrained(source, local_files_only=local_files_only)
    inputs = verification_inputs(processor)
    logits = []
    for checkpoint, local in ((source, local_files_only), (output, True)):
        model = load_model(checkpoint, torch.float32, local_files_only=local).eval()
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    difference = ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item()
    if difference > VERIFY_TOLERANCE:
        raise ConversionError(
            f"The float32 logits of {name} differ from those of {source} by up to {difference:.3g} of the largest "
            f"logit (tolerance {VERIFY_TOLERANCE}); with a lower --dtype than the source's, this is the rounding."
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


def push_to_hub(output: str | Path, repo_id: str) -> str:
    """Uploads the folder `output` to the Hub model repo `repo_id`, creating the repo if needed; returns its URL.
    Needs a token with write access (`hf auth login` or `HF_TOKEN`)."""
    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(
        folder_path=str(output),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload FastVLM converted with fastvlm-hf",
    )
    return str(url)

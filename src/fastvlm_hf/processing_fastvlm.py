"""Processor for FastVLM: a Qwen2 tokenizer, a [`FastVLMImageProcessor`] and a ChatML chat template."""

import re
from typing import Any

import torch  # noqa: F401  (resolves the "torch.device" hints of the kwargs TypedDicts below)
from tokenizers import AddedToken
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.tokenization_utils_base import TextInput
from typing_extensions import Unpack

from . import checkpoints
from .compat import PROCESSOR_CLASS_ATTRIBUTES
from .image_processing_fastvlm import FastVLMImageProcessor, FastVLMImageProcessorKwargs, flatten_images, size_dict

# ChatML, as Apple's `qwen_2` conversation: a default system message when the conversation has none; in each message
# the images first, as consecutive `<image>` placeholders, then a newline and the text parts, one per line. The content
# parts are read in a loop over `message['content']`, which is how vLLM recognises a template that takes them as they
# are (its "openai" content format), images included. It keeps to what the Jinja of transformers.js runs too (no
# string repetition), so that ONNX exports (`fastvlm_hf.export`) carry it as it is.
DEFAULT_CHAT_TEMPLATE = r"""{%- if messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- set parts = namespace(images=0, texts=[]) -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}
{%- set parts.images = parts.images + 1 -%}
{%- elif part['type'] == 'text' -%}
{%- set parts.texts = parts.texts + [part['text']] -%}
{%- endif -%}
{%- endfor -%}
{%- for _ in range(parts.images) -%}{{- '<image>' -}}{%- endfor -%}
{%- if parts.images and parts.texts -%}
{{- '\n' -}}
{%- endif -%}
{{- parts.texts | join('\n') -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


class FastVLMProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: FastVLMImageProcessorKwargs
    _defaults = {}  # read by 4.57's `_merge_kwargs`; TypedDicts do not inherit it


class FastVLMProcessor(ProcessorMixin):
    r"""
    Builds FastVLM's inputs from text and images: each `<image>` placeholder in the text becomes one image token per
    output cell of the vision encoder, `(height // patch_size) * (width // patch_size)` of them (256 for 1024x1024
    images), and the images become `pixel_values`.

    Args:
        image_processor ([`FastVLMImageProcessor`]):
            The image processor; its `patch_size` sets the number of image tokens.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The Qwen2 tokenizer; it must know `image_token`.
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to [`DEFAULT_CHAT_TEMPLATE`], the ChatML layout of Apple's reference.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder in the text, which is also the token repeated for each image feature.

    Example:

    ```python
    >>> import fastvlm_hf
    >>> from PIL import Image
    >>> from transformers import AutoProcessor

    >>> processor = AutoProcessor.from_pretrained("apple/FastVLM-0.5B")
    >>> image = Image.new("RGB", (640, 480))
    >>> content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
    >>> inputs = processor.apply_chat_template(
    ...     [{"role": "user", "content": content}],
    ...     add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ... )
    >>> inputs["input_ids"].eq(processor.image_token_id).sum().item(), inputs["pixel_values"].shape
    (256, torch.Size([1, 3, 1024, 1024]))
    ```
    """

    valid_processor_kwargs = FastVLMProcessorKwargs
    model_input_names = ["input_ids", "attention_mask", "pixel_values"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>", **kwargs):
        self.image_token = image_token
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Also reads the checkpoints of Apple (`apple/FastVLM-0.5B`, ..., which ship no processor files and a tokenizer
        without `<image>`) and of transformers' native `fast_vlm`: the image processor is Apple's reference
        preprocessing at the vision tower's resolution (see [`FastVLMImageProcessor.from_pretrained`]); `<image>` is
        added to the tokenizer as a special token where missing, and must get the id the model's config expects (the
        model's embeddings have spare rows for it, nothing is resized); the chat template is ours unless the checkpoint
        has a processor chat template (`chat_template.jinja`) of its own.

        A `tokenizer` or `image_processor` passed in is used instead of the checkpoint's, as transformers' processors
        do; a tokenizer without `<image>` gets it added in place.
        """
        checkpoint = checkpoints.describe(pretrained_model_name_or_path, **kwargs)
        if not checkpoint.is_foreign:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer, image_processor = kwargs.pop("tokenizer", None), kwargs.pop("image_processor", None)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if image_processor is None:
            image_processor = FastVLMImageProcessor.from_checkpoint(checkpoint, **kwargs)
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        processor = cls(image_processor, tokenizer, chat_template=processor_dict.get("chat_template"))
        _add_image_token(processor.tokenizer, processor.image_token, checkpoint.image_token_id)
        return processor

    @property
    def image_token_id(self) -> int:
        """The tokenizer's id of `image_token`."""
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {self.image_token!r} token. Add it with "
                f"`tokenizer.add_tokens([{self.image_token!r}], special_tokens=True)` and resize the model's token "
                f"embeddings to match."
            )
        return token_id

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of image tokens for an image processed to `height` x `width` pixels."""
        patch_size = self.image_processor.patch_size
        return (height // patch_size) * (width // patch_size)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """How many image tokens each image costs, for images of the given `(height, width)` sizes: every image is
        resized to the same square (`size`, which may be overridden here as in `__call__`), so they all cost the same.
        """
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(
            FastVLMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )["images_kwargs"]
        size = images_kwargs.get("size")
        size = self.image_processor.size if size is None else size_dict(size)
        tokens_per_image = self.num_image_tokens(size["height"], size["width"])
        num_images = len(image_sizes)
        return MultiModalData(num_image_tokens=[tokens_per_image] * num_images, num_image_patches=[1] * num_images)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text that the placeholder of image `image_idx` of `image_inputs` (the image processor's output)
        becomes: one image token per cell of the encoder's output map."""
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
        return self.image_token * self.num_image_tokens(height, width)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        **kwargs: Unpack[FastVLMProcessorKwargs],
    ) -> BatchFeature:
        """
        Tokenizes `text`, expanding each `<image>` placeholder into image tokens, and preprocesses `images`.

        Args:
            images:
                An image or a list of images, in the order of the placeholders, or one list of images per text (as
                `apply_chat_template` passes them). See [`FastVLMImageProcessor.preprocess`] for the accepted types.
            text (`str` or `list[str]`, *optional*):
                The prompt(s), with one `<image>` placeholder per image.
            **kwargs:
                Tokenizer arguments (`padding`, `padding_side`, `truncation`, `max_length`, `return_tensors`,
                `add_special_tokens`, ...) and image-processor arguments (`image_mode`, `size`, ...).
                `return_text_replacement_offsets=True` also returns where each placeholder went.

        Returns:
            [`BatchFeature`] with `input_ids` and `attention_mask` when `text` is given, and `pixel_values` when
            `images` are. With `return_text_replacement_offsets`, `text_replacement_offsets`: per text, one dict per
            placeholder, in order, as transformers' processors give them: `"type"` (`"image"`), `"span"` (its
            characters in the text), `"new_span"` (the characters of its replacement in the expanded text), `"text"`
            and `"replacement"`.
        """
        for modality in ("videos", "audio", "audios"):
            if _holds_media(kwargs.pop(modality, None)):
                raise ValueError(f"FastVLM takes only images and text; got {modality}.")
        if images is None and text is None:
            raise ValueError("Nothing to process: pass `text`, `images` or both.")
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)

        output_kwargs = self._merge_kwargs(
            FastVLMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        return_tensors = output_kwargs["text_kwargs"].pop("return_tensors", None)
        output_kwargs["images_kwargs"].pop("return_tensors", None)

        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for sample in texts:
                if not isinstance(sample, str):
                    raise TypeError(f"`text` must be a string or a list of strings, got a {type(sample).__name__}.")
            self._check_placeholders(images, texts)

        data, offsets = {}, None
        if images is not None:
            data["pixel_values"] = self.image_processor(images, **output_kwargs["images_kwargs"])["pixel_values"]
        if texts is not None:
            texts, offsets = self._expand_placeholders(texts, data)
            text_inputs = self.tokenizer(texts, **output_kwargs["text_kwargs"])
            if images is not None:
                self._check_image_tokens_kept(texts, text_inputs["input_ids"], output_kwargs["text_kwargs"])
            text_inputs.pop("token_type_ids", None)
            data.update(text_inputs)

        output = BatchFeature(data=data, tensor_type=return_tensors)
        if return_offsets and offsets is not None:
            output["text_replacement_offsets"] = offsets  # after the tensor conversion, which it is not for
        return output

    def _expand_placeholders(self, texts: list[str], image_inputs: dict) -> tuple[list[str], list[list[dict]]]:
        """The texts with each `<image>` replaced by its image tokens (the images in order across the texts), and
        where each replacement went."""
        expanded, offsets, image_idx = [], [], 0
        for sample in texts:
            pieces, sample_offsets, end, growth = [], [], 0, 0
            for match in re.finditer(re.escape(self.image_token), sample):
                replacement = self.replace_image_token(image_inputs, image_idx)
                image_idx += 1
                start = match.start() + growth
                sample_offsets.append(
                    {
                        "type": "image",
                        "span": match.span(),
                        "new_span": (start, start + len(replacement)),
                        "text": match.group(),
                        "replacement": replacement,
                    }
                )
                pieces += [sample[end : match.start()], replacement]
                growth += len(replacement) - len(match.group())
                end = match.end()
            expanded.append("".join(pieces) + sample[end:])
            offsets.append(sample_offsets)
        return expanded, offsets

    def _check_placeholders(self, images: Any, texts: list[str]) -> None:
        """Raises unless every image has its own `<image>` placeholder, per text when images are given per text."""
        placeholders = [sample.count(self.image_token) for sample in texts]
        per_text = (
            isinstance(images, (list, tuple))
            and len(images) == len(texts)
            and all(isinstance(item, (list, tuple)) for item in images)
        )
        if per_text:
            num_images = [len(flatten_images(item)) for item in images]
            for index, (n_images, n_placeholders) in enumerate(zip(num_images, placeholders)):
                if n_images != n_placeholders:
                    raise ValueError(
                        f"Text {index} has {_count(n_images, 'image')} but "
                        f"{_count(n_placeholders, f'`{self.image_token}` placeholder')}: {self._one_per_image}"
                    )
            return
        self.check_placeholder_count(0 if images is None else len(flatten_images(images)), sum(placeholders))

    @property
    def _one_per_image(self) -> str:
        # the sentence transformers' processors end this error with, which its common tests look for
        return (
            f"the number of `{self.image_token}` tokens in the prompts should be the same as the number of images "
            "(one placeholder per image)."
        )

    def check_placeholder_count(self, num_images: int, num_placeholders: int) -> None:
        """Raises unless there are as many `<image>` placeholders in a prompt as images."""
        if num_images != num_placeholders:
            raise ValueError(
                f"{_count(num_images, 'image')} but {_count(num_placeholders, f'`{self.image_token}` placeholder')} "
                f"in the text: {self._one_per_image}"
            )

    def _check_image_tokens_kept(self, texts: list[str], input_ids: list[list[int]], text_kwargs: dict) -> None:
        """Raises when truncation cut image tokens, which would leave the model with features it cannot place."""
        image_token_id = self.image_token_id
        for index, (sample, ids) in enumerate(zip(texts, input_ids)):
            expected = sample.count(self.image_token)
            kept = list(ids).count(image_token_id)
            if kept != expected:
                add_special_tokens = text_kwargs.get("add_special_tokens", True)
                needed = len(self.tokenizer(sample, add_special_tokens=add_special_tokens)["input_ids"])
                raise ValueError(
                    f"Truncation cut image tokens from text {index}: its images need {expected} image tokens but "
                    f"{kept} were kept. Use `max_length={needed}` or more, or `truncation=False`."
                )


def _add_image_token(tokenizer, image_token: str, image_token_id: int) -> None:
    """Adds `image_token` to a tokenizer that lacks it, as a special token; checks it has the model's id."""
    tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id != image_token_id:
        raise ValueError(
            f"The tokenizer gives {image_token!r} the id {token_id} but the model expects {image_token_id} "
            f"(`image_token_index` in config.json, 151646 when absent): set `image_token_index` to {token_id}, or "
            f"use a tokenizer whose first free id is {image_token_id}."
        )


# transformers 4.x finds the processor's parts through class attributes (empty on 5.x; see compat).
for _name, _value in PROCESSOR_CLASS_ATTRIBUTES.items():
    setattr(FastVLMProcessor, _name, _value)


def _holds_media(value: Any) -> bool:
    """Whether a `videos` or `audio` argument holds anything: generic callers pass `None` or empty lists (one per
    text) when there is none."""
    if isinstance(value, (list, tuple)):
        return any(_holds_media(item) for item in value)
    return value is not None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


__all__ = ["FastVLMProcessor"]

"""The collator that turns fine-tuning rows into FastVLM training batches.

A row is `{"images": [...], "messages": [...]}`: the images (paths or PIL images) in the order of the conversation's
image entries (`{"type": "image"}` in a message's content, or a literal `<image>` in a text), and the chat messages, as
TRL's vision-language examples have them. The collator renders the messages with the processor's chat template,
expands each `<image>` into the image tokens, pads, and builds `labels` that count only the assistant turns: their
text and the end-of-turn token that closes each of them. System and user turns, image tokens and padding are `-100`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..processing_fastvlm import _count

IGNORE_INDEX = -100  # label of a position the loss skips


class RowError(ValueError):
    """A row the collator cannot turn into a training example; the message says why."""


@dataclass
class EncodedRow:
    """A row's tokens and labels (without padding), and how many images it has."""

    input_ids: list[int]
    labels: list[int]
    num_images: int


def load_image(image: Any):
    """A PIL image from a row's image entry: a PIL image, a file path, or the `{"bytes", "path"}` dict of an undecoded
    `datasets.Image` column. Raises `RowError` for a missing or unreadable file."""
    from PIL import Image

    from ..image_loading import ImageLoadError
    from ..image_loading import load_image as load_image_file

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and image.get("bytes") is not None:
        source, name = image["bytes"], image.get("path") or "image bytes"
    elif isinstance(image, dict) and image.get("path"):
        source = name = image["path"]
    elif isinstance(image, (str, os.PathLike)):
        source = name = os.fspath(image)
    else:
        raise RowError(f"an image entry must be a path or a PIL image, got {type(image).__name__}")
    try:
        return load_image_file(source, name)
    except ImageLoadError as error:
        raise RowError(str(error)) from None


class FastVLMDataCollator:
    r"""
    Batches fine-tuning rows for [`FastVLMForConditionalGeneration`]: `input_ids`, `attention_mask` and `labels`
    padded on the right to the longest row, and `pixel_values` of every image of the batch in row order (absent when
    no row has an image). Rows may have different numbers of images, including none.

    Args:
        processor ([`FastVLMProcessor`]):
            The checkpoint's processor: its chat template renders the messages, its image processor the images.
        max_length (`int`, *optional*):
            Longest row in tokens. Longer rows lose their last tokens; a row that would lose image tokens, or every
            assistant token, raises a `RowError` instead.

    Pass it to TRL's `SFTTrainer` as `data_collator`, with `dataset_kwargs={"skip_prepare_dataset": True}` and
    `remove_unused_columns=False` in the `SFTConfig` so that the rows reach it as they are.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        size = processor.image_processor.size
        self.tokens_per_image = processor.num_image_tokens(size["height"], size["width"])
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("FastVLMDataCollator needs a fast tokenizer (it reads token offsets to find the answers).")

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(row) for row in rows]
        longest = max(len(row.input_ids) for row in encoded)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id

        def padded(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (longest - len(values))

        batch = {
            "input_ids": torch.tensor([padded(row.input_ids, pad_id) for row in encoded]),
            "attention_mask": torch.tensor([padded([1] * len(row.input_ids), 0) for row in encoded]),
            "labels": torch.tensor([padded(row.labels, IGNORE_INDEX) for row in encoded]),
        }
        images = [load_image(image) for row in rows for image in _images_of(row)]
        if images:
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The text the chat template makes of `messages`, with one `<image>` per image."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.processor.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, row: dict[str, Any]) -> EncodedRow:
        """The tokens and labels of one row; raises `RowError` if the row cannot be trained on."""
        messages = _messages_of(row)
        num_images = len(_images_of(row))
        text = self.render(messages)
        placeholders = text.count(self.image_token)
        if placeholders != num_images:
            raise RowError(
                f"{_count(num_images, 'image')} but {_count(placeholders, f'{self.image_token} placeholder')} in the "
                "messages: give one image per image entry (or placeholder), in order"
            )
        spans = [self._expanded(text, start, end) for start, end in self._answer_spans(messages, text)]
        encoding = self.tokenizer(
            text.replace(self.image_token, self.image_token * self.tokens_per_image), return_offsets_mapping=True
        )
        input_ids = list(encoding["input_ids"])
        labels = [
            token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
            for token, offset in zip(input_ids, encoding["offset_mapping"])
        ]
        return self._truncated(EncodedRow(input_ids, labels, num_images))

    def _answer_spans(self, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `text`: from the end of the prompt the template writes before an
        answer to the end of the answer's turn (its end-of-turn token), trailing whitespace excluded."""
        spans = []
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True) if index else ""
            through_answer = self.render(messages[: index + 1])
            if not (text.startswith(through_answer) and through_answer.startswith(prompt)):
                raise RowError(
                    "the chat template does not write the conversation turn by turn (a shorter conversation is not a "
                    "prefix of the longer one), so the answers cannot be found"
                )
            spans.append((len(prompt), len(through_answer.rstrip())))
        return spans

    def _expanded(self, text: str, start: int, end: int) -> tuple[int, int]:
        """A character span of `text` moved to the text in which every `<image>` is expanded into its tokens."""
        extra = (self.tokens_per_image - 1) * len(self.image_token)
        return start + extra * text[:start].count(self.image_token), end + extra * text[:end].count(self.image_token)

    def _truncated(self, row: EncodedRow) -> EncodedRow:
        if self.max_length is None or len(row.input_ids) <= self.max_length:
            return row
        cut = row.input_ids[self.max_length :]
        if self.image_token_id in cut:
            last_image_token = len(row.input_ids) - row.input_ids[::-1].index(self.image_token_id)
            raise RowError(
                f"{len(row.input_ids)} tokens, more than max length {self.max_length}, and truncating it would cut "
                f"image tokens (its last image token is token {last_image_token}): raise the max length to "
                f"{len(row.input_ids)} or shorten the row"
            )
        labels = row.labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise RowError(
                f"{len(row.input_ids)} tokens, more than max length {self.max_length}, and truncating it would cut "
                f"every assistant token: raise the max length to {len(row.input_ids)} or shorten the row"
            )
        return EncodedRow(row.input_ids[: self.max_length], labels, row.num_images)


def _messages_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError('no "messages": a row needs a list of chat messages')
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError('every message needs a "role" and a "content"')
    if not any(message["role"] == "assistant" and message["content"] for message in messages):
        raise RowError("no assistant turn: the row has nothing to learn from")
    return messages


def _images_of(row: dict[str, Any]) -> list[Any]:
    images = row.get("images")
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        raise RowError(f'"images" must be a list, got {type(images).__name__}')
    return list(images)

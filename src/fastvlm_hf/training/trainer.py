"""TRL's `SFTTrainer` set up for FastVLM rows, the checkpoint a stopped run resumes from, and the merge of a trained
adapter into its base model."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from .collator import FastVLMDataCollator

# `SFTConfig` settings that let the rows reach `FastVLMDataCollator` as they are: TRL neither tokenizes them nor drops
# their columns, and leaves truncation to the collator (which refuses to cut image tokens).
SFT_DATA_SETTINGS: dict[str, Any] = {
    "dataset_kwargs": {"skip_prepare_dataset": True},
    "remove_unused_columns": False,
    "max_length": None,
}


def to_dataset(rows: Sequence[dict[str, Any]]):
    """A `datasets.Dataset` of rows. A message whose content is a string gets it as one text part, so that every row
    has the same columns (Arrow needs one type per column); the chat template writes both forms alike."""
    from datasets import Dataset

    def as_parts(message: dict[str, Any]) -> dict[str, Any]:
        content = message["content"]
        return {**message, "content": [{"type": "text", "text": content}] if isinstance(content, str) else content}

    return Dataset.from_list(
        [{"images": list(row.get("images") or []), "messages": [as_parts(m) for m in row["messages"]]} for row in rows]
    )


def sft_trainer(
    model,
    processor,
    train_rows: Sequence[dict[str, Any]],
    args,
    peft_config=None,
    eval_rows: Sequence[dict[str, Any]] | None = None,
    max_length: int | None = None,
    **kwargs: Any,
):
    """TRL's `SFTTrainer` on FastVLM rows, batched by `FastVLMDataCollator(processor, max_length)`.

    `args` is an `SFTConfig`; `SFT_DATA_SETTINGS` are applied to it. `peft_config` (e.g. `lora_config(model)`) makes
    the trainer wrap the model in a PEFT adapter. Rows may be lists of dicts or `datasets.Dataset`s.
    """
    from trl import SFTTrainer

    for name, value in SFT_DATA_SETTINGS.items():
        setattr(args, name, value)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=_as_dataset(train_rows),
        eval_dataset=None if eval_rows is None else _as_dataset(eval_rows),
        data_collator=FastVLMDataCollator(processor, max_length=max_length),
        processing_class=processor,
        peft_config=peft_config,
        **kwargs,
    )


def _as_dataset(rows):
    from datasets import Dataset

    return rows if isinstance(rows, Dataset) else to_dataset(rows)


def last_complete_checkpoint(output: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The newest `checkpoint-N` folder in `output` that the Trainer finished saving (or None), and the newer ones it
    did not finish, newest first.

    The Trainer writes a checkpoint's `trainer_state.json` after everything else in it (weights, optimizer, scheduler,
    RNG states), so a checkpoint whose state file is missing or does not parse was cut short (e.g. the process was
    killed while saving it), and resuming from it would fail or continue from a mix of two steps."""
    if not os.path.isdir(output):
        return None, []
    steps = {}
    for name in os.listdir(output):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output, name)):
            steps[int(match.group(1))] = os.path.join(output, name)
    incomplete = []
    for step in sorted(steps, reverse=True):
        try:
            with open(os.path.join(steps[step], "trainer_state.json"), encoding="utf-8") as file:
                json.load(file)
        except (OSError, ValueError):
            incomplete.append(steps[step])
            continue
        return steps[step], incomplete
    return None, incomplete


def merge_adapter(base_model: str | os.PathLike, adapter: str | os.PathLike, dtype=None, **kwargs: Any):
    """The base checkpoint with the trained adapter folded into its weights: a plain `FastVLMForConditionalGeneration`
    whose `save_pretrained` writes this package's layout. The base is loaded unquantized (in `dtype`), also for an
    adapter trained on a 4-bit model: merging into 4-bit weights would round the sum."""
    from peft import PeftModel

    from ..modeling_fastvlm import FastVLMForConditionalGeneration

    base = FastVLMForConditionalGeneration.from_pretrained(base_model, dtype=dtype, **kwargs)
    return PeftModel.from_pretrained(base, os.fspath(adapter)).merge_and_unload()

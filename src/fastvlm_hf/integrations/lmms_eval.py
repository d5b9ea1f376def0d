"""The lmms-eval plugin: `lmms-eval --model fastvlm` evaluates any checkpoint this package loads.

lmms-eval finds the model through the `lmms_eval.models` entry point in `pyproject.toml`, which names `manifest`. The
model is a chat model: lmms-eval hands it each document's messages (images and text), and it answers them with
`generate`, prompts built by FastVLM's processor and chat template, several documents per batch (`--batch_size`).

Model arguments (`--model_args key=value,...`), as the `fastvlm-hf` command's model options: `pretrained` (a Hub id or
a local folder, in any FastVLM layout; default `apple/FastVLM-0.5B`), `device` (`auto`, `cpu`, `cuda`, `mps`),
`dtype` (`auto`, `bfloat16`, `float16`, `float32`), `load_in_4bit`, `load_in_8bit`, `image_mode` (`pad`, Apple's
preprocessing and the default for Apple's checkpoints, or `crop`), `resolution` (pixels, a multiple of 64).

A document this model cannot answer (a video or audio, an image that does not open, a prompt longer than the model's
context) is reported on the log and answered with an empty string; the run goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from transformers import BatchFeature

from ..chat import context_length, fit_new_tokens, move_inputs
from ..cli.loading import load, load_image, resolve_device
from ..cli.messages import CLIError

MODEL_NAME = "fastvlm"
DEFAULT_MODEL = "apple/FastVLM-0.5B"
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")
IMAGE_MODES = ("pad", "crop")
# What a task's generation kwargs leave unsaid: greedy decoding, and lmms-eval's usual answer budget.
DEFAULT_GENERATION = {"max_new_tokens": 1024, "temperature": 0.0, "top_p": None, "num_beams": 1}


def manifest():
    """The entry point's payload: lmms-eval's registration of the `fastvlm` chat model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, chat_class_path=f"{__name__}.FastVLM")


class UnanswerableDocument(ValueError):
    """A document this model cannot answer; the run goes on without it."""


class FastVLM(lmms):
    """FastVLM as an lmms-eval chat model (see the module's docstring for its arguments)."""

    is_simple = False

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        image_mode: str | None = None,
        resolution: int | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval's, for `--batch_size auto`, which needs no bound here
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"fastvlm: unknown model argument {', '.join(sorted(unknown))}; it takes pretrained, device, dtype, "
                "load_in_4bit, load_in_8bit, image_mode and resolution (and lmms-eval's --batch_size)"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "fastvlm: one process only: start lmms-eval by itself, not with several processes (accelerate "
                "launch, torchrun); give larger batches with --batch_size"
            )
        device = str(device)
        _check_choice("device", device.split(":")[0], DEVICES)  # and an index: cuda:1
        _check_choice("dtype", dtype, DTYPES)
        if image_mode is not None:
            _check_choice("image_mode", image_mode, IMAGE_MODES)
        if load_in_4bit and load_in_8bit:
            raise ValueError("fastvlm: give load_in_4bit or load_in_8bit, not both")
        self.batch_size_per_device = _positive_int("batch_size (--batch_size)", batch_size)
        if resolution is not None:
            resolution = _positive_int("resolution", resolution)
        options = argparse.Namespace(
            model=str(pretrained), device=device, dtype=dtype, load_in_4bit=bool(load_in_4bit),
            load_in_8bit=bool(load_in_8bit), resolution=resolution, image_mode=image_mode,
        )  # fmt: skip
        try:
            resolve_device(device.split(":")[0])  # an unavailable device fails here, and says so
            self.processor, self.model = load(options)
        except CLIError as error:
            raise ValueError(f"fastvlm: {error}") from None

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = [""] * len(requests)
        for indices in self._batches(requests):
            prepared = {}
            for index in indices:
                try:
                    prepared[index] = self._prepare(requests[index])
                except (UnanswerableDocument, CLIError) as error:
                    _report(requests[index], error)
            if prepared:
                answers_of_batch = self._answer(list(prepared.values()), requests[indices[0]].args[2])
                for index, answer in zip(prepared, answers_of_batch):
                    answers[index] = answer
        return answers

    def _batches(self, requests: list[Instance]):
        """Indices of the requests in batches of `batch_size`, each batch with one set of generation kwargs."""

        def key(index: int) -> str:
            return json.dumps(requests[index].args[2], sort_keys=True, default=str)

        for _, group in itertools.groupby(sorted(range(len(requests)), key=key), key=key):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                yield group[start : start + self.batch_size]

    def _prepare(self, request: Instance) -> dict[str, Any]:
        """The processor's inputs for one request: its messages as the chat template renders them, and its images."""
        _, doc_to_messages, _, doc_id, task, split = request.args
        messages = doc_to_messages(self.task_dict[task][split][doc_id])
        chat, images = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                chat.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                kind = part["type"]
                if kind == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image":
                    images.append(_open_image(part.get("url", part.get("image"))))
                    parts.append({"type": "image"})
                else:
                    raise UnanswerableDocument(f"it holds {kind}, and FastVLM takes only images and text")
            chat.append({"role": message["role"], "content": parts})
        prompt = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=images or None, text=prompt, return_tensors="pt")
        limit = context_length(self.model)
        tokens = inputs["input_ids"].shape[1]
        if limit is not None and tokens >= limit:
            raise UnanswerableDocument(
                f"its prompt is {tokens} tokens ({len(images)} images) but the model's context holds {limit}"
            )
        return inputs

    @torch.inference_mode()
    def _answer(self, inputs: list[dict[str, Any]], task_kwargs: dict[str, Any]) -> list[str]:
        """The answers to one batch of prepared requests: left-padded, decoded with the task's generation kwargs."""
        tokenizer = self.processor.tokenizer
        padded = tokenizer.pad(
            {"input_ids": [item["input_ids"][0].tolist() for item in inputs]}, padding_side="left", return_tensors="pt"
        )
        batch = BatchFeature(dict(padded))
        pixel_values = [item["pixel_values"] for item in inputs if "pixel_values" in item]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        batch = move_inputs(batch, self.model)
        prompt_tokens = batch["input_ids"].shape[1]
        kwargs, stop_strings = generation_kwargs(task_kwargs)
        # the longest prompt fits (`_prepare`); the answers get what is left of the context after it
        kwargs["max_new_tokens"] = fit_new_tokens(self.model, prompt_tokens, kwargs["max_new_tokens"])
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
        output = self.model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **kwargs)
        texts = self.processor.batch_decode(output[:, prompt_tokens:], skip_special_tokens=True)
        return [cut_at_stop_strings(text, stop_strings) for text in texts]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("fastvlm answers generation tasks only (output_type: generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("fastvlm answers single-round generation tasks only (output_type: generate_until)")


def generation_kwargs(task_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`generate`'s arguments for a task's generation kwargs (greedy at temperature 0, as lmms-eval's models read
    them), and the task's stop strings (`until`)."""
    settings = {**DEFAULT_GENERATION, **task_kwargs}
    until = settings.get("until") or []
    stop_strings = [until] if isinstance(until, str) else [text for text in until if text]
    kwargs = {"max_new_tokens": int(settings["max_new_tokens"]), "num_beams": int(settings["num_beams"] or 1)}
    temperature = float(settings["temperature"] or 0.0)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
        if settings["top_p"] is not None:
            kwargs["top_p"] = float(settings["top_p"])
    else:
        kwargs["do_sample"] = False
    return kwargs, stop_strings


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    """The text up to the first stop string, which `generate` leaves in the answer."""
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text


def _open_image(image):
    """A document's image: Pillow's, or a path or URL to open."""
    if isinstance(image, str):
        return load_image(image)
    if image is None:
        raise UnanswerableDocument("one of its images is empty")
    return image


def _report(request: Instance, error: Exception) -> None:
    from loguru import logger as lmms_eval_logger  # lmms-eval's log, where its own warnings go

    lmms_eval_logger.error(
        f"fastvlm: cannot answer document {request.doc_id} of task {request.task_name}: {error}; "
        "it is answered with an empty string"
    )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"fastvlm: {name}={value} is not one of {', '.join(choices)}")


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"fastvlm: {name} must be a positive whole number, got {value!r}")
    return number

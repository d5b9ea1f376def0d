"""A multi-turn conversation about images that encodes each image once and never recomputes the shared prefix.

The first turn runs the processor and `generate` with `pixel_values` and a `DynamicCache`. Each later turn appends
only the new tokens (the close of the last answer and the new user message, as the chat template renders them) to
the full token sequence and calls `generate` with that sequence and the cache, without `pixel_values`: `generate`
feeds only the uncached tail through the model, and the image tokens already sit in the cache.

After the first turn the cache of the prefix up to the last image token is kept, so that [`ChatSession.reset`]
starts a new conversation about the same images without encoding them again.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from .compat import CACHE_NAME, cache_of

# A private-use character standing in for an answer while the chat template renders the text around it.
_ANSWER_STAND_IN = "\ue000"


class ContextLengthError(ValueError):
    """The prompt or conversation does not fit in the model's context."""


def message(role: str, text: str, images: list | None = None) -> dict[str, Any]:
    """A chat message: the images first, then the text (content as a list, which transformers 4.x requires)."""
    content = [{"type": "image", "image": image} for image in images or []]
    content.append({"type": "text", "text": text})
    return {"role": role, "content": content}


def user_message(text: str, images: list | None = None) -> dict[str, Any]:
    return message("user", text, images)


def conversation_start(images: list, text: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The messages of a new conversation: an optional system prompt, then the user's images and text."""
    messages = [message("system", system_prompt)] if system_prompt else []
    return [*messages, user_message(text, images)]


def context_length(model) -> int | None:
    """The number of positions the language model can attend to (`max_position_embeddings`)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


def fit_new_tokens(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """`max_new_tokens`, lowered so that prompt and answer fit in the context; raises if the prompt alone does not."""
    limit = context_length(model)
    if limit is None:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens but the model's context holds {limit} "
            f"(text_config.max_position_embeddings)"
        )
    return min(max_new_tokens, limit - prompt_tokens)


def move_inputs(inputs, model):
    """Processor outputs on the model's device, the floating-point ones (`pixel_values`) in the model's dtype."""
    return inputs.to(model.device, dtype=model.dtype)


class ChatSession:
    """A conversation with a vision-language model about one set of images, reusing the KV cache between turns.

    Args:
        model: a transformers image-text-to-text model (greedy or sampled generation; no beam search).
        processor: its processor, with a chat template.
        images: the images the conversation is about (PIL images or anything the processor takes).
        generation_kwargs: passed to `generate` on every turn (`max_new_tokens`, `do_sample`, ...).
        system_prompt: a system message; the chat template's default when `None`.

    Example:

    ```python
    >>> session = ChatSession(model, processor, [Image.open("examples/house.png")], {"max_new_tokens": 64})
    >>> session.ask("What is next to the house?")
    >>> session.ask("What colour is it?")  # the image is not encoded again
    ```
    """

    def __init__(self, model, processor, images: list, generation_kwargs: dict[str, Any], system_prompt=None):
        self.model = model
        self.processor = processor
        self.generation_kwargs = dict(generation_kwargs)
        self.system_prompt = system_prompt
        self.set_images(images)

    def set_images(self, images: list) -> None:
        """Starts a new conversation about other images."""
        self.images = list(images)
        self._image_prefix = None  # (prefix ids, cache of the prefix), once the images have been encoded
        self.reset()

    def reset(self) -> None:
        """Starts a new conversation about the same images."""
        self.messages: list[dict[str, Any]] = []
        self.input_ids: torch.Tensor | None = None  # the whole conversation so far, the last answer included
        self.cache = None
        self.prompt_tokens = 0  # length of the last turn's input, the conversation before its answer

    @property
    def context_is_full(self) -> bool:
        """Whether the conversation so far fills the model's context: the last answer stopped where the context ends,
        and no further question fits (the next `ask` raises `ContextLengthError`) until `reset`."""
        limit = context_length(self.model)
        return limit is not None and self.input_ids is not None and self.input_ids.shape[1] >= limit

    @property
    def will_encode_images(self) -> bool:
        """Whether the next turn runs the vision encoder: the first turn about images not encoded before."""
        return self.input_ids is None and self._image_prefix is None

    def ask(self, question: str, streamer=None, timer=None) -> str:
        """Answers `question` in the conversation and returns the answer's text.

        `streamer` goes to `generate`. With a `timer` (a [`fastvlm_hf.stats.GenerationTimer`] entered around this
        call), the timer's own streamer goes to `generate` instead (it forwards to the streamer the timer was built
        with), and the processor call is timed as preprocessing.
        """
        preprocessing = timer.preprocessing() if timer is not None else contextlib.nullcontext()
        with preprocessing:
            if self.input_ids is None:
                input_ids, cache, pixel_values = self._first_turn_inputs(question)
            else:
                input_ids, cache, pixel_values = self._next_turn_inputs(question), self.cache, None
        self.prompt_tokens = input_ids.shape[1]
        max_new_tokens = fit_new_tokens(self.model, input_ids.shape[1], self.generation_kwargs.get("max_new_tokens", 256))
        extra = {"pixel_values": pixel_values} if pixel_values is not None else {}
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                return_dict_in_generate=True,
                streamer=timer.streamer if timer is not None else streamer,
                **{**self.generation_kwargs, "max_new_tokens": max_new_tokens, CACHE_NAME: cache},
                **extra,
            )
        return self._record_turn(question, input_ids, output)

    def _first_turn_inputs(self, question: str):
        """Token ids of the conversation's first turn, with a cache and `pixel_values` as far as needed:
        the cached image prefix when the images were encoded before, the pixels otherwise."""
        from transformers import DynamicCache

        self.messages = conversation_start(self.images, question, self.system_prompt)
        inputs = self.processor.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        inputs = move_inputs(inputs, self.model)
        input_ids = inputs["input_ids"]
        if self._image_prefix is not None:
            prefix_ids, prefix_cache = self._image_prefix
            length = prefix_ids.shape[1]
            if input_ids.shape[1] > length and torch.equal(input_ids[:, :length], prefix_ids):
                return input_ids, copy.deepcopy(prefix_cache), None
        return input_ids, DynamicCache(), inputs.get("pixel_values")

    def _next_turn_inputs(self, question: str) -> torch.Tensor:
        """The conversation's token ids followed by the tokens that close the last answer and ask `question`."""
        closing, new_turn = self._turn_texts(question)
        eos_texts = self._eos_texts()
        last_token = int(self.input_ids[0, -1])
        if last_token in eos_texts and closing.startswith(eos_texts[last_token]):
            closing = closing[len(eos_texts[last_token]) :]  # the answer already ends with the template's close
        new_ids = self.processor.tokenizer(closing + new_turn, add_special_tokens=False, return_tensors="pt")
        return torch.cat([self.input_ids, new_ids["input_ids"].to(self.input_ids.device)], dim=1)

    def _turn_texts(self, question: str) -> tuple[str, str]:
        """What the chat template writes after the last answer (its close), and for the next user turn."""
        history = [*self.messages[:-1], message("assistant", _ANSWER_STAND_IN)]
        before = self._render(history, add_generation_prompt=False)
        after = self._render([*history, user_message(question)], add_generation_prompt=True)
        if not after.startswith(before) or _ANSWER_STAND_IN not in before:
            raise ValueError("the chat template does not render a conversation turn by turn; cannot continue it")
        closing = before[before.rindex(_ANSWER_STAND_IN) + len(_ANSWER_STAND_IN) :]
        return closing, after[len(before) :]

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _eos_texts(self) -> dict[int, str]:
        eos = self.model.generation_config.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return {token_id: self.processor.tokenizer.convert_ids_to_tokens(token_id) for token_id in eos_ids}

    def _record_turn(self, question: str, input_ids: torch.Tensor, output) -> str:
        """Keeps the sequence and cache of the finished turn and returns the answer's text."""
        is_first_turn = self.input_ids is None
        self.input_ids = output.sequences
        self.cache = cache_of(output)
        if is_first_turn and self._image_prefix is None:
            self._keep_image_prefix()
        answer = self.processor.decode(output.sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
        if not is_first_turn:
            self.messages.append(user_message(question))
        self.messages.append(message("assistant", answer))
        return answer

    def _keep_image_prefix(self) -> None:
        """Keeps a copy of the cache up to the last image token, for conversations that start over."""
        image_token_id = getattr(self.model.config, "image_token_id", None)
        if image_token_id is None:
            return
        positions = (self.input_ids[0] == image_token_id).nonzero()
        if len(positions) == 0:
            return
        length = int(positions[-1]) + 1
        cache = copy.deepcopy(self.cache)
        if cache.get_seq_length() > length:
            cache.crop(length - cache.get_seq_length())  # a negative value drops that many tokens from the end
        self._image_prefix = (self.input_ids[:, :length].clone(), cache)


__all__ = ["ChatSession", "ContextLengthError", "context_length", "conversation_start", "fit_new_tokens", "message",
           "user_message"]

"""Greedy generation with onnxruntime over an exported folder, fed as transformers.js feeds it: the image features
copied over the image tokens' embeddings, position ids counted from the attention mask, an empty cache of the shape
the decoder's inputs declare on the first step, then one token at a time with the previous step's `present` tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from .layout import GRAPHS, ONNX_FOLDER, graph_file

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without the prompt
    first_logits: np.ndarray  # (vocab,) float32: the prefill's logits for the first new token


class OnnxFastVLM:
    """The three sessions of an exported folder in one dtype ("fp32", "fp16", "q8", "q4")."""

    def __init__(self, folder: str | Path, dtype: str = "fp32", providers: list[str] | None = None,
                 session_options: onnxruntime.SessionOptions | None = None, image_token_id: int | None = None):  # fmt: skip
        """`image_token_id`: by default, config.json's `image_token_index`."""
        folder = Path(folder)
        if image_token_id is None:
            image_token_id = json.loads((folder / "config.json").read_text())["image_token_index"]
        self.image_token_id = image_token_id
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: onnxruntime.InferenceSession(str(folder / ONNX_FOLDER / graph_file(name, dtype)),
                                               sess_options=session_options, providers=providers)  # fmt: skip
            for name in GRAPHS
        }
        decoder = self.sessions["decoder_model_merged"]
        self.cache_inputs = [value for value in decoder.get_inputs() if value.name.startswith("past_key_values.")]

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        (features,) = self.sessions["vision_encoder"].run(None, {"pixel_values": pixel_values.astype(np.float32)})
        return features

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        (embeds,) = self.sessions["embed_tokens"].run(None, {"input_ids": input_ids.astype(np.int64)})
        return embeds

    def prompt_embeddings(self, input_ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
        embeds = self.embed(input_ids)
        is_image = input_ids == self.image_token_id
        if pixel_values is None:
            if is_image.any():
                raise ValueError(f"{int(is_image.sum())} image tokens and no image")
            return embeds
        features = self.image_features(pixel_values)
        features = features.reshape(-1, features.shape[-1])
        if len(features) != int(is_image.sum()):
            raise ValueError(f"{int(is_image.sum())} image tokens for {len(features)} image features")
        embeds[is_image] = features
        return embeds

    def generate(self, input_ids, pixel_values=None, max_new_tokens: int = 16, eos_token_id: int | None = None,
                 streamer=None) -> Generation:  # fmt: skip
        """Greedy decoding of one prompt (`input_ids` of shape (1, length)); stops after `max_new_tokens` or at
        `eos_token_id` (kept in the tokens). `streamer`, as in transformers' `generate`: its `put` gets the prompt, then
        each new token as it comes (arrays), and `end` is called at the end."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if streamer is not None:
            streamer.put(input_ids)
        embeds = self.prompt_embeddings(input_ids, None if pixel_values is None else np.asarray(pixel_values))
        batch = embeds.shape[0]
        cache = {
            value.name: np.zeros([batch, value.shape[1], 0, value.shape[3]], dtype=_NUMPY_TYPES[value.type])
            for value in self.cache_inputs
        }
        attention_mask = np.ones(input_ids.shape, dtype=np.int64)
        position_ids = np.cumsum(attention_mask, axis=1) - 1
        decoder = self.sessions["decoder_model_merged"]
        output_names = [output.name for output in decoder.get_outputs()]
        tokens, first_logits = [], None
        while len(tokens) < max_new_tokens:
            feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **cache}
            results = dict(zip(output_names, decoder.run(None, feeds)))
            logits = results["logits"][:, -1].astype(np.float32)
            if first_logits is None:
                first_logits = logits[0]
            token = int(logits[0].argmax())
            tokens.append(token)
            if streamer is not None:
                streamer.put(np.array([token]))
            if token == eos_token_id:
                break
            cache = {name.replace("present.", "past_key_values."): value for name, value in results.items()
                     if name.startswith("present.")}  # fmt: skip
            embeds = self.embed(np.array([[token]]))
            attention_mask = np.ones((batch, attention_mask.shape[1] + 1), dtype=np.int64)
            position_ids = np.array([[attention_mask.shape[1] - 1]])
        if streamer is not None:
            streamer.end()
        return Generation(tokens, first_logits)

"""`--verify`: onnxruntime runs the exported float32 graphs on a test image and prompt (`conversion`'s), and its
greedy tokens must equal PyTorch's `generate`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conversion import verification_inputs
from ..cpu import fast_routes_off
from .runtime import OnnxFastVLM

VERIFY_NEW_TOKENS = 8
LOGITS_TOLERANCE = 1e-4  # of the largest logit: float32 rounding in other kernels, far below a wrong weight's effect


@dataclass
class Verification:
    tokens: list[int]  # the greedy tokens both gave
    logits_difference: float  # the largest first-step logit difference, relative to the largest logit


def verify_export(model, processor, folder, new_tokens: int = VERIFY_NEW_TOKENS) -> Verification:
    """Raises `ExportError` unless onnxruntime's greedy tokens on the float32 graphs in `folder` equal `model`'s and
    its first-step logits agree within `LOGITS_TOLERANCE` of the largest."""
    from . import ExportError

    inputs = verification_inputs(processor)
    reference, reference_logits = torch_greedy(model, inputs, new_tokens)
    onnx_model = OnnxFastVLM(folder, "fp32", image_token_id=model.config.image_token_id)
    result = onnx_model.generate(inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), new_tokens,
                                 eos_token_id=_single(model.generation_config.eos_token_id))
    difference = float(abs(result.first_logits - reference_logits).max() / abs(reference_logits).max())
    if result.tokens != reference or difference > LOGITS_TOLERANCE:
        raise ExportError(f"The ONNX graphs do not reproduce PyTorch: greedy tokens {result.tokens} against "
                          f"{reference}, first-step logits differ by {difference:.3g} of the largest (tolerance "
                          f"{LOGITS_TOLERANCE}).")  # fmt: skip
    return Verification(reference, difference)


def torch_greedy(model, inputs, new_tokens: int):
    """`model.generate`'s greedy tokens and first-step logits, on the plain computation the graphs were traced
    from."""
    with torch.no_grad(), fast_routes_off():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)  # fmt: skip
    tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, output.logits[0][0].float().numpy()


def _single(token_ids):
    return token_ids[0] if isinstance(token_ids, list) else token_ids

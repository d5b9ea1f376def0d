"""transformers' own tensor parallelism: FastVLM loaded with `tp_plan="auto"` under `torchrun` (two CPU processes,
gloo) shards the language model and the head by their plans and gives the logits of one process."""

import os
import subprocess
import sys

import pytest
import torch
from helpers.assertions import assert_logits_close
from helpers.tiny_model import TINY_VISION_CONFIG, tiny_text_config
from helpers.tiny_tokenizer import build_tiny_tokenizer

from fastvlm_hf import FastVLMConfig, FastVLMForConditionalGeneration
from fastvlm_hf.compat import IS_TRANSFORMERS_5
from fastvlm_hf.testing import give_weights_a_working_scale

WORLD_SIZE = 2

pytestmark = [
    pytest.mark.skipif(
        not IS_TRANSFORMERS_5,
        reason="transformers 4.57's tensor-parallel loading cannot load a 0-dim tensor (`param[:]` in "
        "`shard_and_distribute_module` raises IndexError), and FastViTHD's BatchNorms have one (`num_batches_tracked`)",
    ),
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="this torch has no gloo backend for torch.distributed",
    ),
]


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """Single-process models and inputs, and what `helpers/tensor_parallel_worker.py` computed from them under
    `torchrun`."""
    root = tmp_path_factory.mktemp("tensor-parallel")
    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    inputs = {
        "text": {"input_ids": torch.tensor([[1, 5, 6, 7, 8, 9, 10]])},
        "image": {
            "input_ids": torch.tensor([[1, 5, 6] + [image_token_id] * 4 + [7, 8, 9]]),  # 4 tokens: a 128 px image
            "pixel_values": torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)),
        },
    }
    torch.save(inputs, root / "inputs.pt")
    models = {}
    for tied in (True, False):
        config = FastVLMConfig(
            vision_config=TINY_VISION_CONFIG,
            text_config=tiny_text_config(len(tokenizer), tie_word_embeddings=tied),
            image_token_id=image_token_id,
        )
        torch.manual_seed(0)
        model = FastVLMForConditionalGeneration(config).eval()
        give_weights_a_working_scale(model, seed=0)
        directory = root / ("tied" if tied else "untied")
        model.save_pretrained(directory)
        models[str(directory)] = model

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}",
        os.path.join(os.path.dirname(__file__), "helpers", "tensor_parallel_worker.py"), str(root / "inputs.pt"),
        str(root / "output.pt"), *models,
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return models, inputs, torch.load(root / "output.pt")


@pytest.mark.parametrize("head", ["tied", "untied"])
@pytest.mark.parametrize("input_name", ["text", "image"])
@torch.no_grad()
def test_tensor_parallel_logits_are_one_process_logits(tensor_parallel_run, head, input_name):
    models, inputs, results = tensor_parallel_run
    directory = next(path for path in models if path.endswith(head))
    expected = models[directory](**inputs[input_name]).logits
    assert_logits_close(results[directory]["logits"][input_name], expected)  # within 1e-5 of the largest logit


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_the_language_model_and_head_are_sharded(tensor_parallel_run, head):
    models, _, results = tensor_parallel_run
    directory = next(path for path in models if path.endswith(head))
    text_config = models[directory].config.text_config
    assert results[directory]["q_proj"] == (text_config.hidden_size // WORLD_SIZE, text_config.hidden_size)
    # The head has Qwen2's plan: `colwise_gather_output` shards it; 5.0's `colwise_rep` leaves it whole.
    sharded_head = FastVLMForConditionalGeneration._tp_plan["lm_head"] == "colwise_gather_output"
    head_rows = text_config.vocab_size // WORLD_SIZE if sharded_head else text_config.vocab_size
    assert results[directory]["lm_head"] == (head_rows, text_config.hidden_size)

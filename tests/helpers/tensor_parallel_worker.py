"""Run by `test_tensor_parallel.py` under `torchrun`: loads each checkpoint with transformers' tensor parallelism and
writes, from rank 0, its logits on each input and how the language model and head were sharded.

Usage: torchrun --nproc-per-node N helpers/tensor_parallel_worker.py INPUTS.pt OUTPUT.pt CHECKPOINT [CHECKPOINT ...]
"""

import os
import sys

import torch
import transformers

from fastvlm_hf import FastVLMForConditionalGeneration


def tensor_parallel_kwargs() -> dict:
    """`from_pretrained`'s request for the model's own plans: `distributed_config` where transformers has it (5.23 on
    deprecate the `tp_plan` argument), `tp_plan` before."""
    config_class = getattr(transformers, "DistributedConfig", None)
    if config_class is not None and "tp_plan" in getattr(config_class, "__dataclass_fields__", {}):
        return {"distributed_config": config_class(tp_plan="auto")}
    return {"tp_plan": "auto"}


def local_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple((tensor.to_local() if hasattr(tensor, "to_local") else tensor).shape)


@torch.no_grad()
def main() -> None:
    inputs_path, output_path, *directories = sys.argv[1:]
    inputs = torch.load(inputs_path)
    results = {}
    for directory in directories:
        model = FastVLMForConditionalGeneration.from_pretrained(
            directory, dtype=torch.float32, **tensor_parallel_kwargs()
        ).eval()
        logits = {}
        for name, model_inputs in inputs.items():
            output = model(**model_inputs).logits
            logits[name] = output.full_tensor() if hasattr(output, "full_tensor") else output
        results[directory] = {
            "logits": logits,
            "q_proj": local_shape(model.model.language_model.layers[0].self_attn.q_proj.weight),
            "lm_head": local_shape(model.lm_head.weight),
        }
    if int(os.environ["RANK"]) == 0:
        torch.save(results, output_path)
    # Both ranks leave the process group together: a rank exiting with gloo's threads still up can abort.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

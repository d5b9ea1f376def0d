"""LoRA fine-tuning speed and memory: fastvlm_hf against transformers' `FastVlmForConditionalGeneration` (5.x, timm
inside), the same PEFT config on both, with and without gradient checkpointing.

Random weights at FastVLM's shapes (FastViTHD at 1024 px plus the Qwen2 of FastVLM-0.5B by default), LoRA r=16 on
the language model's attention and MLP projections (the vision tower frozen), one 1024 px image and 64 text tokens per
sample, AdamW steps. Each (side, checkpointing) runs in a fresh subprocess, so that peaks do not carry over: on CPU the
peak is the resident-set high-water mark (`VmHWM`), also shown above the resident set once the model is built; on CUDA
`torch.cuda.max_memory_allocated`.

    python benchmarks/finetune.py --output benchmarks/results/finetune.json      # 0.5B, bf16, CPU
    python benchmarks/finetune.py --sides ours --sizes 7b --load-in-4bit --device cuda --output results/qlora-7b.json

`--load-in-4bit` (QLoRA: bitsandbytes NF4, bf16 compute) saves the random model to a temporary folder and loads it
through `from_pretrained(quantization_config=...)`, the path users take, then `peft.prepare_model_for_kbit_training`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import torch
from common import (
    DTYPES,
    add_common_arguments,
    configure_torch,
    describe_machine,
    gib,
    log,
    machine_line,
    markdown_table,
    peak_memory_bytes,
    process_status_bytes,
    reset_peak_memory,
    synchronize,
    write_results,
)
from models import build_native, build_ours, fastvlm_config

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT_TOKENS = 64
SIDES = ("ours", "native")


def build(side: str, config, dtype: torch.dtype, device: str, load_in_4bit: bool, seed: int) -> torch.nn.Module:
    from fastvlm_hf.training import prepare_model_for_training

    ours = build_ours(config, dtype, "cpu", seed)
    if side == "ours":
        model = _quantized(ours, dtype, device) if load_in_4bit else ours.to(device)
        return prepare_model_for_training(model)
    return build_native(config, dtype, "cpu", ours).to(device)


def _quantized(model, dtype: torch.dtype, device: str):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        loaded = AutoModelForImageTextToText.from_pretrained(
            folder, quantization_config=quantization, dtype=dtype, device_map=device
        )
    return prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=False)


def batch(config, batch_size: int, dtype: torch.dtype, device: str, seed: int) -> dict[str, torch.Tensor]:
    """One 1024 px image and 64 text tokens per sample; the loss counts the text tokens."""
    generator = torch.Generator().manual_seed(seed)
    side = config.vision_config.image_size
    image_tokens = torch.full((batch_size, config.num_image_tokens), config.image_token_id)
    text = torch.randint(0, 150000, (batch_size, TEXT_TOKENS), generator=generator)
    input_ids = torch.cat([image_tokens, text], dim=1)
    labels = torch.cat([torch.full_like(image_tokens, -100), text], dim=1)
    pixel_values = torch.rand(batch_size, 3, side, side, generator=generator).to(dtype)
    tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {name: tensor.to(device) for name, tensor in {**tensors, "pixel_values": pixel_values}.items()}


def run_one(args: argparse.Namespace) -> dict:
    """One side, with or without checkpointing: steps per second and peak memory."""
    from peft import LoraConfig, get_peft_model

    configure_torch(args)
    dtype, checkpointing = DTYPES[args.dtype], args.one[1] == "checkpointing"
    config = fastvlm_config(args.sizes[0], args.layers)
    model = build(args.one[0], config, dtype, args.device, args.load_in_4bit, args.seed)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    model.get_base_model().model.vision_tower.eval()  # frozen: its BatchNorm keeps the checkpoint's statistics
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch(config, args.batch_size, dtype, args.device, args.seed)
    model_bytes = peak_memory_bytes(args.device) if args.device == "cuda" else process_status_bytes("VmRSS")
    reset_peak_memory(args.device)

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    synchronize(args.device)
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    return {
        "side": args.one[0],
        "checkpointing": checkpointing,
        "samples_per_second": args.steps * args.batch_size / elapsed,
        "seconds_per_step": elapsed / args.steps,
        "peak_bytes": peak_memory_bytes(args.device),
        "model_bytes": model_bytes,
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", type=lambda text: text.split(","), default=["0.5b"], help="0.5b, 1.5b or 7b")
    parser.add_argument("--layers", type=int, help="language-model layers (default: the size's)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default: 3)")
    parser.add_argument("--sides", type=lambda text: text.split(","), default=list(SIDES))
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 language model (ours only)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # SIDE plain|checkpointing, in the subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    runs = []
    for mode in ("plain", "checkpointing"):  # the sides one after the other, so that each pair shares the machine's load
        for side in args.sides:
            log(f"{side}, {mode} ...")
            command = [sys.executable, __file__, *sys.argv[1:], "--one", side, mode]
            command = [part for part in command if part != "--output"] if args.output is None else command
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                log(result.stderr[-3000:])
                sys.exit(f"{side}, {mode} failed")
            runs.append(json.loads(result.stdout.strip().splitlines()[-1]))

    headers = ["side", "checkpointing", "samples/s", "s/step", "peak GiB", "peak above model GiB", "vs ours plain"]
    reference = runs[0]["samples_per_second"]
    rows = [
        [run["side"], "yes" if run["checkpointing"] else "no", f"{run['samples_per_second']:.3f}",
         f"{run['seconds_per_step']:.2f}", gib(run["peak_bytes"]),
         gib(run["peak_bytes"] - run["model_bytes"]) if run["peak_bytes"] and run["model_bytes"] else "n/a",
         f"{run['samples_per_second'] / reference:.2f}×"]
        for run in runs
    ]  # fmt: skip
    machine = describe_machine(args.device)
    quantized = ", NF4 language model" if args.load_in_4bit else ""
    title = (f"### LoRA r=16 fine-tuning, FastVLM-{args.sizes[0].upper()} shapes, {args.dtype}{quantized}, batch "
             f"{args.batch_size} (one 1024 px image + {TEXT_TOKENS} text tokens per sample), {args.steps} steps after "
             f"{args.warmup} warm-up\n\n{machine_line(machine)}\n")  # fmt: skip
    write_results(args.output, {"settings": vars(args), "machine": machine, "runs": runs},
                  title + "\n" + markdown_table(headers, rows))  # fmt: skip


if __name__ == "__main__":
    main()

"""``fastvlm-hf finetune``: LoRA (or QLoRA with --load-in-4bit) on a JSONL file of rows, through TRL's SFTTrainer (see
``fastvlm_hf.training``); every row is checked before training starts; optionally the adapter merged into the model."""

from __future__ import annotations

import argparse
import os

from .loading import load_processor, locate, quantization_config, resolve_device, resolve_dtype
from .messages import CLIError, describe_load_error, first_line, status
from .options import add_command, add_model_options, positive_int

ADAPTER_FOLDER = "adapter"
MERGED_FOLDER = "merged"


def add_parser(commands) -> None:
    parser = add_command(
        commands,
        "finetune",
        run,
        help="fine-tune with LoRA (QLoRA with --load-in-4bit) on a JSONL file",
        description="Fine-tune a FastVLM checkpoint with LoRA adapters on the language model (the vision tower "
        'frozen) through TRL\'s SFTTrainer. Each line of the data is a row {"images": [paths], "messages": [chat '
        "messages]}; image paths are relative to the file. Every row is checked before training starts. Checkpoints "
        "go to OUTPUT/checkpoint-N (--resume continues from the last), the adapter to OUTPUT/adapter, and with "
        "--merge the merged model to OUTPUT/merged.",
    )
    data = parser.add_argument_group("data options")
    data.add_argument("--data", required=True, metavar="JSONL", help="training rows, one JSON object per line")
    data.add_argument("--eval-data", metavar="JSONL", help="evaluation rows, evaluated after each epoch")
    data.add_argument("--max-length", type=positive_int, default=2048, metavar="TOKENS",
                      help="longest row in tokens, image tokens included; longer rows lose their last tokens, and "
                           "a row that would lose image tokens is an error (default: 2048)")
    data.add_argument("--skip-bad-rows", action="store_true",
                      help="leave out rows that cannot be trained on (and count them) instead of stopping")  # fmt: skip
    add_model_options(parser)
    lora = parser.add_argument_group("adapter options")
    lora.add_argument("--lora-r", type=positive_int, default=16, metavar="R", help="LoRA rank (default: 16)")
    lora.add_argument("--lora-alpha", type=positive_int, default=32, metavar="ALPHA", help="LoRA alpha (default: 32)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, metavar="P", help="LoRA dropout (default: 0.05)")
    lora.add_argument("--train-projector", action="store_true", help="train the projector in full")
    lora.add_argument("--train-vision-tower", action="store_true", help="train the vision tower in full")
    training = parser.add_argument_group("training options")
    training.add_argument("--output", required=True, metavar="DIR", help="folder for checkpoints, adapter and model")
    training.add_argument("--epochs", type=float, default=1.0, metavar="N", help="passes over the data (default: 1)")
    training.add_argument("--max-steps", type=int, default=-1, metavar="N",
                          help="stop after N optimizer steps, whatever --epochs says")  # fmt: skip
    training.add_argument("--lr", type=float, default=2e-4, metavar="LR", help="peak learning rate (default: 2e-4)")
    training.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="rows per step (default: 1)")
    training.add_argument("--grad-accum", type=positive_int, default=8, metavar="N",
                          help="batches per optimizer step (default: 8)")
    training.add_argument("--save-steps", type=positive_int, metavar="N",
                          help="save a resumable checkpoint every N steps (default: at the end of each epoch)")
    training.add_argument("--no-gradient-checkpointing", action="store_true",
                          help="keep every activation: faster, much more memory")
    training.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    training.add_argument("--merge", action="store_true",
                          help="also write the model with the adapter merged in, in this package's layout")
    training.add_argument("--seed", type=int, default=0, help="(default: 0)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..training import DataError, FastVLMDataCollator, load_rows

    checkpoint = _checkpoint_to_resume(args.output) if args.resume else None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.model, cache_only = locate(args.model)
    processor = load_processor(args.model, args.resolution, args.image_mode, local_files_only=cache_only)
    collator = FastVLMDataCollator(processor, max_length=args.max_length)
    datasets = {}
    for name, path in (("training", args.data), ("evaluation", args.eval_data)):
        if path is None:
            continue
        status(f"Checking the {name} rows of {path} ...")
        try:
            datasets[name] = load_rows(path, collator, skip_bad_rows=args.skip_bad_rows)
        except DataError as error:
            raise CLIError(str(error)) from error
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read {path}: {first_line(error)}") from error
        for bad_row in datasets[name].skipped:
            status(f"Skipped {bad_row}")
        skipped = len(datasets[name].skipped)
        status(f"{len(datasets[name].rows)} {name} rows" + (f", {skipped} bad rows skipped" if skipped else ""))

    model = _load_model_for_training(args, device, dtype, cache_only)
    trainer = _trainer(args, model, processor, datasets, device, dtype)
    trainer.train(resume_from_checkpoint=checkpoint)

    adapter = os.path.join(args.output, ADAPTER_FOLDER)
    trainer.save_model(adapter)
    processor.save_pretrained(adapter)
    if args.merge:
        merged = os.path.join(args.output, MERGED_FOLDER)
        status("Merging the adapter into the model ...")
        _merge(args.model, adapter, merged, processor, dtype, cache_only)
        status(f"Adapter saved to {adapter}; merged model saved to {merged}")
    else:
        status(f"Adapter saved to {adapter}")
    return 0


def _load_model_for_training(args: argparse.Namespace, device: str, dtype, local_files_only: bool):
    from ..modeling_fastvlm import FastVLMForConditionalGeneration
    from ..training import prepare_model_for_training

    quantization = quantization_config(args, device)
    kwargs = {"dtype": dtype, "device_map": device, "local_files_only": local_files_only}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    bits = " 4-bit" if args.load_in_4bit else " 8-bit" if args.load_in_8bit else ""
    status(f"Loading model {args.model} on {device} ({str(dtype).removeprefix('torch.')}{bits}) ...")
    try:
        # FastVLM's own class, as predict: it loads every layout, and with local_files_only it asks the Hub for nothing
        # (the Auto classes still look for an adapter config there)
        model = FastVLMForConditionalGeneration.from_pretrained(args.model, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise CLIError(describe_load_error(args.model, error)) from error
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        from ..compat import kbit_training_arguments

        checkpointing = kbit_training_arguments(not args.no_gradient_checkpointing, {"use_reentrant": False})
        model = prepare_model_for_kbit_training(model, **checkpointing)
    return prepare_model_for_training(model)


def _trainer(args: argparse.Namespace, model, processor, datasets: dict, device: str, dtype):
    import torch
    from trl import SFTConfig

    from ..compat import checkpointing_arguments
    from ..training import lora_config, sft_trainer

    evaluation = "evaluation" in datasets
    config = SFTConfig(
        output_dir=args.output,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        **checkpointing_arguments(not args.no_gradient_checkpointing, {"use_reentrant": False}),
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "epoch",
        save_steps=args.save_steps or 500,
        eval_strategy="epoch" if evaluation else "no",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        report_to=[],
        seed=args.seed,
    )
    peft_config = lora_config(
        model,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        projector="full" if args.train_projector else "frozen",
        train_vision_tower=args.train_vision_tower,
    )
    return sft_trainer(
        model,
        processor,
        datasets["training"].rows,
        config,
        peft_config=peft_config,
        eval_rows=datasets["evaluation"].rows if evaluation else None,
        max_length=args.max_length,
    )


def _merge(model_id: str, adapter: str, output: str, processor, dtype, local_files_only: bool) -> None:
    from ..training import merge_adapter

    merged = merge_adapter(model_id, adapter, dtype=dtype, local_files_only=local_files_only)
    merged.save_pretrained(output)
    processor.save_pretrained(output)


def _checkpoint_to_resume(output: str) -> str:
    """The last checkpoint in `output` that was saved completely; one whose saving was cut short is passed over."""
    from ..training import last_complete_checkpoint

    checkpoint, incomplete = last_complete_checkpoint(output)
    for folder in incomplete:
        status(f"{folder} was not saved completely (the run was stopped while saving it); it is passed over")
    if checkpoint is None:
        raise CLIError(f"--resume: no complete checkpoint in {output} to continue from; run without --resume")
    status(f"Resuming from {checkpoint}")
    return checkpoint

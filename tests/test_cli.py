"""The `fastvlm-hf` command against a tiny local checkpoint, in-process and as a subprocess."""

import http.server
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import give_weights_decisive_answers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import fastvlm_hf
import fastvlm_hf.cpu
from fastvlm_hf import FastViTHDModel, FastVLMForConditionalGeneration, FastVLMModel
from fastvlm_hf.chat import ChatSession
from fastvlm_hf.cli import bench as bench_command
from fastvlm_hf.cli import build_parser, main
from fastvlm_hf.cli.loading import load_model, quantization_config, resolve_device, resolve_dtype
from fastvlm_hf.cli.messages import describe_load_error
from fastvlm_hf.cli.notices import hide_dependency_notices
from fastvlm_hf.cli.options import generation_kwargs
from fastvlm_hf.compat import NEWEST_TESTED_TRANSFORMERS
from fastvlm_hf.cpu.packed_linear import PackedLinear

PROMPT = "Describe the image."
STATS_LABELS = ["preprocessing", "vision encoder", "prefill", "TTFT", "decode"]


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tiny_processor, tmp_path_factory):
    """The tiny FastVLM with weights drawn large enough that its answers depend on the image and the prompt (the
    shared tiny model answers the same whitespace whatever it is shown, which no equality test could fail on)."""
    torch.manual_seed(0)
    model = FastVLMForConditionalGeneration(tiny_config).eval()
    give_weights_decisive_answers(model)
    path = tmp_path_factory.mktemp("tiny-fastvlm-cli")
    model.save_pretrained(path)
    tiny_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint's processor and model, loaded as a user of transformers would, with its weights packed as the CLI
    packs them on CPU: packed and plain float32 kernels round differently, which could flip a greedy token on a near
    tie, so the answers are compared between models that compute alike."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.pack_weights()
    return processor, model


def _save_image(path, background, square):
    image = Image.new("RGB", (180, 120), background)
    image.paste(square, (20, 20, 90, 90))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    return _save_image(tmp_path_factory.mktemp("images") / "scene.png", (250, 250, 250), (30, 160, 30))


@pytest.fixture(scope="module")
def other_image_path(tmp_path_factory):
    return _save_image(tmp_path_factory.mktemp("images") / "night.png", (0, 0, 0), (255, 255, 255))


def reference_inputs(processor, image_paths, prompt):
    content = [{"type": "image", "image": Image.open(path)} for path in image_paths]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip


def expected_answer(reference, image_paths, prompt, max_new_tokens):
    processor, model = reference
    inputs = reference_inputs(processor, image_paths, prompt)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def model_args(checkpoint, *extra):
    return ["--model", str(checkpoint), "--device", "cpu", "--dtype", "float32", *extra]


def predict_args(checkpoint, image_path, *extra, prompt=PROMPT):
    return ["predict", *model_args(checkpoint), "--image", str(image_path), "--prompt", prompt, "--max-new-tokens", "6", *extra]  # fmt: skip


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("fastvlm-hf: error:")]


# --------------------------------------------------------------------------------------------------
# predict


def test_cpu_model_runs_with_packed_language_model_weights(checkpoint):
    model = load_model(str(checkpoint), "cpu", torch.float32)
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, PackedLinear)
    assert type(model.model.multi_modal_projector.linear_1) is torch.nn.Linear


def test_streamed_answer_equals_the_non_streamed_text(checkpoint, reference, image_path, capsys):
    assert main(predict_args(checkpoint, image_path)) == 0
    captured = capsys.readouterr()
    expected = expected_answer(reference, [image_path], PROMPT, 6)
    assert expected.strip()
    assert captured.out == expected + "\n"
    assert "Loading model" in captured.err and "Loading" not in captured.out


def test_subprocess_run(checkpoint, reference, image_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf.cli", *predict_args(checkpoint, image_path)],
        check=False, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip: bytes, as written (no newline translation)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (expected_answer(reference, [image_path], PROMPT, 6) + "\n").encode()


def test_several_images_make_one_prompt(checkpoint, reference, image_path, other_image_path, capsys):
    images = [image_path, other_image_path]
    assert main(predict_args(checkpoint, image_path, "--image", str(other_image_path), "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    expected_tokens = reference_inputs(reference[0], images, PROMPT)["input_ids"].shape[1]
    assert report["timings"]["prompt_tokens"] == expected_tokens
    assert report["text"] == expected_answer(reference, images, PROMPT, 6)
    assert report["text"] != expected_answer(reference, [image_path], PROMPT, 6)
    assert report["settings"]["images"] == [str(path) for path in images]


def test_json_is_one_object_with_text_model_settings_and_timings(checkpoint, reference, image_path, capsys):
    assert main(predict_args(checkpoint, image_path, "--json")) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1
    report = json.loads(captured.out)
    assert set(report) == {"text", "model", "settings", "timings"}
    assert report["text"] == expected_answer(reference, [image_path], PROMPT, 6)
    assert report["model"] == str(checkpoint)
    assert report["settings"] == {
        "images": [str(image_path)], "prompt": PROMPT, "system_prompt": None, "device": "cpu", "dtype": "float32",
        "quantization": None, "max_new_tokens": 6, "temperature": 0.0, "top_p": None, "num_beams": 1,
        "resolution": 128, "image_mode": "pad",
    }  # fmt: skip
    timings = report["timings"]
    for key in ["preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s"]:
        assert isinstance(timings[key], float) and timings[key] > 0, key
    assert timings["new_tokens"] == 6 and timings["prompt_tokens"] == reference_inputs(reference[0], [image_path], PROMPT)["input_ids"].shape[1]  # fmt: skip
    assert timings["ttft_ms"] >= timings["vision_ms"] + timings["prefill_ms"]


def test_stats_go_to_stderr_after_the_answer(checkpoint, reference, image_path, capsys):
    assert main(predict_args(checkpoint, image_path, "--stats")) == 0
    captured = capsys.readouterr()
    assert captured.out == expected_answer(reference, [image_path], PROMPT, 6) + "\n"
    stats = captured.err[captured.err.index("--- stats ---") :].splitlines()[1:]
    assert [line.split("  ")[0] for line in stats] == STATS_LABELS
    for line in stats:
        assert re.search(r"\d+\.\d ms", line), line
    assert "tokens/s (6 new tokens" in stats[-1]


def test_system_prompt_and_beam_search(checkpoint, reference, image_path, capsys):
    processor, model = reference
    assert main(predict_args(checkpoint, image_path, "--system-prompt", "Answer briefly.", "--num-beams", "2")) == 0
    messages = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "image", "image": Image.open(image_path)}, {"type": "text", "text": PROMPT}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=2)
    assert capsys.readouterr().out == processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) + "\n"  # fmt: skip


def test_resolution_and_image_mode_set_the_image_processor(checkpoint, reference, image_path, capsys):
    assert main(predict_args(checkpoint, image_path, "--json", "--resolution", "192", "--image-mode", "crop")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["resolution"] == 192 and report["settings"]["image_mode"] == "crop"
    default_tokens = reference_inputs(reference[0], [image_path], PROMPT)["input_ids"].shape[1]
    assert report["timings"]["prompt_tokens"] == default_tokens - 2 * 2 + 3 * 3  # 192 / 64 = 3 tokens a side


@pytest.mark.parametrize(
    "options,expected",
    [
        ([], {"max_new_tokens": 256, "do_sample": False}),
        (["--temperature", "0", "--top-p", "0.9"], {"max_new_tokens": 256, "do_sample": False}),
        (["--temperature", "0.7", "--top-p", "0.9"], {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7, "top_p": 0.9}),
        (["--num-beams", "3", "--max-new-tokens", "9"], {"max_new_tokens": 9, "do_sample": False, "num_beams": 3}),
    ],
)  # fmt: skip
def test_temperature_zero_is_greedy_and_above_zero_samples(options, expected):
    args = build_parser().parse_args(["predict", "--image", "x.png", "--prompt", "p", *options])
    assert generation_kwargs(args) == expected


def test_image_from_a_url(checkpoint, reference, image_path, capsys):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(image_path.parent), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert main(predict_args(checkpoint, f"http://127.0.0.1:{server.server_port}/{image_path.name}")) == 0
    finally:
        server.shutdown()
    assert capsys.readouterr().out == expected_answer(reference, [image_path], PROMPT, 6) + "\n"


# --------------------------------------------------------------------------------------------------
# chat


class Sessions:
    """Records the chat sessions the CLI creates and counts the vision encoder's forward calls."""

    def __init__(self, monkeypatch):
        self.created = []
        self.vision_calls = 0
        self.positions_computed = 0  # sequence positions run through the model, over all forward calls
        original_init, original_forward = ChatSession.__init__, FastViTHDModel.forward
        original_model_forward = FastVLMModel.forward

        def init(session, *args, **kwargs):
            original_init(session, *args, **kwargs)
            self.created.append(session)

        def forward(module, *args, **kwargs):
            self.vision_calls += 1
            return original_forward(module, *args, **kwargs)

        def model_forward(module, input_ids=None, *args, **kwargs):
            self.positions_computed += input_ids.shape[1]
            return original_model_forward(module, input_ids, *args, **kwargs)

        monkeypatch.setattr(ChatSession, "__init__", init)
        monkeypatch.setattr(FastVLMModel, "forward", model_forward)
        monkeypatch.setattr(FastViTHDModel, "forward", forward)


class TTYInput(io.StringIO):
    def isatty(self):
        return True


def run_chat(monkeypatch, capsys, checkpoint, image_path, lines, stdin_class=io.StringIO, max_new_tokens=6):
    monkeypatch.setattr(sys, "stdin", stdin_class("".join(f"{line}\n" for line in lines)))
    status = main(["chat", *model_args(checkpoint), "--image", str(image_path), "--max-new-tokens", str(max_new_tokens)])  # fmt: skip
    assert status == 0
    return capsys.readouterr()


def test_chat_encodes_the_image_once_and_continues_from_the_cache(checkpoint, reference, image_path, monkeypatch, capsys):
    processor, model = reference
    sessions = Sessions(monkeypatch)
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, [PROMPT, "What colour is the square?"])
    assert sessions.vision_calls == 1
    session = sessions.created[0]
    # Every position is computed once (the last generated token never is): the second turn ran only its new tokens.
    assert sessions.positions_computed == session.input_ids.shape[1] - 1
    first_answer = expected_answer(reference, [image_path], PROMPT, 6)
    second_prompt = session.input_ids[:, : session.prompt_tokens]
    with torch.no_grad():  # a fresh prefill of the whole conversation, image included, without any cache
        fresh = model.generate(input_ids=second_prompt, attention_mask=torch.ones_like(second_prompt),
                               pixel_values=reference_inputs(processor, [image_path], PROMPT)["pixel_values"],
                               max_new_tokens=6, do_sample=False)  # fmt: skip
    assert torch.equal(session.input_ids, fresh)
    second_answer = processor.decode(fresh[0, session.prompt_tokens :], skip_special_tokens=True)
    assert captured.out == f"{first_answer}\n{second_answer}\n"
    assert "> " not in captured.err


@pytest.mark.parametrize("ends_with_eos", [False, True])
def test_chat_turns_follow_the_chat_template(reference, image_path, ends_with_eos):
    """Each turn's token sequence reads as the chat template's rendering of the whole conversation, whether the last
    answer ended with the end-of-turn token or was cut at max_new_tokens."""
    processor, model = reference
    kwargs = {"max_new_tokens": 3, "do_sample": False}
    if ends_with_eos:
        kwargs["forced_eos_token_id"] = processor.tokenizer.eos_token_id
    session = ChatSession(model, processor, [Image.open(image_path)], kwargs)
    session.ask(PROMPT)
    first_prompt_tokens, first_end = session.prompt_tokens, session.input_ids.shape[1]
    session.ask("And the colour?")
    answer_ids = session.input_ids[0, first_prompt_tokens:first_end]
    assert (answer_ids[-1] == processor.tokenizer.eos_token_id) == ends_with_eos
    if ends_with_eos:  # the template writes the end of the answer itself
        answer_ids = answer_ids[:-1]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": processor.decode(answer_ids)}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_tokens = int((session.input_ids == processor.image_token_id).sum())
    assert image_tokens > 0
    expected = rendered.replace("<image>", "<image>" * image_tokens)
    assert processor.decode(session.input_ids[0, : session.prompt_tokens]) == expected


def test_chat_reset_and_image_commands(checkpoint, reference, image_path, other_image_path, monkeypatch, capsys):
    sessions = Sessions(monkeypatch)
    lines = [PROMPT, "/reset", PROMPT, f"/image {other_image_path}", PROMPT, "/exit", "never asked"]
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, lines)
    assert sessions.vision_calls == 2  # /reset reuses the cached image prefix; /image encodes the new image
    first = expected_answer(reference, [image_path], PROMPT, 6)
    other = expected_answer(reference, [other_image_path], PROMPT, 6)
    assert first != other
    assert captured.out == f"{first}\n{first}\n{other}\n"
    assert "New conversation about the same image." in captured.err
    assert f"New conversation about {other_image_path}." in captured.err


def test_chat_bad_image_command_keeps_the_conversation(checkpoint, image_path, tmp_path, monkeypatch, capsys):
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, [f"/image {tmp_path / 'missing.png'}", "/nonsense"])
    assert "image not found" in captured.err and "Unknown command '/nonsense'" in captured.err
    assert captured.out == ""


def test_chat_prompts_only_when_a_person_types(checkpoint, image_path, monkeypatch, capsys):
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, [PROMPT], stdin_class=TTYInput)
    assert captured.err.count("> ") == 2 and "/reset" in captured.err  # the question, then the end of input
    assert "> " not in captured.out


def test_chat_subprocess_with_piped_questions(checkpoint, image_path, monkeypatch, capsys):
    questions = [PROMPT, "What colour is the square?"]
    in_process = run_chat(monkeypatch, capsys, checkpoint, image_path, questions).out
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf.cli", "chat", *model_args(checkpoint), "--image", str(image_path),
         "--max-new-tokens", "6"],
        input=("\n".join(questions) + "\n").encode(), check=False, capture_output=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip: bytes, as written (no newline translation)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == in_process.encode() and len(in_process.strip()) > 0


def test_a_chat_past_the_context_ends_the_turn_with_one_line_and_goes_on_after_reset(
    checkpoint, reference, image_path, tmp_path, monkeypatch, capsys
):
    processor, _ = reference
    short = tmp_path / "short-context"
    shutil.copytree(checkpoint, short)
    config = json.loads((short / "config.json").read_text())
    limit = reference_inputs(processor, [image_path], PROMPT)["input_ids"].shape[1] + 40  # room for a few turns
    config["text_config"]["max_position_embeddings"] = limit
    (short / "config.json").write_text(json.dumps(config))
    held = []  # after each turn: tokens of the conversation, tokens in its cache, messages
    ask = ChatSession.ask

    def recording_ask(session, *args, **kwargs):
        try:
            return ask(session, *args, **kwargs)
        finally:
            if session.input_ids is not None:
                held.append((session.input_ids.shape[1], session.cache.get_seq_length(), len(session.messages)))

    monkeypatch.setattr(ChatSession, "ask", recording_ask)
    questions = [PROMPT, *["What colour is the square?"] * 48]
    captured = run_chat(monkeypatch, capsys, short, image_path, [*questions, "/reset", PROMPT])

    lines = captured.err.splitlines()
    full = [index for index, line in enumerate(lines) if "has filled the model's context" in line]
    assert len(full) == 1, captured.err
    assert lines[full[0]] == (f"fastvlm-hf: the conversation has filled the model's context ({limit} tokens), so the "
                              "answer stops here; /reset starts a new conversation about the same image")  # fmt: skip
    refused = lines[full[0] + 1 :][: -1]  # then each question that no longer fits, one line each; then /reset's line
    answered = len(questions) - len(refused)
    assert 1 < answered < len(questions) - 10  # the context filled after a few turns, and the chat went on asking
    assert all(re.fullmatch(r"fastvlm-hf: error: the prompt is \d+ tokens but the model's context holds "
                            rf"{limit} .*; /reset starts a new conversation", line) for line in refused), refused  # fmt: skip
    assert lines[-1] == "New conversation about the same image." and "Traceback" not in captured.err
    answers = captured.out.splitlines()
    assert len(answers) == answered + 1 and answers[-1] == expected_answer(reference, [image_path], PROMPT, 6)
    assert all(tokens <= limit and cached <= limit for tokens, cached, _ in held)  # memory bounded by the context
    assert len({messages for _, _, messages in held[answered - 1 : -1]}) == 1  # refused turns keep nothing


# --------------------------------------------------------------------------------------------------
# bench


def test_bench_prints_a_markdown_table(checkpoint, image_path, capsys):
    args = ["bench", *model_args(checkpoint), "--image", str(image_path), "--repeats", "2", "--max-new-tokens", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == "| phase | median | min | max |"
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]]
    assert names == ["preprocessing (ms)", "vision encoder (ms)", "prefill (ms)", "TTFT (ms)", "decode (ms/token)",
                     "decode (tokens/s)", "TTFT, follow-up chat turn (ms)"]  # fmt: skip
    for row in rows[1:]:
        median, low, high = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
        assert 0 < low <= median <= high, row
    assert "2 runs" in out


# --------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "make_image,message",
    [
        (lambda tmp: tmp / "missing.png", "image not found"),
        (lambda tmp: tmp, "got a directory"),
        (lambda tmp: (tmp / "notes.png").write_bytes(b"this is not a png") and tmp / "notes.png", "not an image file"),
    ],
)
def test_unusable_image_is_a_one_line_error(checkpoint, tmp_path, capsys, make_image, message):
    assert main(predict_args(checkpoint, make_image(tmp_path))) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_model_folder_is_a_one_line_error(image_path, tmp_path, capsys):
    assert main(predict_args(tmp_path / "no-such-model", image_path)) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_unknown_repo_offline_says_how_to_get_the_model(image_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf.cli", *predict_args("nobody/no-such-fastvlm", image_path)],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "'nobody/no-such-fastvlm' is not in the local Hugging Face cache" in line
    assert "HF_HUB_OFFLINE" in line and "--model PATH" in line


def test_a_repo_the_hub_does_not_know_is_reported_as_such():
    from huggingface_hub.errors import RepositoryNotFoundError

    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(not_found, "404 Client Error. Repository Not Found")
    error = OSError("nobody/x is not a local folder and is not a valid model identifier")
    error.__cause__ = not_found
    message = describe_load_error("nobody/x", error)
    assert "neither a local folder nor a repo on the Hugging Face Hub" in message and "--model PATH" in message


def test_cuda_requested_without_cuda(checkpoint, image_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(predict_args(checkpoint, image_path, "--device", "cuda")) == 1
    err = capsys.readouterr().err
    assert err.strip() == "fastvlm-hf: error: --device cuda was requested but no CUDA device is available; try --device cpu"  # fmt: skip


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_quantization_without_bitsandbytes(checkpoint, image_path, monkeypatch, capsys, flag):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    assert main(predict_args(checkpoint, image_path, flag)) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"fastvlm-hf: error: {flag} needs bitsandbytes: pip install 'fastvlm-hf[bnb]'"


def test_prompt_longer_than_the_context(checkpoint, image_path, capsys):
    assert main(predict_args(checkpoint, image_path, prompt="cat " * 600)) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert re.search(r"the prompt is \d+ tokens but the model's context holds 512", line)
    assert "Traceback" not in err and err.strip().endswith(line)


@pytest.mark.parametrize("resolution", ["100", "1000"])
def test_resolution_must_be_a_multiple_of_64(checkpoint, image_path, capsys, resolution):
    assert main(predict_args(checkpoint, image_path, "--resolution", resolution)) == 1
    err = capsys.readouterr().err
    assert err.strip().startswith(f"fastvlm-hf: error: --resolution {resolution} is not a multiple of 64")
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(image_path, tmp_path):
    with pytest.raises(Exception, match="image not found"):
        main(predict_args(tmp_path, tmp_path / "missing.png", "--debug"))


# --------------------------------------------------------------------------------------------------
# Help

MODEL_OPTIONS = ["--model", "--device", "--dtype", "--load-in-4bit", "--load-in-8bit", "--resolution", "--image-mode"]
GENERATION_OPTIONS = ["--max-new-tokens", "--temperature", "--top-p", "--system-prompt"]


def options_by_group(help_text):
    """{section title: the options listed under it} of an argparse `--help` text."""
    groups, current = {}, None
    for line in help_text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = groups.setdefault(line[:-1], [])
        elif current is not None and (option := re.match(r"  (-[\w-]+)", line)):
            current.append(option[1])
    return groups


@pytest.mark.parametrize(
    "command,expected",
    [
        ("predict", {"model options": MODEL_OPTIONS, "generation options": [*GENERATION_OPTIONS, "--num-beams"],
                     "output options": ["--stats", "--json"]}),
        ("chat", {"model options": MODEL_OPTIONS, "generation options": GENERATION_OPTIONS}),
        ("bench", {"model options": MODEL_OPTIONS, "generation options": ["--max-new-tokens"]}),
        ("convert", {"output options": ["--to", "--dtype", "--max-shard-size", "--overwrite", "--push-to-hub"]}),
        ("export", {"output options": ["--dtype", "--resolution", "--overwrite"]}),
    ],
)  # fmt: skip
def test_help_lists_model_generation_and_output_options_in_their_groups(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    groups = options_by_group(capsys.readouterr().out)
    assert {title: options for title, options in groups.items() if title.endswith(" options")} == expected
    assert groups["options"][:2] == ["-h", "--debug"]


def without_torchvision_shim(env):
    """`env` without the tests' torchvision shim, which imports torch at start-up."""
    shim = os.path.abspath(os.path.join(os.path.dirname(__file__), "torchvision_shim"))
    paths = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path and os.path.abspath(path) != shim]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.mark.parametrize(
    "argv, exit_code",
    [(["--help"], 0), (["--version"], 0), (["predict", "--help"], 0), (["convert", "--help"], 0),
     (["export", "--help"], 0), (["convert", "a", "b", "--max-shard-size", "lots"], 2),
     (["export", "a", "b", "--dtype", "fp32,q5"], 2)],
)  # fmt: skip
def test_help_version_and_usage_errors_import_neither_torch_nor_transformers(argv, exit_code):
    code = (
        "import json, sys\n"
        "sys.modules['torchvision'] = None\n"  # without the shim it may not import: keep a regression to the assert
        "import fastvlm_hf_cli\n"
        "try:\n"
        "    fastvlm_hf_cli.main(sys.argv[1:])\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "print(json.dumps([code, sorted({'torch', 'transformers'} & set(sys.modules))]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                            env=without_torchvision_shim(os.environ))  # fmt: skip
    assert result.returncode == 0, result.stderr
    *printed, last = result.stdout.splitlines()
    assert json.loads(last) == [exit_code, []]
    if argv[-1] == "--help":
        assert printed[0].startswith("usage: fastvlm-hf")
    elif argv == ["--version"]:
        assert printed[0].startswith("fastvlm-hf ")
    elif argv[0] == "export":
        assert result.stderr.splitlines()[-1].endswith("--dtype: unknown dtype q5; choose from fp32, fp16, q8, q4")
    else:
        assert result.stderr.splitlines()[-1].endswith("--max-shard-size: not a size: 'lots'; write bytes, or e.g. 500MB or 5GB")  # fmt: skip


def test_the_untested_release_notice_is_one_line_of_the_command(tmp_path):
    """On a transformers newer than the newest tested, the command says so in one line of its own, not as a Python
    warning with a file name and a source line. Shown with a copy of the package that was tested up to 4.0 only."""
    package = Path(fastvlm_hf.__file__).parent
    shutil.copytree(package, tmp_path / "fastvlm_hf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(package.parent / "fastvlm_hf_cli.py", tmp_path)
    compat = tmp_path / "fastvlm_hf" / "compat.py"
    compat.write_text(compat.read_text().replace(f'= "{NEWEST_TESTED_TRANSFORMERS}"', '= "4.0"', 1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    args = ["predict", "--model", "./no-such-folder", "--image", "x.png", "--prompt", "hi"]
    result = subprocess.run([sys.executable, "-W", "default", "-m", "fastvlm_hf_cli", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 1
    notice, *rest = result.stderr.splitlines()
    assert notice.startswith("fastvlm-hf: note: fastvlm-hf is tested with transformers up to 4.0.x and "), notice
    assert rest and all(line.startswith("fastvlm-hf: error: ") for line in rest), result.stderr
    assert without_the_untested_release_notice(result.stderr) == rest


def test_the_command_drops_what_bitsandbytes_and_kernels_log_about_each_other_and_nothing_else(capfd):
    """With the `kernels` package installed (transformers 5.25 brings it), bitsandbytes on an AVX512-BF16 CPU asks it
    for a CPU kernel from the Hub at load time and logs its failure offline, and `kernels` logs that it skipped the
    publisher check: two lines a user reads as a broken load. The command drops those two, by their text."""
    hide_dependency_notices()
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please make sure you already `pip "
        "install kernels` and the kernels >= 0.11.1"
    )
    logging.getLogger("kernels._internals.hf_hub").warning(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub "
        "is in offline mode."
    )
    logging.getLogger("bitsandbytes.some_module").warning("a warning of its own")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        hide_dependency_notices()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(warning.message) for warning in caught] == ["something else is deprecated"]
    assert capfd.readouterr().err.splitlines() == ["a warning of its own"]


def test_the_entry_point_runs_commands_with_the_package_registered(checkpoint, reference, image_path):
    after_help = (
        "import sys\n"
        "import fastvlm_hf_cli\n"
        "try:\n"
        "    fastvlm_hf_cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import fastvlm_hf\n"
        "from transformers import AutoConfig\n"
        "assert type(AutoConfig.for_model('fastvlm')) is fastvlm_hf.FastVLMConfig\n"
    )
    result = subprocess.run([sys.executable, "-c", after_help], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf_cli", *predict_args(checkpoint, image_path)],
        check=False, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (expected_answer(reference, [image_path], PROMPT, 6) + "\n").encode()


# --------------------------------------------------------------------------------------------------
# The Hub out of reach


def unreachable_hub(tmp_path):
    """The environment of a command whose Hub refuses every connection and whose Hugging Face cache is empty."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and closed once the socket is
    env = {name: value for name, value in os.environ.items() if name not in {"HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"}}  # fmt: skip
    python_path = os.pathsep.join(os.path.abspath(path) for path in env.get("PYTHONPATH", "").split(os.pathsep) if path)
    # absolute: the command runs in `tmp_path`
    # Hub kernels enabled as transformers has them by default (5.25+): they must add no request of their own
    return {**env, "PYTHONPATH": python_path, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf-home"),
            "USE_HUB_KERNELS": "YES"}  # fmt: skip


def without_the_untested_release_notice(stderr: str) -> list[str]:
    """The command's lines on stderr, less its one-line notice that transformers is newer than the newest tested."""
    return [line for line in stderr.splitlines() if not line.startswith("fastvlm-hf: note: fastvlm-hf is tested with")]


@pytest.mark.parametrize("model", ["apple/FastVLM-0.5B", "checkpoints/fastvlm"])
def test_an_unreachable_hub_ends_the_wait_at_once_with_one_line(model, image_path, tmp_path):
    # `checkpoints/fastvlm`: a folder meant, but neither it nor `checkpoints` exists, so it reads as a Hub id too
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf_cli", "predict", "--model", model, "--image", str(image_path), "--prompt", "hi"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=unreachable_hub(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    loading, *rest = without_the_untested_release_notice(result.stderr.strip())
    assert loading.startswith(f"Loading model {model} on ")
    assert rest == [
        f"fastvlm-hf: error: cannot download model {model!r} (no connection to the Hugging Face Hub?): it is neither in "
        "the local cache nor a local folder; connect once to download it, or pass a local folder with --model PATH "
        "(HF_HUB_OFFLINE=1 then uses the cache only)"
    ]  # nothing between: no retries


def test_an_unreachable_hub_loads_a_cached_model_at_once(checkpoint, reference, image_path, tmp_path):
    repo = tmp_path / "hf-home" / "hub" / "models--nobody--tiny-fastvlm"
    revision = "0" * 40
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf_cli", *predict_args("nobody/tiny-fastvlm", image_path)],
        cwd=tmp_path, capture_output=True, timeout=300, env=unreachable_hub(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (expected_answer(reference, [image_path], PROMPT, 6) + "\n").encode()
    stderr = result.stderr.decode()
    assert "No connection to the Hugging Face Hub: using the cached copy of nobody/tiny-fastvlm." in stderr
    assert "Retrying in" not in stderr and "thrown while requesting" not in stderr  # huggingface_hub's retries


# --------------------------------------------------------------------------------------------------
# Device and dtype choices


@pytest.mark.parametrize(
    "cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == expected


@pytest.mark.parametrize(
    "device, native_bf16, expected",
    [("cuda", False, torch.bfloat16), ("mps", True, torch.float16), ("cpu", True, torch.bfloat16),
     ("cpu", False, torch.float32)],
)  # fmt: skip
def test_dtype_auto_is_bfloat16_only_where_it_is_computed_natively(monkeypatch, device, native_bf16, expected):
    monkeypatch.setattr(fastvlm_hf.cpu, "has_native_bfloat16", lambda: native_bf16)
    assert resolve_dtype("auto", device) is expected
    assert resolve_dtype("float16", device) is torch.float16  # an explicit choice stands


@pytest.mark.parametrize("device, compute_dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_load_in_4bit_is_nf4_with_the_compute_dtype_of_the_device(monkeypatch, device, compute_dtype):
    pytest.importorskip("bitsandbytes", reason="the bnb extra")
    monkeypatch.setattr(fastvlm_hf.cpu, "has_native_bfloat16", lambda: False)
    args = build_parser().parse_args(["predict", "--image", "x.png", "--prompt", "hi", "--load-in-4bit"])
    config = quantization_config(args, device)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype is compute_dtype


WITHOUT_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # a CPU with AVX2 at most


def test_without_native_bfloat16_the_encoder_falls_back_and_predict_chooses_float32(checkpoint, image_path):
    env = {**os.environ, **WITHOUT_NATIVE_BF16, "HF_HUB_OFFLINE": "1"}
    encoder = (
        "import torch\n"
        "from fastvlm_hf import FastViTHDConfig, FastViTHDModel\n"
        "from fastvlm_hf.cpu import fast_routes_off, has_native_bfloat16\n"
        "assert not has_native_bfloat16()\n"
        "model = FastViTHDModel(FastViTHDConfig(depths=[1, 1, 1, 1, 1], embed_dims=[8, 16, 32, 64, 128])).eval()\n"
        "model = model.to(torch.bfloat16)\n"
        "pixels = torch.rand(1, 3, 128, 128, dtype=torch.bfloat16)\n"
        "with torch.no_grad():\n"
        "    features = model(pixels).last_hidden_state\n"
        "    with fast_routes_off():\n"
        "        assert torch.equal(features, model(pixels).last_hidden_state)\n"
    )
    result = subprocess.run([sys.executable, "-c", encoder], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr

    args = ["predict", "--model", str(checkpoint), "--device", "cpu", "--image", str(image_path), "--prompt", PROMPT,
            "--max-new-tokens", "6", "--json"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["dtype"] == "float32"
    assert report["timings"]["new_tokens"] == 6  # AVX2's float32 kernels round otherwise: no text to compare to


def test_json_with_beam_search_has_no_time_to_first_token(checkpoint, image_path, capsys):
    # beam search does not stream, so no first-token time can be read; the key stays, as null
    assert main(predict_args(checkpoint, image_path, "--num-beams", "2", "--json")) == 0
    timings = json.loads(capsys.readouterr().out)["timings"]
    assert "ttft_ms" in timings and timings["ttft_ms"] is None


def test_bench_without_an_image_uses_its_picture_and_generates_exactly_the_tokens_asked(checkpoint, monkeypatch, capsys):
    pictures, new_tokens = [], []
    make_picture = bench_command._bench_image
    monkeypatch.setattr(bench_command, "_bench_image", lambda: pictures.append(make_picture()) or pictures[-1])
    generate = FastVLMForConditionalGeneration.generate

    def counting_generate(self, *args, **kwargs):
        output = generate(self, *args, **kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(FastVLMForConditionalGeneration, "generate", counting_generate)
    assert main(["bench", *model_args(checkpoint), "--repeats", "2", "--max-new-tokens", "3"]) == 0
    assert [picture.size for picture in pictures] == [(1024, 768)]
    assert new_tokens and set(new_tokens) == {3}  # every turn, first and follow-up, warm-up included
    assert "3 new tokens" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Bad input: one line, nothing lost


def test_image_placeholders_typed_in_the_prompt_are_one_line(checkpoint, image_path, capsys):
    assert main(predict_args(checkpoint, image_path, prompt="<image> what <image>")) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "2 `<image>` in the prompt" in line and "--image" in line


def test_an_image_placeholder_in_a_chat_question_is_refused_and_the_chat_goes_on(
    checkpoint, reference, image_path, monkeypatch, capsys
):
    sessions = Sessions(monkeypatch)
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, ["what is <image>?", PROMPT])
    [line] = error_lines(captured.err)
    assert "1 `<image>` in the question" in line
    [session] = sessions.created
    assert session.input_ids is not None and int((session.input_ids == session.model.config.image_token_id).sum()) == 4
    assert captured.out == expected_answer(reference, [image_path], PROMPT, 6) + "\n"  # the only turn taken


def test_an_image_too_large_to_open_safely_is_one_line_and_chat_goes_on(
    checkpoint, image_path, tmp_path, monkeypatch, capsys
):
    # Pillow refuses images over twice its limit (a 20000×20000 PNG by default); a lower limit stands in for one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # the scene (180×120) opens, with a warning only
    huge = tmp_path / "huge.png"
    Image.new("RGB", (300, 300), (9, 9, 9)).save(huge)
    assert main(predict_args(checkpoint, huge)) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert f"image {huge} is too large to open safely" in line and "exceeds limit of 40000 pixels" in line

    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, [f"/image {huge}", PROMPT])
    [line] = error_lines(captured.err)
    assert "too large to open safely" in line
    assert captured.out.strip()  # the conversation went on about the first image


def test_a_missing_relative_folder_with_one_slash_is_reported_as_a_folder(image_path, tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", "checkpoints/fastvlm", "--image", str(image_path), "--prompt", "hi"]) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "model folder not found: checkpoints/fastvlm" in line


@pytest.mark.skipif(not hasattr(transformers, "FastVlmConfig"), reason="transformers' fast_vlm layout exists from 5.0")
def test_a_native_fast_vlm_folder_runs_with_this_packages_classes(checkpoint, image_path, tmp_path, monkeypatch, capsys):
    from checkpoint_helpers import write_native_checkpoint

    model = FastVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    native = write_native_checkpoint(tmp_path / "native", model)
    AutoProcessor.from_pretrained(checkpoint).tokenizer.save_pretrained(native)
    assert json.loads((native / "config.json").read_text())["model_type"] == "fast_vlm"
    monkeypatch.setitem(sys.modules, "timm", None)  # the native classes would need timm; ours do not
    assert main(["predict", "--model", str(native), "--device", "cpu", "--dtype", "float32", "--image", str(image_path),
                 "--prompt", PROMPT, "--max-new-tokens", "6", "--resolution", "128"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out.strip() and error_lines(captured.err) == []

"""`fastvlm-hf predict` against a tiny local checkpoint, in-process and as a subprocess."""

import http.server
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
import transformers
from helpers.cli import PROMPT, error_lines, expected_answer, predict_args, reference_inputs
from PIL import Image
from transformers import AutoProcessor

from fastvlm_hf import FastVLMForConditionalGeneration
from fastvlm_hf.cli import build_parser, main
from fastvlm_hf.cli.loading import load_model
from fastvlm_hf.cli.options import generation_kwargs
from fastvlm_hf.cpu.packed_linear import PackedLinear

STATS_LABELS = ["preprocessing", "vision encoder", "prefill", "TTFT", "decode"]


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


def test_json_with_beam_search_has_no_time_to_first_token(checkpoint, image_path, capsys):
    # beam search does not stream, so no first-token time can be read; the key stays, as null
    assert main(predict_args(checkpoint, image_path, "--num-beams", "2", "--json")) == 0
    timings = json.loads(capsys.readouterr().out)["timings"]
    assert "ttft_ms" in timings and timings["ttft_ms"] is None


@pytest.mark.skipif(not hasattr(transformers, "FastVlmConfig"), reason="transformers' fast_vlm layout exists from 5.0")
def test_a_native_fast_vlm_folder_runs_with_this_packages_classes(checkpoint, image_path, tmp_path, monkeypatch, capsys):
    from helpers.checkpoints import write_native_checkpoint

    model = FastVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    native = write_native_checkpoint(tmp_path / "native", model)
    AutoProcessor.from_pretrained(checkpoint).tokenizer.save_pretrained(native)
    assert json.loads((native / "config.json").read_text())["model_type"] == "fast_vlm"
    monkeypatch.setitem(sys.modules, "timm", None)  # the native classes would need timm; ours do not
    assert main(["predict", "--model", str(native), "--device", "cpu", "--dtype", "float32", "--image", str(image_path),
                 "--prompt", PROMPT, "--max-new-tokens", "6", "--resolution", "128"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out.strip() and error_lines(captured.err) == []

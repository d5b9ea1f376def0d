"""What the tests of the `fastvlm-hf` command share: its command lines, the answer a user of transformers gets,
recorded chat sessions, an unreachable Hub, the options of `--help`."""

import io
import os
import re
import socket
import sys

import torch
from PIL import Image

from fastvlm_hf import FastViTHDModel, FastVLMModel
from fastvlm_hf.chat import ChatSession
from fastvlm_hf.cli import main

PROMPT = "Describe the image."


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


def run_chat(monkeypatch, capsys, checkpoint, image_path, lines, stdin_class=io.StringIO, max_new_tokens=6):
    monkeypatch.setattr(sys, "stdin", stdin_class("".join(f"{line}\n" for line in lines)))
    status = main(["chat", *model_args(checkpoint), "--image", str(image_path), "--max-new-tokens", str(max_new_tokens)])  # fmt: skip
    assert status == 0
    return capsys.readouterr()


MODEL_OPTIONS = ["--model", "--device", "--dtype", "--load-in-4bit", "--load-in-8bit", "--resolution", "--image-mode"]


def options_by_group(help_text):
    """{section title: the options listed under it} of an argparse `--help` text."""
    groups, current = {}, None
    for line in help_text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = groups.setdefault(line[:-1], [])
        elif current is not None and (option := re.match(r"  (-[\w-]+)", line)):
            current.append(option[1])
    return groups


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

"""`fastvlm-hf predict` against a tiny local checkpoint, in-process and as a subprocess."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from fastvlm_hf.cli import main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    image = Image.new("RGB", (180, 120), (250, 250, 250))
    image.paste((30, 160, 30), (20, 20, 90, 90))
    image.save(path)
    return path


def expected_answer(checkpoint, image_path, prompt, max_new_tokens):
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)}, {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def predict_args(checkpoint, image_path, *extra):
    return ["predict", "--model", str(checkpoint), "--image", str(image_path), "--prompt", "Describe the image.",
            "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6", *extra]


def test_streamed_answer_equals_the_non_streamed_text(tiny_checkpoint_dir, image_path, capsys):
    assert main(predict_args(tiny_checkpoint_dir, image_path)) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == expected_answer(tiny_checkpoint_dir, image_path, "Describe the image.", 6).strip()
    assert "Loading" in captured.err and "Loading" not in captured.out


def test_subprocess_run(tiny_checkpoint_dir, image_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf.cli", *predict_args(tiny_checkpoint_dir, image_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_answer(tiny_checkpoint_dir, image_path, "Describe the image.", 6).strip()


@pytest.mark.parametrize(
    "make_image,message",
    [
        (lambda tmp: tmp / "missing.png", "image not found"),
        (lambda tmp: tmp, "got a directory"),
        (lambda tmp: (tmp / "notes.png").write_bytes(b"this is not a png") and tmp / "notes.png", "not an image file"),
    ],
)
def test_unusable_image_is_a_one_line_error(tiny_checkpoint_dir, tmp_path, capsys, make_image, message):
    assert main(predict_args(tiny_checkpoint_dir, make_image(tmp_path))) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_model_folder_is_a_one_line_error(image_path, tmp_path, capsys):
    assert main(predict_args(tmp_path / "no-such-model", image_path)) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_debug_shows_the_traceback(image_path, tmp_path):
    with pytest.raises(Exception, match="image not found"):
        main(predict_args(tmp_path, tmp_path / "missing.png", "--debug"))

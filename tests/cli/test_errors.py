"""Bad input to the `fastvlm-hf` command: one line on stderr, no traceback, nothing lost."""

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers.cli import PROMPT, Sessions, error_lines, expected_answer, predict_args, run_chat
from PIL import Image

from fastvlm_hf.cli import main
from fastvlm_hf.cli.messages import describe_load_error


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

"""`fastvlm-hf finetune` on a tiny checkpoint: end to end as a subprocess (then `predict` and `convert --to apple` on
its output), resuming, and bad data stopping it before training."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers.training import COLOURS, build_trainable_model, user
from PIL import Image
from safetensors.torch import load_file

from fastvlm_hf.cli import main

pytest.importorskip("peft")
pytest.importorskip("trl")

COMMAND = [sys.executable, "-m", "fastvlm_hf_cli"]  # what the installed `fastvlm-hf` runs
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def base(tiny_tokenizer, tiny_processor, tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    build_trainable_model(tiny_tokenizer).save_pretrained(path)
    tiny_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train.jsonl with four rows, their images beside it (relative paths)."""
    folder = tmp_path_factory.mktemp("data")
    lines = []
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (96, 128), rgb).save(folder / f"{colour}.png")
        messages = [user("Describe the image.", images=1), {"role": "assistant", "content": f"A {colour} rectangle."}]
        lines.append(json.dumps({"images": [f"{colour}.png"], "messages": messages}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


# Notices about the installed releases themselves, which the user acts on by upgrading: the command's own note of an
# untested transformers release, and PEFT's of a transformers release it will stop supporting (from PEFT 0.22).
SETUP_NOTICES = (
    r"^fastvlm-hf: note: fastvlm-hf is tested with"
    r"|FutureWarning: Support for Transformers < [\d.]+ is deprecated in PEFT"
)


def warning_lines(stderr: str) -> list[str]:
    """Python warnings and libraries' notices a user would read as something wrong with the command."""
    return [line for line in stderr.splitlines()
            if re.search(r"\w+Warning: |[Dd]eprecat|Failed to load CPU gemm_4bit|Skipping publisher trust check", line)
            and not re.search(SETUP_NOTICES, line)]  # fmt: skip


def finetune_args(base, data, output, *extra):
    return ["finetune", "--model", str(base), "--data", str(data), "--output", str(output), "--device", "cpu",
            "--dtype", "float32", "--batch-size", "2", "--grad-accum", "1", "--lr", "5e-3", *extra]  # fmt: skip


def test_finetune_end_to_end_then_predict_and_convert_its_output(base, data, tmp_path):
    output = tmp_path / "run"
    argv = finetune_args(base, data, output, "--max-steps", "4", "--save-steps", "2", "--eval-data", str(data))
    argv.append("--merge")
    result = subprocess.run(COMMAND + argv, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert warning_lines(result.stderr) == []
    log = result.stdout + result.stderr
    assert "4 training rows" in log and "'loss'" in log and "'learning_rate'" in log and "'eval_loss'" in log
    adapter, merged = output / "adapter", output / "merged"
    assert result.stderr.strip().splitlines()[-1] == f"Adapter saved to {adapter}; merged model saved to {merged}"
    assert (output / "checkpoint-2").is_dir() and (output / "checkpoint-4").is_dir()  # resumable checkpoints
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "processor_config.json").exists()
    assert json.loads((merged / "config.json").read_text())["model_type"] == "fastvlm"

    image = data.parent / "red.png"
    predict = ["predict", "--model", str(merged), "--image", str(image), "--prompt", "Describe the image.",
               "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4"]  # fmt: skip
    result = subprocess.run(COMMAND + predict, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert warning_lines(result.stderr) == []

    assert main(["convert", str(merged), str(tmp_path / "apple"), "--to", "apple", "--verify"]) == 0
    assert json.loads((tmp_path / "apple" / "config.json").read_text())["model_type"] == "llava_qwen2"


def test_resume_continues_from_the_last_checkpoint(base, data, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(finetune_args(base, data, output, "--max-steps", "2", "--save-steps", "1")) == 0
    assert main(finetune_args(base, data, output, "--max-steps", "3", "--save-steps", "1", "--resume")) == 0
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    steps_logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps_logged == [1, 2, 3]  # steps 1 and 2 from the first run, 3 from the resumed one
    capsys.readouterr()


def test_resume_without_a_checkpoint_is_a_one_line_error(base, data, tmp_path, capsys):
    assert main(finetune_args(base, data, tmp_path / "empty", "--resume")) == 1
    assert capsys.readouterr().err.startswith("fastvlm-hf: error: --resume: no complete checkpoint in")


# Runs `fastvlm-hf finetune` with its arguments, and stops for good in the first training step after the checkpoint
# CHECKPOINT is complete (as the step begins), printing "in step" then.
_FINETUNE_STOPPING_MID_STEP = """
import os, sys, time
from transformers import Trainer
from fastvlm_hf.cli import main
checkpoint_state = os.path.join(sys.argv[1], "trainer_state.json")  # written last
training_step = Trainer.training_step
def stop_past_the_checkpoint(*args, **kwargs):
    if os.path.exists(checkpoint_state):
        print("in step", flush=True)
        time.sleep(600)
    return training_step(*args, **kwargs)
Trainer.training_step = stop_past_the_checkpoint
sys.exit(main(sys.argv[2:]))
"""


def test_a_run_killed_mid_step_resumes_past_a_half_saved_checkpoint_to_the_same_adapter(base, data, tmp_path, capsys):
    from helpers.cli import unreachable_hub

    steps = ["--max-steps", "6", "--save-steps", "2", "--no-gradient-checkpointing"]
    output = tmp_path / "killed"
    # The killed run loads the base as a Hub model in the cache, the Hub out of reach: one request, then the cache.
    cached = tmp_path / "hf-home" / "hub" / "models--nobody--tiny-fastvlm"
    shutil.copytree(base, cached / "snapshots" / ("0" * 40))
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)
    command = [sys.executable, "-c", _FINETUNE_STOPPING_MID_STEP, str(output / "checkpoint-2")]
    killed = subprocess.Popen(command + finetune_args("nobody/tiny-fastvlm", data, output, *steps), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=(tmp_path / "killed.log").open("w"), text=True,
                              env=unreachable_hub(tmp_path))  # fmt: skip
    try:
        uninterrupted = tmp_path / "uninterrupted"  # meanwhile
        assert main(finetune_args(base, data, uninterrupted, *steps)) == 0
        assert "in step\n" in killed.stdout  # step 3, after checkpoint-2 (the lines before: the Trainer's logs)
        killed.kill()
        assert killed.wait(timeout=60) == -9
    finally:
        killed.kill()
        killed.stdout.close()
    log = (tmp_path / "killed.log").read_text()
    assert "No connection to the Hugging Face Hub: using the cached copy of nobody/tiny-fastvlm." in log
    assert "Retrying in" not in log and "thrown while requesting" not in log  # huggingface_hub's retries
    assert (output / "checkpoint-2").is_dir() and not (output / "checkpoint-4").exists()
    assert not (output / "adapter").exists()

    # A kill while checkpoint-4 was being saved: half of its weights written, the rest missing.
    half_saved = output / "checkpoint-4"
    half_saved.mkdir()
    weights = (output / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    (half_saved / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])

    capsys.readouterr()
    assert main(finetune_args(base, data, output, *steps, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"{half_saved} was not saved completely (the run was stopped while saving it); it is passed over" in err
    assert f"Resuming from {output / 'checkpoint-2'}" in err
    resumed = load_file(output / "adapter" / "adapter_model.safetensors")
    expected = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(resumed[name].equal(expected[name]) for name in expected)  # bit for bit: same seed, data order, RNG


def test_an_unreachable_hub_ends_the_wait_at_once_with_one_line(data, tmp_path):
    from helpers.cli import unreachable_hub, without_the_untested_release_notice

    model = "apple/FastVLM-0.5B"
    argv = ["finetune", "--model", model, "--data", str(data), "--output", str(tmp_path / "run")]
    result = subprocess.run(COMMAND + argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=unreachable_hub(tmp_path))  # fmt: skip
    assert result.returncode == 1
    assert without_the_untested_release_notice(result.stderr.strip()) == [
        f"fastvlm-hf: error: cannot download model {model!r} (no connection to the Hugging Face Hub?): it is neither in "
        "the local cache nor a local folder; connect once to download it, or pass a local folder with --model PATH "
        "(HF_HUB_OFFLINE=1 then uses the cache only)"
    ]
    assert not (tmp_path / "run").exists()


def test_bad_rows_stop_the_run_before_training_unless_skipped(base, data, tmp_path, capsys):
    bad = data.parent / "bad.jsonl"  # beside the images
    rows = data.read_text().splitlines()
    missing = json.loads(rows[1])
    missing["images"] = ["nowhere.png"]
    bad.write_text("\n".join([rows[0], json.dumps(missing), rows[2]]) + "\n")

    output = tmp_path / "run"
    assert main(finetune_args(base, bad, output, "--max-steps", "1")) == 1
    error = capsys.readouterr().err
    assert f"fastvlm-hf: error: 1 of 3 rows cannot be trained on:\n  {bad}, row 2: image not found:" in error
    assert not output.exists()  # nothing trained, nothing written

    assert main(finetune_args(base, bad, output, "--max-steps", "1", "--skip-bad-rows")) == 0
    err = capsys.readouterr().err
    assert f"Skipped {bad}, row 2: image not found" in err and "2 training rows, 1 bad rows skipped" in err


def test_help_lists_the_options_in_their_groups(capsys):
    from helpers.cli import MODEL_OPTIONS, options_by_group

    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    groups = options_by_group(capsys.readouterr().out)
    assert groups["options"] == ["-h", "--debug"]
    assert {title: options for title, options in groups.items() if title.endswith(" options")} == {
        "data options": ["--data", "--eval-data", "--max-length", "--skip-bad-rows"],
        "model options": MODEL_OPTIONS,
        "adapter options": ["--lora-r", "--lora-alpha", "--lora-dropout", "--train-projector", "--train-vision-tower"],
        "training options": ["--output", "--epochs", "--max-steps", "--lr", "--batch-size", "--grad-accum",
                             "--save-steps", "--no-gradient-checkpointing", "--resume", "--merge", "--seed"],
    }  # fmt: skip

"""`fastvlm_hf.conversion` and `fastvlm-hf convert`: Apple's and transformers' layouts to ours and back, dtypes,
--verify, the model card, --push-to-hub, safe reading of `.bin` weights."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers.checkpoints import (
    IMAGE_SIDE,
    NATIVE_VISION_CONFIG,
    apple_state_dict,
    architecture,
    assert_same_logits,
    build_reference_model,
    write_apple_checkpoint,
)
import safetensors.torch
from safetensors import safe_open
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

from fastvlm_hf import FastVLMConfig, FastVLMForConditionalGeneration, FastVLMProcessor, checkpoints, conversion
from fastvlm_hf.cli import main

_SCRIPT = Path(__file__).parents[1] / "conversion" / "convert_checkpoint.py"

needs_native_fast_vlm = pytest.mark.skipif(
    not hasattr(transformers, "FastVlmConfig"), reason=f"transformers {transformers.__version__} has no fast_vlm"
)


def safetensors_keys_and_dtypes(directory):
    found = {}
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            found.update({key: weights.get_slice(key).get_dtype() for key in weights.keys()})
    return found


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, apple_dir):
    output = tmp_path_factory.mktemp("converted")
    conversion.convert(str(apple_dir), output, max_shard_size="100KB")
    return output


def test_apple_checkpoint_converts_to_our_layout(converted_dir, reference_model, apple_tokenizer):
    assert json.loads((converted_dir / "config.json").read_text())["model_type"] == "fastvlm"
    weights = safetensors_keys_and_dtypes(converted_dir)
    assert set(weights) == set(reference_model.state_dict()) - {"lm_head.weight"}  # tied: not stored
    assert len(list(converted_dir.glob("model-*.safetensors"))) > 1  # sharded
    assert (converted_dir / "model.safetensors.index.json").exists()
    assert weights["model.multi_modal_projector.linear_1.weight"] == "BF16"  # the source's dtype

    assert_same_logits(AutoModelForImageTextToText.from_pretrained(converted_dir, dtype=torch.float32), reference_model)
    generation_config = json.loads((converted_dir / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == apple_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation_config.get("do_sample", False) is False

    assert (converted_dir / "chat_template.jinja").exists() and (converted_dir / "processor_config.json").exists()
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert type(processor) is FastVLMProcessor
    assert processor.image_token_id == reference_model.config.image_token_id
    assert (processor.image_processor.image_mode, processor.image_processor.size["height"]) == ("pad", IMAGE_SIDE)


def test_verify_passes_on_a_faithful_conversion(apple_dir, converted_dir):
    assert conversion.verify(str(apple_dir), converted_dir) <= conversion.VERIFY_TOLERANCE


def _write_float32_checkpoint_that_bfloat16_cannot_hold(directory, apple_dir, apple_tokenizer):
    model = build_reference_model(apple_tokenizer)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.normal_()
    model.save_pretrained(directory)
    FastVLMProcessor.from_pretrained(apple_dir).save_pretrained(directory)
    return directory


def test_verify_fails_on_a_lossy_dtype(tmp_path, apple_dir, apple_tokenizer):
    source = _write_float32_checkpoint_that_bfloat16_cannot_hold(tmp_path / "float32", apple_dir, apple_tokenizer)
    output = tmp_path / "bfloat16"
    conversion.convert(str(source), output, dtype="bfloat16")
    assert set(safetensors_keys_and_dtypes(output).values()) == {"BF16", "I64"}  # BatchNorm counters stay integers
    with pytest.raises(RuntimeError, match="differ .* by up to"):
        conversion.verify(str(source), output)


def test_dtype_option_sets_the_weights_dtype(tmp_path, apple_dir):
    assert main(["convert", str(apple_dir), str(tmp_path), "--dtype", "float32", "--verify"]) == 0
    assert safetensors_keys_and_dtypes(tmp_path)["model.language_model.norm.weight"] == "F32"
    assert FastVLMConfig.from_pretrained(tmp_path).dtype == torch.float32


@needs_native_fast_vlm
def test_to_transformers_writes_the_native_layout_and_back(tmp_path, apple_tokenizer, capsys):
    reference_model = build_reference_model(apple_tokenizer, vision_config=NATIVE_VISION_CONFIG)  # timm's head dim
    apple_dir = write_apple_checkpoint(tmp_path / "apple", reference_model, apple_tokenizer)
    native = tmp_path / "native"
    assert main(["convert", str(apple_dir), str(native), "--to", "transformers", "--verify"]) == 0
    assert "Verified" in capsys.readouterr().err

    config = AutoConfig.from_pretrained(native)
    assert type(config) is transformers.FastVlmConfig  # transformers' own class reads it
    assert config.vision_config.architecture == "fastvit_mci3"
    assert config.image_token_id == reference_model.config.image_token_id
    weights = safetensors_keys_and_dtypes(native)
    assert "model.vision_tower.timm_model.stages.4.blocks.0.token_mixer.qkv.weight" in weights
    assert not any(key.startswith("model.vision_tower.stages") for key in weights)
    processor = AutoProcessor.from_pretrained(native)
    assert type(processor) is LlavaProcessor and processor.patch_size == 64
    side = reference_model.config.vision_config.image_size
    assert processor.image_processor.crop_size == {"height": side, "width": side}

    assert_same_logits(FastVLMForConditionalGeneration.from_pretrained(native, dtype=torch.float32), reference_model)
    ours = tmp_path / "ours"
    assert main(["convert", str(native), str(ours), "--verify"]) == 0
    assert_same_logits(FastVLMForConditionalGeneration.from_pretrained(ours, dtype=torch.float32), reference_model)


def safetensors_tensors(directory):
    tensors = {}
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            tensors.update({key: weights.get_tensor(key) for key in weights.keys()})
    return tensors


def test_apple_to_ours_to_apple_gives_back_apples_tensors_bit_for_bit(tmp_path, apple_dir, converted_dir,
                                                                       reference_model):  # fmt: skip
    apple_again = tmp_path / "apple-again"
    conversion.convert(str(converted_dir), apple_again, to="apple")

    original, written = safetensors_tensors(apple_dir), safetensors_tensors(apple_again)
    unused = set(checkpoints.UNUSED_KEYS[checkpoints.APPLE])  # Apple's CLIP head, which FastVLM never reads
    assert set(written) == set(original) - unused
    for key, tensor in written.items():
        assert tensor.dtype == original[key].dtype and torch.equal(tensor, original[key]), key

    config = json.loads((apple_again / "config.json").read_text())
    apple_config = json.loads((apple_dir / "config.json").read_text())
    assert config["model_type"] == "llava_qwen2" and config["architectures"] == ["LlavaQwen2ForCausalLM"]
    for field in ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "image_token_index", "hidden_size",
                  "num_hidden_layers", "rope_theta", "tie_word_embeddings", "vocab_size", "image_aspect_ratio"):
        assert config[field] == apple_config[field], field  # fmt: skip
    read_back, read_first = FastVLMConfig.from_pretrained(apple_again), FastVLMConfig.from_pretrained(apple_dir)
    assert architecture(read_back) == architecture(read_first)
    model = FastVLMForConditionalGeneration.from_pretrained(apple_again, dtype=torch.float32)
    assert_same_logits(model, reference_model)
    assert AutoProcessor.from_pretrained(apple_again).image_token_id == reference_model.config.image_token_id
    assert conversion.verify(str(converted_dir), apple_again) <= conversion.VERIFY_TOLERANCE


def test_apple_layout_names_no_vision_config_for_fastvithd(reference_model):
    config = FastVLMConfig(text_config=reference_model.config.text_config.to_dict())  # FastViTHD at 1024 px
    apple_config = checkpoints.apple_config_dict(config, dtype="bfloat16")
    assert "vision_config" not in apple_config and apple_config["mm_vision_tower"] == "mobileclip_l_1024"
    assert apple_config["mm_hidden_size"] == 3072 and apple_config["torch_dtype"] == "bfloat16"
    read_back = FastVLMConfig(**checkpoints.fastvlm_config_dict(apple_config))
    assert read_back.vision_config.to_dict() == config.vision_config.to_dict()
    assert apple_config["rope_theta"] == 1000000.0 and "rope_parameters" not in apple_config  # as Apple's code reads it
    assert architecture(read_back.text_config) == architecture(config.text_config)


def test_the_converter_writes_a_model_card_and_reports_progress(converted_dir, tmp_path, apple_dir, capsys):
    card = ModelCard.load(converted_dir / "README.md")
    assert (card.data.license, card.data.pipeline_tag, card.data.library_name) == (
        "apple-amlr", "image-text-to-text", "transformers",
    )  # fmt: skip
    assert f'from_pretrained("{converted_dir.name}"' in card.text  # the folder's name stands for the repo id

    assert main(["convert", str(apple_dir), str(tmp_path / "out")]) == 0
    assert "Writing weights" in capsys.readouterr().err  # the progress bar, on stderr


def test_push_to_hub_uploads_the_converted_folder(tmp_path, apple_dir, monkeypatch, capsys):
    calls = []

    class RecordingHfApi:  # stands in for the Hub: tests never reach the network
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(conversion, "HfApi", RecordingHfApi)
    output = tmp_path / "out"
    assert main(["convert", str(apple_dir), str(output), "--push-to-hub", "someone/FastVLM-tiny"]) == 0
    assert [(name, repo_id) for name, repo_id, _ in calls] == [
        ("create_repo", "someone/FastVLM-tiny"), ("upload_folder", "someone/FastVLM-tiny"),
    ]  # fmt: skip
    assert calls[0][2].get("exist_ok") is True
    assert Path(calls[1][2]["folder_path"]) == output
    assert 'from_pretrained("someone/FastVLM-tiny"' in (output / "README.md").read_text()  # the card names the repo
    assert "Pushed to https://huggingface.co/someone/FastVLM-tiny" in capsys.readouterr().err


def test_push_to_hub_without_a_connection_is_one_line_and_keeps_the_verified_folder(tmp_path, apple_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and closed once the socket is
    env = {name: value for name, value in os.environ.items() if name != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN="hf_not_a_real_token", HF_HOME=str(tmp_path / "hf-home"))
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf.cli", "convert", str(apple_dir), str(output), "--verify",
         "--push-to-hub", "someone/FastVLM-tiny"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert error.startswith(f"fastvlm-hf: error: cannot push {output} to 'someone/FastVLM-tiny': ")
    assert error.endswith(f". {output} is complete and verified: push it later with `hf upload someone/FastVLM-tiny {output}`")  # fmt: skip
    assert "Verified" in result.stderr and (output / "config.json").exists() and (output / "README.md").exists()


def test_push_to_hub_waits_for_a_passing_verify(tmp_path, apple_dir, apple_tokenizer, monkeypatch, capsys):
    source = _write_float32_checkpoint_that_bfloat16_cannot_hold(tmp_path / "float32", apple_dir, apple_tokenizer)
    monkeypatch.setattr(conversion, "push_to_hub", lambda *args: pytest.fail("pushed an unverified conversion"))
    argv = ["convert", str(source), str(tmp_path / "out"), "--dtype", "bfloat16", "--verify", "--push-to-hub", "a/b"]
    assert main(argv) == 1
    assert "differ" in capsys.readouterr().err


def _write_bin_checkpoint(directory, reference_model, apple_tokenizer, extra=None):
    """Apple's layout with its weights in a pickled `pytorch_model.bin` instead of safetensors."""
    write_apple_checkpoint(directory, reference_model, apple_tokenizer)
    state_dict = apple_state_dict(reference_model)
    state_dict.update(extra or {})
    (directory / "model.safetensors").unlink()
    torch.save(state_dict, directory / "pytorch_model.bin")
    return directory


def test_a_bin_checkpoint_of_tensors_converts_to_safetensors(tmp_path, reference_model, apple_tokenizer):
    source = _write_bin_checkpoint(tmp_path / "bin", reference_model, apple_tokenizer)
    output = tmp_path / "out"
    conversion.convert(str(source), output)
    assert list(output.glob("*.bin")) == [] and (output / "model.safetensors").exists()
    assert_same_logits(FastVLMForConditionalGeneration.from_pretrained(output, dtype=torch.float32), reference_model)


class _MakesADirectory:
    """Unpickling this runs `os.mkdir`: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_a_bin_checkpoint_with_pickled_code_is_refused(tmp_path, reference_model, apple_tokenizer, capsys):
    marker = tmp_path / "code-ran"
    payload = {"payload": _MakesADirectory(marker)}
    source = _write_bin_checkpoint(tmp_path / "bin", reference_model, apple_tokenizer, payload)
    with pytest.raises(conversion.ConversionError, match="Refusing to read the weights .* pickled Python objects"):
        conversion.convert(str(source), tmp_path / "out")
    assert not marker.exists()

    assert main(["convert", str(source), str(tmp_path / "out")]) == 1  # the command: one line, no traceback
    error = capsys.readouterr().err
    assert "Refusing to read" in error and "Traceback" not in error
    assert not marker.exists()


@pytest.mark.parametrize("source", ["missing", "./missing", "runs/missing"])
def test_convert_reports_a_missing_source_folder_in_one_line(tmp_path, monkeypatch, capsys, source):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    source = str(tmp_path / source) if source == "missing" else source
    assert main(["convert", source, "out"]) == 1
    assert capsys.readouterr().err == f"fastvlm-hf: error: source folder not found: {source}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]


def test_a_bad_max_shard_size_is_refused_before_anything_is_read(tmp_path, apple_dir, monkeypatch, capsys):
    monkeypatch.setattr(conversion, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(apple_dir), str(tmp_path / "out"), "--max-shard-size", "lots"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fastvlm-hf convert: error: argument --max-shard-size: not a size: 'lots'; write bytes, or e.g. 500MB or 5GB"
    )
    with pytest.raises(conversion.ConversionError, match="Bad --max-shard-size 'lots'"):
        conversion.convert(str(apple_dir), tmp_path / "out", max_shard_size="lots")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, size", [("100KB", 100_000), ("2.5gb", 2_500_000_000), ("123", 123), (" 5 MB ", 5_000_000)])
def test_max_shard_size_reads_as_huggingface_hub_counts(text, size):
    from fastvlm_hf.cli.options import byte_size

    assert byte_size(text) == size


def _interrupt_the_second_shard(monkeypatch):
    """Ctrl-C while the weights are written, after the first shard."""
    written = []

    def save_file(tensors, filename, metadata=None):
        if written:
            raise KeyboardInterrupt
        written.append(filename)
        return safetensors.torch.save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(conversion, "save_file", save_file)


def _fail(how, tmp_path, apple_dir, apple_tokenizer, monkeypatch):
    """Options that make `convert` fail once it has started writing, and the exit code that says so."""
    if how == "interrupted":
        _interrupt_the_second_shard(monkeypatch)
        return [str(apple_dir), "--max-shard-size", "100KB"], 130
    if how == "--to transformers on another tower":  # the tiny tower's attention head is not timm's
        if not hasattr(transformers, "FastVlmConfig"):
            pytest.skip("transformers 4.x refuses --to transformers before writing")
        return [str(apple_dir), "--to", "transformers"], 1
    source = _write_float32_checkpoint_that_bfloat16_cannot_hold(tmp_path / "float32", apple_dir, apple_tokenizer)
    return [str(source), "--dtype", "bfloat16", "--verify"], 1


FAILURES = ["interrupted", "--to transformers on another tower", "--verify failing"]


@pytest.mark.parametrize("how", FAILURES)
def test_a_failed_conversion_leaves_nothing(tmp_path, apple_dir, apple_tokenizer, monkeypatch, capsys, how):
    options, exit_code = _fail(how, tmp_path, apple_dir, apple_tokenizer, monkeypatch)
    output = tmp_path / "runs" / "new" / "out"  # neither `runs` nor `new` exists
    source, *options = options
    assert main(["convert", source, str(output), *options]) == exit_code
    assert "Writing weights" in capsys.readouterr().err  # it failed while writing, or after
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", FAILURES)
def test_overwrite_replaces_the_old_folder_only_once_the_new_one_is_complete(
    tmp_path, apple_dir, apple_tokenizer, monkeypatch, capsys, how
):
    runs = tmp_path / "runs"
    (runs / "out").mkdir(parents=True)
    (runs / "out" / "keep.txt").write_text("the old conversion")
    options, exit_code = _fail(how, tmp_path, apple_dir, apple_tokenizer, monkeypatch)
    source, *options = options
    assert main(["convert", source, str(runs / "out"), *options, "--overwrite"]) == exit_code
    assert [path.name for path in runs.iterdir()] == ["out"]  # no half-written sibling left
    assert [path.name for path in (runs / "out").iterdir()] == ["keep.txt"]
    assert (runs / "out" / "keep.txt").read_text() == "the old conversion"


def test_convert_refuses_an_existing_folder_unless_overwrite(tmp_path, apple_dir, reference_model, monkeypatch, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    monkeypatch.setattr(conversion, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model"))
    assert main(["convert", str(apple_dir), str(output)]) == 1
    assert capsys.readouterr().err == (
        f"fastvlm-hf: error: {output} already exists: choose another output folder, or pass --overwrite to replace it "
        "once the conversion is complete.\n"
    )
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in output.iterdir()] == ["keep.txt"]

    monkeypatch.undo()
    assert main(["convert", str(apple_dir), str(output), "--overwrite"]) == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert_same_logits(FastVLMForConditionalGeneration.from_pretrained(output, dtype=torch.float32), reference_model)


def test_convert_writes_into_an_empty_working_directory_and_keeps_it(tmp_path, apple_dir, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["convert", str(apple_dir), "."]) == 0
    assert Path.cwd() == here and (here / "config.json").exists() and (here / "README.md").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["here"]


@pytest.mark.parametrize(
    "output, relation",
    [("{source}", "is"), ("{source}/", "is"), ("{source}/sub", "is inside"), ("{source}/..", "holds"), (".", "holds")],
)
def test_convert_never_writes_into_its_source(tmp_path, apple_dir, monkeypatch, capsys, output, relation):
    source = tmp_path / "models" / "FastVLM-tiny"
    shutil.copytree(apple_dir, source)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    monkeypatch.chdir(source.parent)
    output = output.format(source=source)
    assert main(["convert", str(source), output, "--overwrite"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line == (
        f"fastvlm-hf: error: Refusing to write {Path(output)}: it {relation} the source folder {source}; write the "
        "conversion to a folder of its own."
    )
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


@pytest.mark.skipif(hasattr(transformers, "FastVlmConfig"), reason="transformers 5 has a native fast_vlm")
def test_to_transformers_on_4x_says_it_needs_transformers_5(tmp_path, apple_dir, capsys):
    assert main(["convert", str(apple_dir), str(tmp_path / "out"), "--to", "transformers"]) == 1
    assert "needs transformers 5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before loading anything


@pytest.mark.parametrize("torchvision", ["installed", "missing"])
def test_convert_prints_no_warning_about_torchvision(tmp_path, apple_tokenizer, torchvision):
    """FastVLM's processor needs no torchvision, and neither does the CLIP processor written for transformers' layout:
    transformers' warnings about it, with torchvision or without, would tell the user nothing."""
    model = build_reference_model(apple_tokenizer, vision_config=NATIVE_VISION_CONFIG)
    ours = tmp_path / "ours"  # this package's layout: a processor config, read through AutoImageProcessor
    conversion.convert(str(write_apple_checkpoint(tmp_path / "apple", model, apple_tokenizer)), ours)
    # Without torchvision there is no timm either (it needs torchvision): both absent, as transformers then sees them.
    hide = "sys.modules['timm'] = sys.modules['torchvision'] = None\n" if torchvision == "missing" else ""
    code = f"import sys\n{hide}from fastvlm_hf.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    to = "transformers" if hasattr(transformers, "FastVlmConfig") else "apple"
    result = subprocess.run(
        [sys.executable, "-c", code, "convert", str(ours), str(tmp_path / "out"), "--to", to, "--verify"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Verified" in result.stderr and "torchvision" not in result.stderr.lower()


def test_the_conversion_script_runs_the_convert_command(tmp_path, apple_dir):
    result = subprocess.run(
        [sys.executable, str(_SCRIPT), str(apple_dir), str(tmp_path / "out"), "--max-shard-size", "100KB"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() and (tmp_path / "out" / "README.md").exists()


# Runs `fastvlm-hf convert` with its arguments, stopping for good once the weights are written, and printing the folder
# they went to: a conversion that a SIGKILL can catch half-written.
_CONVERT_THEN_HANG = """
import sys, time
from fastvlm_hf import conversion
from fastvlm_hf.cli import main
save = conversion.save_fastvlm_layout
def save_then_hang(model, processor, folder, max_shard_size):
    save(model, processor, folder, max_shard_size)
    print(folder, flush=True)
    time.sleep(600)
conversion.save_fastvlm_layout = save_then_hang
sys.exit(main(sys.argv[1:]))
"""


def test_the_next_run_removes_what_a_killed_one_left_and_keeps_what_a_live_one_writes(tmp_path, apple_dir, capsys):
    output = tmp_path / "out"
    command = [sys.executable, "-c", _CONVERT_THEN_HANG, "convert", str(apple_dir), str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    killed, live = (subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2))
    try:
        stale, writing = (Path(process.stdout.readline().strip()) for process in (killed, live))
        killed.kill()
        killed.wait(timeout=60)
        assert (stale / "config.json").exists() and (writing / "config.json").exists()
        assert stale.parent == writing.parent == tmp_path and stale != writing

        assert main(["convert", str(apple_dir), str(output)]) == 0
        assert f"Removed {stale}, left by an earlier run for out that was interrupted." in capsys.readouterr().err
        assert sorted(tmp_path.iterdir()) == [writing, output]
        assert (writing / "config.json").exists()
    finally:
        for process in (killed, live):
            process.kill()
            process.wait(timeout=60)
            process.stdout.close()

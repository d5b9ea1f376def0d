"""How the command loads a model: device, dtype and quantization choices, the Hub out of reach."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.cli import PROMPT, expected_answer, predict_args, unreachable_hub, without_the_untested_release_notice

import fastvlm_hf
import fastvlm_hf.cpu
from fastvlm_hf.cli import build_parser
from fastvlm_hf.cli.loading import quantization_config, resolve_device, resolve_dtype


# --------------------------------------------------------------------------------------------------
# The Hub out of reach


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

"""The `fastvlm-hf` entry point: help, version and usage errors without torch, the notices it
prints and drops, the package registered with transformers."""

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers.cli import (
    MODEL_OPTIONS,
    PROMPT,
    expected_answer,
    options_by_group,
    predict_args,
    without_the_untested_release_notice,
)

import fastvlm_hf
from fastvlm_hf.cli import main
from fastvlm_hf.cli.notices import hide_dependency_notices
from fastvlm_hf.compat import NEWEST_TESTED_TRANSFORMERS

GENERATION_OPTIONS = ["--max-new-tokens", "--temperature", "--top-p", "--system-prompt"]


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
    shim = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "torchvision_shim"))
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

"""transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, `ImageProcessingTestMixin`,
`ProcessorTesterMixin`), loaded from the source distribution of the installed transformers.

The mixins are not in the transformers wheel, and this repository keeps no copy of them: `load()` downloads the
sdist of the installed version once with pip, extracts its `tests/` folder into a cache
(`$FASTVLM_HF_TEST_CACHE`, else `$XDG_CACHE_HOME/fastvlm-hf`, else `~/.cache/fastvlm-hf`, then
`transformers-tests/<version>/`) and imports the mixins from there as the package `transformers_sdist_tests`.

The sdist lacks a few modules that the mixins import. Minimal stand-ins are written next to the extracted files (each
marked with `STAND_IN_MARKER`, and only where the sdist has no such module):

- `generation/test_utils.py`: an empty `GenerationTesterMixin`. Generation is tested by this repository's own tests.
- `exporters/test_export.py` (5.23 on): an empty `ExportTesterMixin`, so the export tests do not run.
- `utils/test_configuration_utils.py`: a `config_common_kwargs` that raises when read, so that the one ConfigTester
  check built on it (`check_config_arguments_init`) cannot pass vacuously; the test file skips that check.
- `utils/fetch_hub_objects_for_ci.py` (next to the package, where the mixins look for it): `url_to_local_path`
  returns, for the hub's test images, a local image generated here (the tests need no network), and any other URL
  unchanged.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import transformers

PACKAGE = "transformers_sdist_tests"
MIXIN_MODULES = {
    "configuration": "test_configuration_common",
    "modeling": "test_modeling_common",
    "image_processing": "test_image_processing_common",
    "processing": "test_processing_common",
}
STAND_IN_MARKER = "# fastvlm-hf test stand-in: the transformers sdist lacks this module"

_STAND_INS = {
    f"{PACKAGE}/__init__.py": "",
    f"{PACKAGE}/generation/__init__.py": "",
    f"{PACKAGE}/generation/test_utils.py": '''
class GenerationTesterMixin:
    """Empty: the sdist lacks transformers' generation tests."""
''',
    f"{PACKAGE}/exporters/__init__.py": "",
    f"{PACKAGE}/exporters/test_export.py": '''
class ExportTesterMixin:
    """Empty: the sdist lacks transformers' export tests."""
''',
    f"{PACKAGE}/utils/__init__.py": "",
    f"{PACKAGE}/utils/test_configuration_utils.py": '''
class _Missing(dict):
    """`config_common_kwargs` is not in the sdist; any use of it fails rather than checking nothing."""

    def _missing(self, *args, **kwargs):
        raise RuntimeError("config_common_kwargs is not in the transformers sdist; skip the check that uses it")

    __iter__ = __len__ = __getitem__ = __contains__ = keys = items = values = get = _missing
    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = _missing


config_common_kwargs = _Missing()
''',
    "utils/fetch_hub_objects_for_ci.py": '''
import os
import zlib

import numpy as np
from PIL import Image

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def url_to_local_path(url, *args, **kwargs):
    """A deterministic random image in place of each of the hub's test images; any other URL unchanged."""
    if not isinstance(url, str) or not url.lower().endswith(_IMAGE_SUFFIXES):
        return url
    name = os.path.basename(url)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rng = np.random.default_rng(zlib.crc32(url.encode()))
        pixels = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
        partial = f"{path}.{os.getpid()}.tmp"
        Image.fromarray(pixels).save(partial, format="PNG" if name.lower().endswith(".png") else "JPEG")
        os.replace(partial, path)
    return path
''',
}


class FetchError(RuntimeError):
    """The transformers sdist could not be downloaded or read."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def cache_dir(version: str = transformers.__version__) -> Path:
    root = os.environ.get("FASTVLM_HF_TEST_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "fastvlm-hf")
    return Path(root).expanduser() / "transformers-tests" / version


def _download_sdist(version: str, directory: str) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--no-binary", ":all:", "--dest", directory, f"transformers=={version}",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FetchError(f"could not run `{' '.join(command)}`: {error}") from error
    archives = sorted(Path(directory).glob("transformers-*.tar.gz"))
    if result.returncode or not archives:
        output = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise FetchError(f"`pip download` of the transformers {version} sdist failed: {' / '.join(output)}")
    return archives[0]


def _extract_tests(archive: Path, destination: Path) -> int:
    """Writes the archive's `tests/**/*.py` (less the per-model tests) under `destination/PACKAGE`."""
    count = 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[1] != "tests" or not member.name.endswith(".py"):
                    continue
                relative = parts[2:]
                if relative[0] == "models" or any(part in ("", ".", "..") for part in relative):
                    continue
                target = destination.joinpath(PACKAGE, *relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                count += 1
    except (OSError, tarfile.TarError) as error:
        raise FetchError(f"could not read {archive.name}: {error}") from error
    return count


def _is_complete(root: Path) -> bool:
    return all((root / PACKAGE / f"{name}.py").is_file() for name in MIXIN_MODULES.values())


def fetch(version: str = transformers.__version__) -> Path:
    """The cached copy of the sdist's `tests/` for `version` (downloaded on first use), with the stand-ins."""
    root = cache_dir(version)
    if not _is_complete(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{version}-") as scratch:
            archive = _download_sdist(version, scratch)
            staging = Path(scratch) / "tree"
            _extract_tests(archive, staging)
            missing = [name for name in MIXIN_MODULES.values() if not (staging / PACKAGE / f"{name}.py").is_file()]
            if missing:
                raise FetchError(f"the transformers {version} sdist has no tests/{', tests/'.join(missing)}.py")
            if root.exists() and not _is_complete(root):
                shutil.rmtree(root)  # an incomplete earlier copy
            try:
                os.replace(staging, root)
            except OSError:
                if not _is_complete(root):  # else another process has just fetched it
                    raise
    _write_stand_ins(root)
    return root


def _write_stand_ins(root: Path) -> None:
    for relative, body in _STAND_INS.items():
        path = root / relative
        content = f"{STAND_IN_MARKER}\n{body.lstrip()}"
        if path.is_file():
            existing = path.read_text()
            if not existing.startswith(STAND_IN_MARKER) or existing == content:
                continue  # the sdist's own module, or up to date
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(content)
        os.replace(partial, path)


def is_stand_in(module: types.ModuleType) -> bool:
    with open(module.__file__) as file:
        return file.readline().rstrip("\n") == STAND_IN_MARKER


def load(version: str = transformers.__version__) -> types.SimpleNamespace:
    """Imports the mixin modules; returns them as `configuration`, `modeling`, `image_processing`, `processing`,
    and `has_config_common_kwargs` (False where `config_common_kwargs` is the stand-in)."""
    root = fetch(version)
    if PACKAGE in sys.modules and Path(sys.modules[PACKAGE].__file__).parent != root / PACKAGE:
        raise RuntimeError(f"{PACKAGE} is already imported from {sys.modules[PACKAGE].__file__}")
    path_before, modules_before = list(sys.path), set(sys.modules)
    # 4.57's processing tests import `utils.fetch_hub_objects_for_ci` relative to the working directory.
    utils_package = types.ModuleType("utils")
    utils_package.__path__ = [str(root / "utils")]
    shadowed_utils = sys.modules.get("utils")
    sys.modules["utils"] = utils_package
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            # marks registered by transformers' own pytest configuration, e.g. `torch_compile_test`
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            modules = {key: importlib.import_module(f"{PACKAGE}.{name}") for key, name in MIXIN_MODULES.items()}
    finally:
        sys.path[:] = [entry for entry in sys.path if entry in path_before]
        for name in set(sys.modules) - modules_before:
            if name == "utils" or name.startswith("utils."):
                del sys.modules[name]
        if shadowed_utils is not None:
            sys.modules["utils"] = shadowed_utils
    config_utils = importlib.import_module(f"{PACKAGE}.utils.test_configuration_utils")
    return types.SimpleNamespace(**modules, has_config_common_kwargs=not is_stand_in(config_utils))


def load_or_skip() -> types.SimpleNamespace:
    """`load()`; when the sdist cannot be fetched, skips the calling test module, except in CI (`CI=true`)."""
    try:
        return load()
    except FetchError as error:
        if in_ci():
            raise
        pytest.skip(
            f"transformers' common test mixins are unavailable ({error}); they come from the transformers sdist",
            allow_module_level=True,
        )

"""Runs the repository's torchvision shim (`tests/torchvision_shim/sitecustomize.py`) in this process: import this
before anything imports torchvision.

The `bench` extra's timm pulls PyPI's torchvision, a CUDA build that does not import on torch's CPU wheel without the
shim. `APPLIED` says whether it had to step in; `SHIM_DIR` is the folder to put on a child process's `PYTHONPATH`,
where Python runs the shim at start-up as `sitecustomize`.
"""

import importlib.util
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parents[1] / "tests" / "torchvision_shim"

_spec = importlib.util.spec_from_file_location("torchvision_shim", SHIM_DIR / "sitecustomize.py")
_shim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shim)
APPLIED = _shim.APPLIED

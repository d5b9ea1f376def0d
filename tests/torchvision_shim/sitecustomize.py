"""Lets PyPI's torchvision import on the CPU torch wheel, for the tests and the benchmarks (never part of the package).

The test and bench extras' timm pulls torchvision 0.28.0 from PyPI, a CUDA build: its `_C` cannot load on torch's CPU
wheel, and the import then fails (`operator torchvision::nms does not exist`), breaking timm and transformers' image
code. Defining in Python the two op schemas that `_C` would register lets it import; its C++ ops stay unusable, and
nothing here needs them (timm and transformers import Python modules of it only: `torchvision.ops.misc`,
`torchvision.transforms`). Does nothing without torchvision, or with one whose `_C` loads.

`tests/conftest.py` and `benchmarks/_torchvision_shim.py` run this before anything imports torchvision and, where it
applied, put this folder on the `PYTHONPATH` of the subprocesses that import torchvision too (the tests', vLLM's),
where Python runs it at start-up as `sitecustomize`.
"""

import glob
import importlib.util
import os

APPLIED = False
_spec = importlib.util.find_spec("torchvision")
if _spec is not None and _spec.submodule_search_locations:
    import torch

    try:
        torch.ops.load_library(glob.glob(os.path.join(list(_spec.submodule_search_locations)[0], "_C*.so"))[0])
    except (OSError, IndexError):
        if not hasattr(torch.ops.torchvision, "nms"):  # not defined by an earlier run in this process
            _library = torch.library.Library("torchvision", "DEF")  # the schemas live as long as this object
            _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        APPLIED = True

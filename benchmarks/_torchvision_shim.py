"""Lets PyPI's torchvision import on a CPU-only torch; import this before anything imports torchvision.

The `bench` extra's timm pulls torchvision from PyPI, a CUDA build whose `_C` extension cannot load on torch's CPU
wheel; its import then fails (`operator torchvision::nms does not exist`) and takes timm and transformers' image code
with it. Declaring the two op schemas that `_C` would have registered lets it import. Its C++ ops stay unusable, and
nothing here needs them. Does nothing without torchvision, or with one whose `_C` loads.
"""

import glob
import importlib.util
import os

APPLIED = False
_spec = importlib.util.find_spec("torchvision")
if _spec is not None and _spec.submodule_search_locations:
    import torch

    try:
        torch.ops.load_library(glob.glob(os.path.join(next(iter(_spec.submodule_search_locations)), "_C*.so"))[0])
    except (OSError, IndexError):
        if not hasattr(torch.ops.torchvision, "nms"):  # not defined by an earlier run in this process
            _library = torch.library.Library("torchvision", "DEF")  # the schemas live as long as this object
            _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        APPLIED = True

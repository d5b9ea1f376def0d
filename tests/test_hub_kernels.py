"""Hub kernels (transformers' `use_kernels`, on by default from transformers 5.25): FastVLM loads without them unless
asked, and asking changes nothing on a CPU, where transformers maps no kernel."""

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from fastvlm_hf import FastViTHDModel
from fastvlm_hf.cpu import fast_routes_off
from fastvlm_hf.modeling_fastvithd import FastViTHDActivation
from PIL import Image


@pytest.fixture
def hub_kernels_enabled(monkeypatch):
    """transformers' switch for the whole process, set to its default."""
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")


def tower_dir(tiny_model, tmp_path):
    tiny_model.model.vision_tower.save_pretrained(tmp_path / "tower")
    return tmp_path / "tower"


@pytest.mark.parametrize("auto_class", [AutoModelForImageTextToText, AutoModel])
def test_fastvlm_loads_without_hub_kernels_unless_asked(auto_class, tiny_checkpoint_dir, hub_kernels_enabled):
    model = auto_class.from_pretrained(tiny_checkpoint_dir)
    assert getattr(model, "use_kernels", False) is False


def test_the_vision_tower_loads_without_hub_kernels_unless_asked(tiny_model, tmp_path, hub_kernels_enabled):
    tower = FastViTHDModel.from_pretrained(tower_dir(tiny_model, tmp_path))
    assert getattr(tower, "use_kernels", False) is False


@torch.no_grad()
def test_hub_kernels_asked_for_on_a_cpu_give_identical_logits(tiny_checkpoint_dir, hub_kernels_enabled):
    pytest.importorskip("kernels")  # a dependency of transformers from 5.25 on
    plain = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32)
    kernelized = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32, use_kernels=True)
    assert kernelized.use_kernels is True  # transformers ran its kernel mapping over the model
    image = Image.new("RGB", (160, 96), (240, 240, 240))
    image.paste((200, 40, 40), (40, 24, 80, 48))
    inputs = AutoProcessor.from_pretrained(tiny_checkpoint_dir)(images=image, text="<image>Describe the image.",
                                                                return_tensors="pt")  # fmt: skip
    assert torch.equal(kernelized(**inputs).logits, plain(**inputs).logits)


@torch.no_grad()
def test_the_tower_hands_its_activations_contiguous_token_major_tensors(tiny_model):
    """What a Hub activation kernel swapped in for the tower's GELU sees: a contiguous (B, H, W, C) tensor, the
    (tokens, channels) layout those kernels are written for, so they compute it in place of the map without a copy."""
    seen, hooks = [], []
    for module in tiny_model.model.vision_tower.modules():
        if isinstance(module, FastViTHDActivation):
            hooks.append(module.fn.register_forward_pre_hook(
                lambda _, args: seen.append((args[0].dim(), args[0].is_contiguous()))
            ))  # fmt: skip
    try:
        with fast_routes_off():
            tiny_model.model.vision_tower(torch.rand(1, 3, 128, 128))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {(4, True)}


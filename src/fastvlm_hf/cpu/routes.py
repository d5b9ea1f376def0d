"""Puts the CPU routes of `kernels` on FastViTHD's blocks, from outside the model.

The blocks of `modeling_fastvithd` compute as written. `install_cpu_routes` gives each block that has a route a
forward of its own (an attribute of the instance, as the Hub's `kernelize` does): it tries the route and, where the
route does not apply (autograd, another device or dtype, a map below the route's threshold in `settings`, inside
`fast_routes_off()`), runs the block's own forward. The encoder (`CPURoutesMixin`) installs the routes when it is built
and decides again when it is moved or cast (`fit_cpu_routes`): off the CPU its blocks keep only their own forwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from . import kernels

RouteForward = Callable[[nn.Module, "kernels.PostOp | None", torch.Tensor], torch.Tensor]


def _own_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The forward the module's class writes, whatever its instance holds."""
    return type(module).forward(module, hidden_states)


def _conv_act_forward(block: nn.Module, post_op: kernels.PostOp | None, hidden_states: torch.Tensor) -> torch.Tensor:
    fast = kernels.conv_act(block.reparam_conv, block.act, post_op, hidden_states)
    return _own_forward(block, hidden_states) if fast is None else fast


def _convffn_forward(block: nn.Module, post_op: kernels.PostOp | None, hidden_states: torch.Tensor) -> torch.Tensor:
    # The route replaces the pointwise layers after the block's depthwise convolution, so the block's own forward,
    # which starts with that convolution, cannot be the fallback: its pointwise layers are written out here instead.
    hidden_states = block.conv(hidden_states)
    fast = kernels.pointwise_layers(block.fc1, post_op, block.fc2, hidden_states)
    return block.fc2(block.act(block.fc1(hidden_states))) if fast is None else fast


def _stem_forward(stem: nn.Module, post_op: kernels.PostOp | None, pixel_values: torch.Tensor) -> torch.Tensor:
    fast = kernels.stem_in_row_bands(stem, post_op, pixel_values)
    return _own_forward(stem, pixel_values) if fast is None else fast


@dataclasses.dataclass(frozen=True)
class Route:
    """A route for the blocks of one class."""

    forward: RouteForward
    # Which module takes the route: the block itself, or the one its method of that name returns.
    target: str | None = None
    # Whether a given block of the class can take it.
    applies: Callable[[nn.Module], bool] = lambda block: True


# The blocks that take a route, by class name. The stem (the encoder's input embedding, a plain sequence of
# convolution + activation blocks) runs in row bands; a convolution + activation block takes the fused and depthwise
# routes unless a squeeze-excite sits between its convolution and its activation.
ROUTES: dict[str, Route] = {
    "FastViTHDModel": Route(_stem_forward, target="get_input_embeddings"),
    "FastViTHDConvAct": Route(_conv_act_forward, applies=lambda block: isinstance(block.se, nn.Identity)),
    "FastViTHDConvMlp": Route(_convffn_forward),
}


class RoutedForward:
    """What `forward` of a block with a route becomes: callable as the block's bound forward is."""

    def __init__(self, route_forward: RouteForward, module: nn.Module, post_op: kernels.PostOp | None):
        self.route_forward, self.module, self.post_op = route_forward, module, post_op

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.route_forward(self.module, self.post_op, hidden_states)


def install_cpu_routes(module: nn.Module, hidden_act: str) -> None:
    """Gives every block of `module` (an encoder or any part of one) that has a route in `ROUTES` the route's forward;
    `hidden_act` is the encoder's activation (`FastViTHDConfig.hidden_act`)."""
    post_op = kernels.onednn_post_op(hidden_act)
    for block in module.modules():
        route = ROUTES.get(type(block).__name__)
        if route is None or not route.applies(block):
            continue
        target = block if route.target is None else getattr(block, route.target)()
        target.forward = RoutedForward(route.forward, target, post_op)


def remove_cpu_routes(module: nn.Module) -> None:
    """Gives every block of `module` back its own forward."""
    for block in module.modules():
        if isinstance(block.__dict__.get("forward"), RoutedForward):
            del block.forward


def fit_cpu_routes(encoder: nn.Module) -> None:
    """Installs the routes on an encoder (a `FastViTHDModel`) whose weights are on the CPU, or not placed yet (on the
    meta device, while `from_pretrained` builds it); removes them from one on another device."""
    weight = next(encoder.parameters(), None)
    if weight is None or weight.device.type in ("cpu", "meta"):
        install_cpu_routes(encoder, encoder.config.hidden_act)
    else:
        remove_cpu_routes(encoder)


def fit_cpu_routes_after_loading(model: nn.Module) -> None:
    """Decides again for every encoder in `model` once `from_pretrained` has placed the weights: a `device_map` puts
    them on their device without moving the model, so `_apply` never sees it."""
    for module in model.modules():
        if isinstance(module, CPURoutesMixin):
            fit_cpu_routes(module)


class CPURoutesMixin:
    """For `FastViTHDModel`: its blocks take the CPU routes, decided when it is built and whenever it is moved or cast."""

    def post_init(self) -> None:
        super().post_init()
        fit_cpu_routes(self)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        fit_cpu_routes(self)
        return self

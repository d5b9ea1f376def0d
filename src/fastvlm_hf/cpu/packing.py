"""`pack_weights`/`unpack_weights` for a model: its language model's linear layers as `PackedLinear`s and back."""

from __future__ import annotations

from .packed_linear import PackedLinear, pack_linear_layers, refuse_to_move_or_cast, unpack_linear_layers


class WeightPackingMixin:
    """Packs and unpacks the linear layers of a `PreTrainedModel`'s `_packable_modules` (see `packed_linear`)."""

    # Modules whose linear layers `pack_weights` packs for oneDNN's CPU kernels.
    _packable_modules: tuple[str, ...] = ()

    def pack_weights(self) -> list[str]:
        """For inference on CPU: stores the language model's linear weights (and the output head's) in the blocked
        layout of oneDNN's kernels once, instead of on every call. Decoding steps and the prefill get faster and
        the outputs stay the same (bit for bit in bfloat16). Layers that are quantized, not on CPU, or in another
        dtype than bfloat16 or float32 are left as they are.

        The packed layers have no gradient and do not move or cast: call `unpack_weights()` before training,
        `.to(...)` or resizing the embeddings (`save_pretrained` unpacks on its own). A tied output head gets its own
        packed copy of the input embedding. Returns the names of the layers packed.
        """
        return pack_linear_layers(self, self._packable_modules)

    def unpack_weights(self) -> list[str]:
        """Undoes `pack_weights`: plain `nn.Linear` layers again, the output head tied again if the config ties it.
        Returns the names of the layers unpacked."""
        unpacked = unpack_linear_layers(self)
        if unpacked and self.config.tie_word_embeddings:
            self.tie_weights()
        return unpacked

    def _apply(self, fn, recurse=True):
        # Refused before anything moves: a model half cast would be left behind otherwise.
        for module in self.modules():
            if isinstance(module, PackedLinear):
                refuse_to_move_or_cast(fn, module.dtype)
        return super()._apply(fn, recurse)

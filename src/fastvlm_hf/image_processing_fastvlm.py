"""Image processor for FastVLM: PIL and NumPy only, no torchvision."""

import os
from typing import Any

import numpy as np
import torch  # noqa: F401  (resolves the "torch.device" hints of the kwargs TypedDicts below)
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, load_image
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType, is_torch_tensor

from . import checkpoints

IMAGE_MODES = ("pad", "crop")
_NUM_CHANNELS = (1, 3, 4)
# PIL modes that `do_convert_rgb=False` passes through with their own channels.
_MODES_KEPT_AS_THEY_ARE = ("L", "LA", "RGB", "RGBA")


class FastVLMImageProcessorKwargs(ImagesKwargs, total=False):
    """The per-call settings of [`FastVLMImageProcessor`] on top of transformers' common image kwargs."""

    image_mode: str | None
    patch_size: int | None


class FastVLMImageProcessor(BaseImageProcessor):
    r"""
    Turns images into FastVLM's `pixel_values`: float32 arrays of shape `(num_images, 3, height, width)`, values in
    [0, 1] unless `do_normalize` is set.

    Two ways of fitting an image into the encoder's input size:

    - `"pad"` (default) follows Apple's reference (`process_images` with `image_aspect_ratio="pad"`): the image is
      pasted centred on a square canvas filled with the mean colour (black for FastVLM's zero mean), then resized.
      Nothing of the image is lost.
    - `"crop"` follows transformers' native `fast_vlm` checkpoints (a CLIP image processor): the shortest edge is
      resized to the target size, then the centre is cropped. The borders of non-square images are lost.

    Every input is first converted with PIL's `convert("RGB")`, as Apple's reference does: an alpha channel is
    dropped, not composited onto a background. 16-bit greyscale images (modes `I;16*`) are scaled to 8 bits first,
    since PIL's own conversion would clip every value above 255 to white.

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 1024, "width": 1024}`):
            Output size; an int means a square. Both sides must be multiples of `patch_size`.
        image_mode (`str`, *optional*, defaults to `"pad"`):
            `"pad"` (Apple's reference) or `"crop"` (transformers' native `fast_vlm`).
        patch_size (`int`, *optional*, defaults to 64):
            Total stride of the vision encoder: each `patch_size` x `patch_size` square of the output becomes one image
            token.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BICUBIC`):
            PIL resampling filter.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the 0-255 pixel values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            The factor used by `do_rescale`.
        do_normalize (`bool`, *optional*, defaults to `False`):
            Whether to normalize with `image_mean` and `image_std`.
        image_mean (`float` or `list[float]`, *optional*, defaults to `[0.0, 0.0, 0.0]`):
            Per-channel mean (one value means the same for every channel); also sets the pad colour,
            `int(mean * 255)` per channel.
        image_std (`float` or `list[float]`, *optional*, defaults to `[1.0, 1.0, 1.0]`):
            Per-channel standard deviation.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to convert images to RGB. When `False`, greyscale (`L`, `LA`), RGB and RGBA images keep their
            channels (FastVLM itself takes RGB), `image_mean` and `image_std` need a value per channel, and other
            modes raise an error.

    Example:

    ```python
    >>> from PIL import Image
    >>> from fastvlm_hf import FastVLMImageProcessor

    >>> processor = FastVLMImageProcessor()
    >>> processor(Image.new("RGB", (640, 480)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 1024, 1024])
    ```
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = FastVLMImageProcessorKwargs

    def __init__(
        self,
        size: dict[str, int] | int | None = None,
        image_mode: str = "pad",
        patch_size: int = 64,
        resample: PILImageResampling | int = PILImageResampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: float | list[float] = (0.0, 0.0, 0.0),
        image_std: float | list[float] = (1.0, 1.0, 1.0),
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size_dict(size if size is not None else {"height": 1024, "width": 1024})
        self.image_mode = image_mode
        self.patch_size = patch_size
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = _per_channel(image_mean, "image_mean")
        self.image_std = _per_channel(image_std, "image_std")
        self.do_convert_rgb = do_convert_rgb
        _check_geometry(self.size, self.image_mode, self.patch_size)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Also reads the checkpoints of Apple (`apple/FastVLM-0.5B`, ..., which ship no preprocessor config) and of
        transformers' native `fast_vlm`: they get the preprocessing of Apple's reference, `image_mode="pad"`, at the
        resolution of their vision tower.
        """
        checkpoint = checkpoints.describe(pretrained_model_name_or_path, **kwargs)
        if not checkpoint.is_foreign:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_checkpoint(checkpoint, **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint: checkpoints.CheckpointDescription, **kwargs) -> "FastVLMImageProcessor":
        """The image processor of a checkpoint of a foreign layout, which ships none, from the description of its
        `config.json` (`checkpoints.describe`); `kwargs` override its settings as in `from_pretrained`."""
        return cls.from_dict(checkpoint.image_processor_dict(), **kwargs)

    def preprocess(
        self,
        images: Any,
        size: dict[str, int] | int | None = None,
        image_mode: str | None = None,
        patch_size: int | None = None,
        resample: PILImageResampling | int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        do_convert_rgb: bool | None = None,
        input_data_format: ChannelDimension | str | None = None,
        return_tensors: TensorType | str | None = None,
    ) -> BatchFeature:
        """
        Preprocess an image or a batch of images. Every setting defaults to the processor's own.

        Args:
            images:
                A PIL image, a NumPy array or a torch tensor, or a (nested) list of them. Arrays and tensors are
                `(H, W)`, `(H, W, C)` or `(C, H, W)` with 1, 3 or 4 channels, a leading batch dimension is allowed;
                values are integers in [0, 255] or floats in [0, 1].
            input_data_format (`ChannelDimension` or `str`, *optional*):
                Channel layout of arrays and tensors, `"channels_first"` or `"channels_last"`; inferred when unset
                (channels first when both ends could be channels).
            return_tensors (`str` or `TensorType`, *optional*):
                `"pt"` for a torch tensor; `"np"` or `None` for a NumPy array.

        Returns:
            [`BatchFeature`] with `pixel_values` of shape `(num_images, 3, height, width)`, float32.
        """
        size = self.size if size is None else size_dict(size)
        image_mode = self.image_mode if image_mode is None else image_mode
        patch_size = self.patch_size if patch_size is None else patch_size
        resample = self.resample if resample is None else resample
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = self.image_mean if image_mean is None else image_mean
        image_std = self.image_std if image_std is None else image_std
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        _check_geometry(size, image_mode, patch_size)

        images = flatten_images(images)
        if not images:
            raise ValueError("No images to process: got an empty list.")

        height, width = size["height"], size["width"]
        pixel_values = []
        for image in images:
            image = _to_rgb(_to_pil_image(image, input_data_format), do_convert_rgb)
            num_channels = len(image.getbands())
            mean = _per_channel(image_mean, "image_mean", num_channels)
            std = _per_channel(image_std, "image_std", num_channels)
            if image_mode == "pad":
                pad_colour = tuple(int(m * 255) for m in mean)
                image = _pad_to_square(image, pad_colour).resize((width, height), resample)
            else:
                image = _resize_shortest_edge(image, max(height, width), resample)
                image = _center_crop(image, height, width)
            pixels = np.atleast_3d(np.asarray(image)).transpose(2, 0, 1)  # (H, W, C) uint8 -> (C, H, W)
            if do_rescale:
                # float64 first, as transformers' `rescale` does, so results match it to the last bit
                pixels = pixels.astype(np.float64) * rescale_factor
            pixels = pixels.astype(np.float32)
            if do_normalize:
                mean = np.asarray(mean, dtype=np.float32)[:, None, None]
                std = np.asarray(std, dtype=np.float32)[:, None, None]
                pixels = (pixels - mean) / std
            pixel_values.append(pixels)

        return BatchFeature(data={"pixel_values": np.stack(pixel_values)}, tensor_type=return_tensors)


def flatten_images(images: Any) -> list:
    """Flattens an image, a batch array or tensor, or arbitrarily nested lists of them into a list of images."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if (isinstance(images, np.ndarray) or is_torch_tensor(images)) and images.ndim == 4:
        return list(images)
    return [images]


def size_dict(size: dict[str, int] | int) -> dict[str, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return {"height": size, "width": size}
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise ValueError(f"`size` must be an int or a dict with keys 'height' and 'width', got {size!r}.")


def _per_channel(value: float | list[float], name: str, num_channels: int | None = None) -> list[float]:
    """`value` as one float per channel: a single float stands for every channel (3 unless `num_channels` says)."""
    values = [float(value)] * (num_channels or 3) if np.ndim(value) == 0 else [float(v) for v in value]
    if not values or (num_channels is not None and len(values) != num_channels):
        channels = "" if num_channels is None else f" ({num_channels} here)"
        raise ValueError(f"`{name}` must be one float or one per image channel{channels}, got {value!r}.")
    return values


def _check_geometry(size: dict[str, int], image_mode: str, patch_size: int) -> None:
    if image_mode not in IMAGE_MODES:
        raise ValueError(
            f"`image_mode` must be 'pad' (Apple's reference preprocessing) or 'crop' (transformers' native "
            f"fast_vlm), got {image_mode!r}."
        )
    if not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"`patch_size` must be a positive int (the encoder's total stride), got {patch_size!r}.")
    height, width = size["height"], size["width"]
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        nearest = [max(patch_size, round(side / patch_size) * patch_size) for side in (height, width)]
        raise ValueError(
            f"`size` {height}x{width} (height x width) is not a multiple of `patch_size`={patch_size}, the vision "
            f"encoder's total stride. Use for example {{'height': {nearest[0]}, 'width': {nearest[1]}}}."
        )


def _to_pil_image(image: Any, input_data_format: ChannelDimension | str | None) -> Image.Image:
    """A PIL image from a PIL image, a file path or URL, or an integer [0, 255] or float [0, 1] array or tensor."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return _load_image(os.fspath(image))
    if is_torch_tensor(image):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"Expected a PIL image, a file path or URL, a NumPy array or a torch tensor, got {type(image).__name__}."
        )

    if image.ndim == 3:
        if input_data_format is None:
            if image.shape[0] in _NUM_CHANNELS:
                input_data_format = ChannelDimension.FIRST
            elif image.shape[-1] in _NUM_CHANNELS:
                input_data_format = ChannelDimension.LAST
            else:
                raise ValueError(
                    f"Cannot find the channel axis of an image of shape {image.shape}: expected 1, 3 or 4 "
                    f"channels first (C, H, W) or last (H, W, C)."
                )
        if ChannelDimension(input_data_format) == ChannelDimension.FIRST:
            image = np.moveaxis(image, 0, -1)
        if image.shape[-1] == 1:
            image = image[..., 0]
    elif image.ndim != 2:
        raise ValueError(f"Expected an image of shape (H, W), (H, W, C) or (C, H, W), got shape {image.shape}.")

    if np.issubdtype(image.dtype, np.floating):
        if not (image.min() >= 0 and image.max() <= 1):
            raise ValueError(
                f"Float images must hold values in [0, 1], got values in [{image.min()}, {image.max()}]. "
                f"Pass 0-255 data as uint8."
            )
        image = np.round(image * 255)
    elif not np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_:
        raise TypeError(f"Expected an integer or float image, got dtype {image.dtype}.")
    elif image.min() < 0 or image.max() > 255:
        raise ValueError(
            f"Integer images must hold values in [0, 255], got values in [{image.min()}, {image.max()}]."
        )
    return Image.fromarray(image.astype(np.uint8))


def _load_image(path_or_url: str) -> Image.Image:
    """Reads an image file or URL now, so that a bad file fails here with its name.

    A local file is opened by the package's image loader, as `PIL.Image.open` would (as Apple's reference does), so it
    is processed exactly like the same image passed in opened; URLs and base64 strings go through transformers'
    `load_image`.
    """
    from .image_loading import ImageLoadError
    from .image_loading import load_image as load_image_file

    try:
        if os.path.isfile(path_or_url):
            return load_image_file(path_or_url)
        return load_image(path_or_url)
    except ImageLoadError as error:
        reason = error.__cause__  # what Pillow or the file system said
    except (OSError, ValueError) as error:
        reason = error
    raise ImageLoadError(f"Cannot read the image {path_or_url!r}: {reason}") from reason


def _to_rgb(image: Image.Image, do_convert_rgb: bool) -> Image.Image:
    if not do_convert_rgb:
        if image.mode not in _MODES_KEPT_AS_THEY_ARE:
            raise ValueError(
                f"Got an image in mode {image.mode!r} with `do_convert_rgb=False`, which keeps only "
                f"{', '.join(_MODES_KEPT_AS_THEY_ARE)} images as they are; FastVLM itself takes RGB."
            )
        return image
    if image.mode.startswith("I;16"):
        # PIL's convert clips 16-bit values to 255; map 0-65535 onto 0-255 instead
        image = Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8))
    return image.convert("RGB")


def _pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centres the image on a square canvas of side max(width, height) filled with `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_shortest_edge(image: Image.Image, shortest_edge: int, resample: PILImageResampling | int) -> Image.Image:
    """Resizes the shortest edge to `shortest_edge`, truncating the longer one as transformers' CLIP resize does."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    new_size = (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)
    return image.resize(new_size, resample)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


__all__ = ["FastVLMImageProcessor"]


# What `AutoImageProcessor.from_pretrained` takes for itself, which FastVLM's image processor has no use for.
_AUTO_ONLY_KWARGS = ("config", "use_fast", "backend", "trust_remote_code", "code_revision")


def with_fastvlm_checkpoints_without_preprocessor_config(auto_from_pretrained):
    """`AutoImageProcessor.from_pretrained`, answering also for the FastVLM checkpoints that ship no image processor
    config (Apple's Hub repos): transformers finds no `preprocessor_config.json` there and has no hook for a model type
    to step in, so where it gives up (`OSError`) on a checkpoint of Apple's or transformers' native layout, FastVLM's
    image processor is built from the checkpoint's `config.json`, as `AutoProcessor` builds it. Anything else loads,
    or fails, as transformers decides. Wrapping an already wrapped method returns it unchanged."""
    if getattr(auto_from_pretrained, "answers_fastvlm_checkpoints", False):
        return auto_from_pretrained
    original = auto_from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, *inputs, **kwargs):
        try:
            return original(cls, pretrained_model_name_or_path, *inputs, **kwargs)
        except OSError:
            checkpoint = checkpoints.describe(pretrained_model_name_or_path, **kwargs)
            if not checkpoint.is_foreign:
                raise
        for name in _AUTO_ONLY_KWARGS:
            kwargs.pop(name, None)
        return FastVLMImageProcessor.from_checkpoint(checkpoint, **kwargs)

    from_pretrained.__doc__ = original.__doc__
    from_pretrained.__name__ = original.__name__
    from_pretrained.__qualname__ = original.__qualname__
    from_pretrained.answers_fastvlm_checkpoints = True
    return classmethod(from_pretrained)

"""What the model options and image arguments load: device, dtype, quantization, images, processor and model."""

from __future__ import annotations

import argparse
import os

from .messages import CLIError, describe_load_error, first_line, status


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device must be available."""
    import torch

    cuda = torch.cuda.is_available()
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise CLIError("--device cuda was requested but no CUDA device is available; try --device cpu")
    if name == "mps" and not mps:
        raise CLIError("--device mps was requested but MPS is not available; try --device cpu")
    return name


def resolve_dtype(name: str, device: str):
    """'auto' is bfloat16 on cuda and cpu, float16 on mps."""
    import torch

    if name == "auto":
        return torch.float16 if device == "mps" else torch.bfloat16
    return getattr(torch, name)


def quantization_config(args: argparse.Namespace, device: str):
    """A `BitsAndBytesConfig` for --load-in-4bit / --load-in-8bit, or None."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        flag = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit"
        raise CLIError(f"{flag} needs bitsandbytes: pip install 'fastvlm-hf[bnb]'") from error
    import torch
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = torch.bfloat16 if device == "cuda" else resolve_dtype(args.dtype, device)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def load_image(path: str):
    """Open and decode an image file or URL; the processor converts it to RGB."""
    if path.startswith(("http://", "https://")):
        return _download_image(path)
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not inside the processor
    except FileNotFoundError as error:
        raise CLIError(f"image not found: {path}") from error
    except IsADirectoryError as error:
        raise CLIError(f"expected an image file, got a directory: {path}") from error
    except UnidentifiedImageError as error:
        raise CLIError(f"not an image file Pillow can read: {path}") from error
    except OSError as error:
        raise CLIError(f"cannot read image {path}: {first_line(error)}") from error
    return image


def _download_image(url: str):
    from transformers.image_utils import load_image as load_image_url

    try:
        return load_image_url(url)
    except Exception as error:  # the HTTP client's errors, or a body that is not an image
        raise CLIError(f"cannot read image {url}: {first_line(error)}") from error


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a local folder."""
    return os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1


def load_processor(model_id: str, resolution: int | None = None, image_mode: str | None = None):
    """The checkpoint's processor, with the image size and mode the command line asks for."""
    from transformers import AutoProcessor

    import fastvlm_hf  # noqa: F401  (registers the FastVLM classes with the Auto classes)

    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise CLIError(describe_load_error(model_id, error)) from error
    image_processor = processor.image_processor
    if resolution is not None:
        patch_size = getattr(image_processor, "patch_size", 64)
        if resolution % patch_size:
            nearest = max(patch_size, round(resolution / patch_size) * patch_size)
            raise CLIError(f"--resolution {resolution} is not a multiple of {patch_size}, the vision encoder's stride; "
                           f"try --resolution {nearest}")  # fmt: skip
        image_processor.size = {"height": resolution, "width": resolution}
    if image_mode is not None:
        image_processor.image_mode = image_mode
    return processor


def load_model(model_id: str, device: str, dtype, quantization=None):
    """Load the model through the Auto classes that ``import fastvlm_hf`` registers."""
    from transformers import AutoModelForImageTextToText

    import fastvlm_hf  # noqa: F401

    kwargs = {"dtype": dtype, "device_map": device}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise CLIError(describe_load_error(model_id, error)) from error
    if device == "cpu" and hasattr(model, "pack_weights"):  # inference only: the faster CPU layout
        model.pack_weights()
    return model.eval()


def load(args: argparse.Namespace):
    """Processor and model as the command line's model options say; status lines on stderr."""
    model_id = args.model
    if _looks_like_path(model_id):
        model_id = os.path.expanduser(model_id)
        if not os.path.isdir(model_id):
            raise CLIError(f"model folder not found: {model_id}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    quantization = quantization_config(args, device)
    processor = load_processor(model_id, args.resolution, args.image_mode)
    bits = " 4-bit" if args.load_in_4bit else " 8-bit" if args.load_in_8bit else ""
    status(f"Loading model {model_id} on {device} ({str(dtype).removeprefix('torch.')}{bits}) ...")
    return processor, load_model(model_id, device, dtype, quantization)

"""What the model options and image arguments load: device, dtype, quantization, images, processor and model."""

from __future__ import annotations

import argparse
import os

from .messages import LOCAL_HINT, CLIError, describe_load_error, first_line, no_connection, status

HUB_TIMEOUT = 5  # seconds for the Hub to answer before the model counts as out of reach


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
    """'auto' is bfloat16 on cuda and on a cpu that computes it natively (float32 on other cpus), float16 on mps."""
    import torch

    if name == "auto":
        if device == "mps":
            return torch.float16
        if device == "cpu":
            from ..cpu import has_native_bfloat16

            return torch.bfloat16 if has_native_bfloat16() else torch.float32
        return torch.bfloat16
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
    from PIL import Image

    from ..image_loading import ImageLoadError
    from ..image_loading import load_image as load_image_file

    try:
        return load_image_file(path)
    except ImageLoadError as error:
        raise CLIError(str(error)) from error
    except Image.DecompressionBombError as error:
        raise CLIError(f"image {path} is too large to open safely: {first_line(error)} Shrink it first (the model "
                       f"sees it at --resolution pixels), or, if you trust it, raise the limit with PIL's "
                       f"Image.MAX_IMAGE_PIXELS in Python") from error  # fmt: skip


def _download_image(url: str):
    from transformers.image_utils import load_image as load_image_url

    try:
        return load_image_url(url)
    except Exception as error:  # the HTTP client's errors, or a body that is not an image
        raise CLIError(f"cannot read image {url}: {first_line(error)}") from error


def local_folder(model_id: str, missing: str = "model folder not found") -> str | None:
    """The folder `model_id` names, or None for a Hub id; a folder that is meant but missing is the error `missing`."""
    if os.path.isdir(model_id):
        return model_id
    if not _looks_like_path(model_id):
        return None
    folder = os.path.expanduser(model_id)
    if not os.path.isdir(folder):
        raise CLIError(f"{missing}: {folder}")
    return folder


def from_cache_only(model_id: str, local_hint: str = LOCAL_HINT) -> bool:
    """Whether to read the Hub model `model_id` from the local cache only, after one request to the Hub: without a
    connection, huggingface_hub would retry each file for half a minute. Out of reach and not in the cache: an error,
    at once."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if constants.HF_HUB_OFFLINE:  # from_pretrained reads the cache only, and says so when the model is not there
        return False
    try:
        model_info(model_id, timeout=HUB_TIMEOUT)
    except (HfHubHTTPError, HFValidationError):  # the Hub answered, or the id is malformed: from_pretrained says why
        return False
    except Exception as error:  # no answer; the HTTP client's errors differ between huggingface_hub releases
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            status(f"No connection to the Hugging Face Hub: using the cached copy of {model_id}.")
            # The rest of the command runs offline too: libraries that look the Hub up later on their own (PEFT,
            # when it saves an adapter of a Hub model) read this variable, and would otherwise retry for half a minute.
            os.environ["HF_HUB_OFFLINE"] = "1"
            return True
        raise CLIError(no_connection(model_id, local_hint)) from error
    return False


def locate(model_id: str, missing: str = "model folder not found", local_hint: str = LOCAL_HINT) -> tuple[str, bool]:
    """Where `model_id` loads from: the local folder it names or the Hub id, and whether to read the Hub model from the
    cache only (`from_cache_only`). A folder that is meant but missing is the error `missing`."""
    folder = local_folder(model_id, missing)
    return folder or model_id, folder is None and from_cache_only(model_id, local_hint)


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a local folder, and so is 'owner/name' when a
    folder 'owner' exists here."""
    if os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        return True
    return "/" in model_id and os.path.isdir(model_id.split("/")[0])


def load_processor(
    model_id: str, resolution: int | None = None, image_mode: str | None = None, local_files_only: bool = False
):
    """The checkpoint's processor, with the image size and mode the command line asks for. FastVLM's own, whatever the
    layout: transformers' native `fast_vlm` checkpoints name transformers' processor, which would need torchvision."""
    from ..compat import PretrainedConfig
    from ..processing_fastvlm import FastVLMProcessor

    try:
        # a model that cannot be found fails here, with the Hub's reason
        PretrainedConfig.get_config_dict(model_id, local_files_only=local_files_only)
        processor = FastVLMProcessor.from_pretrained(model_id, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        raise CLIError(describe_load_error(model_id, error)) from error
    image_processor = processor.image_processor
    if resolution is not None:
        check_resolution(resolution, image_processor.patch_size)
        image_processor.size = {"height": resolution, "width": resolution}
    if image_mode is not None:
        image_processor.image_mode = image_mode
    return processor


def check_resolution(resolution: int, patch_size: int) -> None:
    if resolution % patch_size:
        nearest = max(patch_size, round(resolution / patch_size) * patch_size)
        raise CLIError(f"--resolution {resolution} is not a multiple of {patch_size}, the vision encoder's stride; "
                       f"try --resolution {nearest}")  # fmt: skip


def load_model(model_id: str, device: str, dtype, quantization=None, local_files_only: bool = False):
    """FastVLM's own model class, which loads all three layouts (the Auto classes would pick transformers' own class,
    which needs timm, for a native `fast_vlm` checkpoint)."""
    from ..modeling_fastvlm import FastVLMForConditionalGeneration

    kwargs = {"dtype": dtype, "device_map": device, "local_files_only": local_files_only}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        model = FastVLMForConditionalGeneration.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise CLIError(describe_load_error(model_id, error)) from error
    if device == "cpu" and hasattr(model, "pack_weights"):  # inference only: the faster CPU layout
        model.pack_weights()
    return model.eval()


def load(args: argparse.Namespace):
    """Processor and model as the command line's model options say; status lines on stderr."""
    folder = local_folder(args.model)
    model_id = folder or args.model
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    quantization = quantization_config(args, device)
    if args.resolution is not None:  # before loading anything: FastViTHD's stride is 64 in every checkpoint
        from ..configuration_fastvithd import FastViTHDConfig

        check_resolution(args.resolution, FastViTHDConfig().patch_size)
    bits = " 4-bit" if args.load_in_4bit else " 8-bit" if args.load_in_8bit else ""
    status(f"Loading model {model_id} on {device} ({str(dtype).removeprefix('torch.')}{bits}) ...")
    cache_only = folder is None and from_cache_only(model_id)
    processor = load_processor(model_id, args.resolution, args.image_mode, local_files_only=cache_only)
    return processor, load_model(model_id, device, dtype, quantization, local_files_only=cache_only)

"""Opening the image files a user names: decoded at once, so that a bad file fails where it is named, with one error
type whose message says in one line which image and what is wrong with it."""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from .cli.messages import first_line


class ImageLoadError(ValueError):
    """An image file that cannot be opened: missing, a directory, not an image, or unreadable. The message is one
    line naming the image; the error from the file system or Pillow is the `__cause__`."""


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """The PIL image in the file `source` (a path) or in the bytes of one, decoded now (a truncated file fails here,
    not later) and detached from the file, which is closed. `name` names the image in error messages (default: the
    path, or "image bytes").

    Raises [`ImageLoadError`]. Pillow's `DecompressionBombError` (an image above `PIL.Image.MAX_IMAGE_PIXELS`) passes
    through unchanged: whether to trust a huge image is for the caller to decide.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        file, name = io.BytesIO(source), name or "image bytes"
    else:
        file = os.fspath(source)
        name = name or file
    try:
        with Image.open(file) as opened:
            opened.load()
            return opened.copy()
    except FileNotFoundError as error:
        raise ImageLoadError(f"image not found: {name}") from error
    except IsADirectoryError as error:
        raise ImageLoadError(f"expected an image file, got a directory: {name}") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(f"not an image file Pillow can read: {name}") from error
    except OSError as error:
        raise ImageLoadError(f"cannot read image {name}: {first_line(error)}") from error

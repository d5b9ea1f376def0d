"""Output folders that appear complete or not at all, as `fastvlm-hf convert` and `fastvlm-hf export` write them:
the writing goes to a hidden sibling folder, renamed to the output at the end, so that a failure or an interruption
leaves nothing behind; an existing output is replaced only when asked, and only once the new one is complete; an
output that is, holds or lies inside the source folder is refused."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


def check_output(source: str, output: Path, overwrite: bool = False, *, error: type[Exception], what: str) -> None:
    """Raises `error` for an `output` that would overwrite a folder without `overwrite`, or write into the source
    folder; `what` names the result in the message ("conversion")."""
    if os.path.isdir(source):
        source_path, output_path = Path(source).resolve(), output.resolve()
        relation = (
            "is" if output_path == source_path
            else "is inside" if source_path in output_path.parents
            else "holds" if output_path in source_path.parents
            else None
        )  # fmt: skip
        if relation:
            raise error(f"Refusing to write {output}: it {relation} the source folder {source}; write the "
                        f"{what} to a folder of its own.")  # fmt: skip
    if output.is_dir() and not any(output.iterdir()):
        return
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise error(f"{output} already exists: choose another output folder, or pass --overwrite to replace it once "
                    f"the {what} is complete.")  # fmt: skip


@contextlib.contextmanager
def complete_or_nothing(output: Path):
    """A new hidden folder beside `output` to write into, which becomes `output` (replacing what was there) once the
    block ends, or is removed with the parent folders made for it when the block raises or is interrupted."""
    output = Path(os.path.abspath(output))  # "." and ".." have no name to put beside
    missing_parents = [parent for parent in output.parents if not parent.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    folder = output.with_name(f".{output.name}.partial-{secrets.token_hex(4)}")
    folder.mkdir()
    try:
        yield folder
        _replace(output, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for parent in missing_parents:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _replace(output: Path, folder: Path) -> None:
    if not (output.exists() or output.is_symlink()):
        folder.rename(output)
        return
    if output.is_dir() and not any(output.iterdir()):  # kept, as it may be the working directory
        for entry in folder.iterdir():
            entry.rename(output / entry.name)
        folder.rmdir()
        return
    old = output.with_name(f".{output.name}.old-{secrets.token_hex(4)}")
    output.rename(old)
    try:
        folder.rename(output)
    except BaseException:
        old.rename(output)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()

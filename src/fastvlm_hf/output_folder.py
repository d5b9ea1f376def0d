"""Output folders that appear complete or not at all, as `fastvlm-hf convert` and `fastvlm-hf export` write them:
the writing goes to a hidden sibling folder, renamed to the output at the end, so that a failure or an interruption
leaves nothing behind; an existing output is replaced only when asked, and only once the new one is complete; an
output that is, holds or lies inside the source folder is refused.

A run that was killed outright (SIGKILL, power loss) leaves its hidden folder behind; the next run for the same output
removes it and says so on stderr. The writing process holds an exclusive `flock` on its folder while it writes, and
the kernel drops that lock when the process dies: a folder whose lock can be taken has no writer left, while one that
another run is still writing is locked and kept. (Where there is no `flock`, e.g. on Windows, such folders are kept.)"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


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
    block ends, or is removed with the parent folders made for it when the block raises or is interrupted. The hidden
    folders that killed runs left for `output` are removed first (see the module's docstring)."""
    output = Path(os.path.abspath(output))  # "." and ".." have no name to put beside
    missing_parents = [parent for parent in output.parents if not parent.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(output):
        print(f"Removed {stale}, left by an earlier run for {output.name} that was interrupted.", file=sys.stderr)
    folder, lock = _new_partial(output)
    try:
        yield folder
        _replace(output, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for parent in missing_parents:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _partial_prefix(output: Path) -> str:
    return f".{output.name}.partial-"


def _new_partial(output: Path) -> tuple[Path, int | None]:
    """A new, empty partial folder for `output`, locked, and the descriptor that holds its lock (None without flock)."""
    while True:
        folder = output.with_name(f"{_partial_prefix(output)}{secrets.token_hex(4)}")
        folder.mkdir()
        if fcntl is None:
            return folder, None
        lock = os.open(folder, os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another run's cleanup holds it
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(lock), os.stat(folder)):
                return folder, lock
        os.close(lock)  # another run removed it in the instant between mkdir and flock: take a new name


def remove_stale_partials(output: Path) -> list[Path]:
    """Removes the partial folders of `output` that no live process holds locked, and returns them."""
    if fcntl is None:
        return []
    output = Path(os.path.abspath(output))
    removed = []
    for folder in sorted(output.parent.glob(f"{glob.escape(_partial_prefix(output))}*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            lock = os.open(folder, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a live run is writing it
            os.close(lock)
            continue
        try:
            shutil.rmtree(folder)
            removed.append(folder)
        except FileNotFoundError:
            pass
        finally:
            os.close(lock)
    return removed


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

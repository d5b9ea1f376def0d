"""Fine-tuning data on disk (JSONL, one row per line) and the check of every row before training starts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .collator import FastVLMDataCollator, RowError, load_image

SHOWN_PROBLEMS = 10  # bad rows listed in a `DataError`; the rest are counted


@dataclass
class BadRow:
    """A row that cannot be trained on: where it is and why."""

    source: str
    row: int  # the line of a JSONL file, or the 1-based index in a dataset
    reason: str

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}: {self.reason}"


class DataError(ValueError):
    """Rows that cannot be trained on, each named by file and row."""

    def __init__(self, bad_rows: list[BadRow], total: int):
        self.bad_rows = bad_rows
        shown = "\n".join(f"  {bad_row}" for bad_row in bad_rows[:SHOWN_PROBLEMS])
        more = len(bad_rows) - SHOWN_PROBLEMS
        more_line = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{len(bad_rows)} of {total} rows cannot be trained on:\n{shown}{more_line}\n"
            "Fix them, or skip them with --skip-bad-rows (`skip_bad_rows=True`)."
        )


@dataclass
class TrainingRows:
    """Rows ready for training, and those left out."""

    rows: list[dict[str, Any]]
    skipped: list[BadRow]


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int], list[BadRow]]:
    """The rows of a JSONL file, their line numbers, and the lines that are not rows. Blank lines are skipped; image
    paths are taken relative to the file's folder."""
    path = Path(path)
    rows, line_numbers, bad_rows = [], [], []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                bad_rows.append(BadRow(str(path), line_number, f"not valid JSON ({error.msg} at column {error.colno})"))
                continue
            if not isinstance(row, dict):
                bad_rows.append(BadRow(str(path), line_number, 'a row must be a JSON object {"images", "messages"}'))
                continue
            images = row.get("images")
            if isinstance(images, list):
                row["images"] = [_relative_to(path.parent, image) for image in images]
            rows.append(row)
            line_numbers.append(line_number)
    return rows, line_numbers, bad_rows


def _relative_to(folder: Path, image: Any) -> Any:
    if isinstance(image, str) and not os.path.isabs(image):
        return str(folder / image)
    return image


def find_bad_rows(
    rows: Sequence[dict[str, Any]],
    collator: FastVLMDataCollator,
    source: str = "dataset",
    row_numbers: Sequence[int] | None = None,
) -> list[BadRow]:
    """Every row the collator cannot train on (messages, images against placeholders, the length) or whose images
    cannot be read, named by `source` and row number (`row_numbers`, or the 1-based index)."""
    bad_rows = []
    for index, row in enumerate(rows):
        number = row_numbers[index] if row_numbers is not None else index + 1
        try:
            if not isinstance(row, dict):
                raise RowError('a row must be a mapping {"images", "messages"}')
            collator.encode(row)
            for image in row.get("images") or []:
                load_image(image)
        except RowError as error:
            bad_rows.append(BadRow(source, number, str(error)))
    return bad_rows


def load_rows(
    data: str | os.PathLike | Sequence[dict[str, Any]],
    collator: FastVLMDataCollator,
    skip_bad_rows: bool = False,
) -> TrainingRows:
    """The rows of a JSONL file (or of a sequence of rows, e.g. a `datasets.Dataset`), checked one by one before any
    training. Raises a `DataError` naming every bad row, unless `skip_bad_rows`, which leaves them out and lists them
    in `skipped`. Also raises when no row is left."""
    if isinstance(data, (str, os.PathLike)):
        source = str(data)
        rows, row_numbers, bad_rows = read_jsonl(data)
    else:
        source, rows, bad_rows = "dataset", list(data), []
        row_numbers = list(range(1, len(rows) + 1))
    total = len(rows) + len(bad_rows)
    bad_rows = sorted(bad_rows + find_bad_rows(rows, collator, source, row_numbers), key=lambda bad_row: bad_row.row)
    bad_numbers = {bad_row.row for bad_row in bad_rows}
    kept = [row for row, number in zip(rows, row_numbers) if number not in bad_numbers]
    if bad_rows and (not skip_bad_rows or not kept):
        raise DataError(bad_rows, total)
    if not kept:
        raise ValueError(f"{source} has no rows.")
    return TrainingRows(kept, bad_rows)

"""The README's promises that code can check: the error table names messages the command really prints."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def error_table_rows() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### When something goes wrong") :]
    section = section[: section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [re.match(r"\| (`+) ?(.+?) ?\1 \|", row).group(2) for row in rows]


def test_every_message_in_the_error_table_is_one_the_command_prints():
    source = "\n".join(path.read_text() for path in (ROOT / "src" / "fastvlm_hf").rglob("*.py"))
    source = re.sub(r'"\s*\n\s*(?:rf|fr|f|r)?"', "", source)  # join messages written over several string lines
    rows = error_table_rows()
    assert len(rows) >= 15
    for message in rows:
        for piece in filter(None, (part.strip(" :") for part in message.split("…"))):
            literal = piece.replace("`<image>`", "`{image_token}`")
            assert literal in source or piece in source, f"the README's error table says {message!r}: not in the source"

"""The README's and the docs' promises that code can check: the error table (docs/command-line.md) names messages the
command really prints, and every relative link and anchor between the pages leads somewhere."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def error_table_rows() -> list[str]:
    page = (ROOT / "docs" / "command-line.md").read_text()
    section = page[page.index("## When something goes wrong") :]
    section = section.split("\n## ")[0]
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
            assert literal in source or piece in source, f"the error table says {message!r}: not in the source"


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks and inline code spans."""
    text = FENCE.sub("", text)
    return re.sub(r"(`+).+?\1", "", text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading counts by its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        heading = re.match(r"#{1,6} +(.+?) *#* *$", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            if count:
                seen[f"{anchor}-{count}"] = 1
    return set(seen)


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(prose(page.read_text()))
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file or heading does not exist, each with the reason."""
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
            broken.append(f"{target}: no such heading")
    return broken


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Export to ONNX (transformers.js, onnxruntime)") == "export-to-onnx-transformersjs-onnxruntime"
    assert github_anchor("FastVLM vs LLaVA-OneVision, measured here") == "fastvlm-vs-llava-onevision-measured-here"
    assert github_anchor("Vision tower (`vision.py`)") == "vision-tower-visionpy"


def test_broken_links_finds_missing_pages_and_headings_and_reads_no_code(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Part one\n\n## Part one\n\n"
        "[a](#part-one) [b](#part-one-1) [c](other.md#its-part) [d](https://example.com/x.md) [e](other.md)\n"
        "[f](#no-part) [g](missing.md) [h](other.md#no-part) `[i](#in-code)` [k](#not-a-heading)\n\n"
        "```text\n[j](#in-a-block)\n# not a heading\n```\n"
    )
    assert broken_links(page) == [
        "#no-part: no such heading",
        "missing.md: no such file",
        "other.md#no-part: no such heading",
        "#not-a-heading: no such heading",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_anchor_leads_somewhere(page):
    assert page.exists()
    assert broken_links(page) == []


def test_the_readme_links_to_its_pages():
    assert relative_links(ROOT / "README.md")  # the test above has links to look at

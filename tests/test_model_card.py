"""`fastvlm_hf.model_card`: the card the converter writes, for Apple's three sizes and for any other model."""

import ast
import re
import runpy
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from fastvlm_hf import FastVLMConfig, model_card

MODEL_CARDS = Path(__file__).resolve().parents[1] / "model_cards"
RELEASED = {  # size: (text hidden size, Apple's repo, language model, parameters, DocVQA score)
    "0.5B": (896, "apple/FastVLM-0.5B", "Qwen2-0.5B", "622.7M", "82.5"),
    "1.5B": (1536, "apple/FastVLM-1.5B", "Qwen2-1.5B", "1,675.9M", "88.3"),
    "7B": (3584, "apple/FastVLM-7B", "Qwen2-7B", "7,764.6M", "93.2"),
}


def config_of_width(hidden_size):
    """A config only (no weights): the card depends on the language model's width."""
    return FastVLMConfig(text_config={"hidden_size": hidden_size, "num_attention_heads": 2, "num_key_value_heads": 2})


def written_card(tmp_path, text):
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return ModelCard.load(path)  # parses the YAML front matter as the Hub does


@pytest.mark.parametrize("size", RELEASED)
def test_released_sizes_get_their_facts_and_valid_metadata(tmp_path, size):
    hidden_size, apple_repo, language_model, parameters, docvqa = RELEASED[size]
    config = config_of_width(hidden_size)
    assert model_card.size_of(config) == size
    card = written_card(tmp_path, model_card.render(config, repo_id="me/FastVLM-hf", source="/data/apple-checkpoint"))

    metadata = card.data.to_dict()
    assert metadata["license"] == "apple-amlr"
    assert metadata["license_link"] == "https://github.com/apple/ml-fastvlm/blob/main/LICENSE_MODEL"
    assert (metadata["pipeline_tag"], metadata["library_name"]) == ("image-text-to-text", "transformers")
    assert metadata["base_model"] == apple_repo  # a local source: the Apple repo of that size
    assert card.text.lstrip().startswith(f"# FastVLM-{size}")
    assert language_model in card.text and f"{parameters} parameters" in card.text
    assert re.search(rf"^\| DocVQA \| {docvqa} \|$", card.text, re.MULTILINE)


def test_a_hub_source_is_the_base_model(tmp_path):
    text = model_card.render(config_of_width(896), repo_id="me/x", source="someone/FastVLM-0.5B-copy")
    assert written_card(tmp_path, text).data.base_model == "someone/FastVLM-0.5B-copy"


def test_other_sizes_get_a_generic_card_without_apples_scores(tmp_path):
    text = model_card.render(config_of_width(64), repo_id="me/FastVLM-tiny", source="/data/tiny", num_parameters=1_234_567)
    card = written_card(tmp_path, text)
    assert model_card.size_of(config_of_width(64)) is None
    assert card.data.base_model is None and card.data.license == "apple-amlr"
    assert card.text.lstrip().startswith("# FastVLM-tiny")
    assert "1.2M parameters" in card.text
    assert "Evaluation" not in card.text and "DocVQA" not in card.text


@pytest.mark.parametrize("layout", ["fastvlm", "transformers"])
def test_the_cards_code_uses_the_repo_id_and_compiles(layout):
    text = model_card.render(config_of_width(896), repo_id="me/FastVLM-0.5B-hf", layout=layout)
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 3  # pipeline, model + processor, 4-bit
    for block in blocks:
        ast.parse(block)
        assert "import fastvlm_hf" in block and '"me/FastVLM-0.5B-hf"' in block
    assert "BitsAndBytesConfig(load_in_4bit=True)" in text
    assert "pip install fastvlm-hf" in text
    assert "fastvlm-hf predict --model me/FastVLM-0.5B-hf" in text


def test_the_citation_is_a_complete_bibtex_entry():
    text = model_card.render(config_of_width(896), repo_id="me/x")
    entry = re.search(r"```bibtex\n(@inproceedings\{.*?\n\})\n```", text, re.DOTALL)
    assert entry is not None
    assert entry[1].count("{") == entry[1].count("}")
    assert "FastVLM: Efficient Vision Encoding for Vision Language Models" in entry[1] and "2412.13303" in entry[1]


def test_the_committed_cards_of_apples_sizes_are_up_to_date():
    rendered = runpy.run_path(str(MODEL_CARDS / "render.py"))["rendered_cards"]()
    assert sorted(rendered) == [f"FastVLM-{size}.md" for size in RELEASED]
    assert sorted(path.name for path in MODEL_CARDS.glob("*.md")) == sorted(rendered)
    for name, card in rendered.items():
        committed = (MODEL_CARDS / name).read_text(encoding="utf-8")
        assert committed == card, f"model_cards/{name} is stale: run `python model_cards/render.py`"

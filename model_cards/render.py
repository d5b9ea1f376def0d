"""Writes the model cards of Apple's three FastVLM sizes into this folder, as the converter writes them for
`fastvlm-hf convert apple/FastVLM-<size> FastVLM-<size>-hf`: Apple's weights (bfloat16) in this package's layout.
The cards come from the package's template and `sizes.json` (`fastvlm_hf.model_card`); run this after changing them:

    python model_cards/render.py
"""

from pathlib import Path

from fastvlm_hf import FastVLMConfig, model_card

FOLDER = Path(__file__).resolve().parent


def rendered_cards() -> dict[str, str]:
    """File name -> card, for each of Apple's released sizes."""
    cards = {}
    for size, facts in model_card.released_sizes().items():
        config = FastVLMConfig(text_config={"hidden_size": facts["text_hidden_size"]})  # the card reads the width
        card = model_card.render(config, repo_id=f"FastVLM-{size}-hf", source=facts["apple_repo"], dtype="bfloat16")
        cards[f"FastVLM-{size}.md"] = card
    return cards


def main() -> None:
    for name, card in rendered_cards().items():
        (FOLDER / name).write_text(card, encoding="utf-8")
        print(FOLDER / name)


if __name__ == "__main__":
    main()

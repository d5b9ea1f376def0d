"""`fastvlm-hf bench`: its table, and the picture and tokens it times."""

from helpers.cli import model_args

from fastvlm_hf import FastVLMForConditionalGeneration
from fastvlm_hf.cli import bench as bench_command
from fastvlm_hf.cli import main


def test_bench_prints_a_markdown_table(checkpoint, image_path, capsys):
    args = ["bench", *model_args(checkpoint), "--image", str(image_path), "--repeats", "2", "--max-new-tokens", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == "| phase | median | min | max |"
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]]
    assert names == ["preprocessing (ms)", "vision encoder (ms)", "prefill (ms)", "TTFT (ms)", "decode (ms/token)",
                     "decode (tokens/s)", "TTFT, follow-up chat turn (ms)"]  # fmt: skip
    for row in rows[1:]:
        median, low, high = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
        assert 0 < low <= median <= high, row
    assert "2 runs" in out


def test_bench_without_an_image_uses_its_picture_and_generates_exactly_the_tokens_asked(checkpoint, monkeypatch, capsys):
    pictures, new_tokens = [], []
    make_picture = bench_command._bench_image
    monkeypatch.setattr(bench_command, "_bench_image", lambda: pictures.append(make_picture()) or pictures[-1])
    generate = FastVLMForConditionalGeneration.generate

    def counting_generate(self, *args, **kwargs):
        output = generate(self, *args, **kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(FastVLMForConditionalGeneration, "generate", counting_generate)
    assert main(["bench", *model_args(checkpoint), "--repeats", "2", "--max-new-tokens", "3"]) == 0
    assert [picture.size for picture in pictures] == [(1024, 768)]
    assert new_tokens and set(new_tokens) == {3}  # every turn, first and follow-up, warm-up included
    assert "3 new tokens" in capsys.readouterr().out

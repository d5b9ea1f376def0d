"""`fastvlm_hf.stats`: the phases of one generation, timed with hooks and a token streamer; the statistics, tables and
device synchronization that report them."""

import time

import pytest
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastvlm_hf.cli.bench import summary_table
from fastvlm_hf.stats import GenerationTimer, GenerationTimings, TokenClock, markdown_table, summarize, synchronize

VISION_DELAY_S = 1.0  # far above the tiny model's own prefill time, even on a busy machine


@pytest.fixture(scope="module")
def inputs(tiny_processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (100, 80), (200, 30, 30))},
                                             {"type": "text", "text": "Describe the image."}]}]  # fmt: skip
    return tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip


class Recorder:
    def __init__(self):
        self.values = []
        self.ended = False

    def put(self, value):
        self.values.append(value)

    def end(self):
        self.ended = True


def test_token_clock_times_new_tokens_and_forwards_everything():
    inner = Recorder()
    clock = TokenClock(inner)
    for value in [torch.tensor([[1, 2, 3]]), torch.tensor([4]), torch.tensor([5])]:
        clock.put(value)
    clock.end()
    assert len(clock.token_times) == 2  # the prompt is not a generated token
    assert len(inner.values) == 3 and inner.ended


def test_vision_time_is_measured_and_left_out_of_prefill(tiny_model, tiny_processor, inputs, monkeypatch):
    tower = tiny_model.model.vision_tower
    original_forward = tower.forward

    def slow_forward(*args, **kwargs):
        time.sleep(VISION_DELAY_S)
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(tower, "forward", slow_forward)
    timer = GenerationTimer(tiny_model)
    with timer:
        with timer.preprocessing():
            time.sleep(0.05)
        output = tiny_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, streamer=timer.streamer)
    timings = timer.timings(prompt_tokens=inputs["input_ids"].shape[1])

    assert output.shape[1] - inputs["input_ids"].shape[1] == timings.new_tokens == 4
    assert timings.preprocess_s >= 0.05
    assert VISION_DELAY_S <= timings.vision_s < VISION_DELAY_S + 5
    assert 0 < timings.prefill_s < VISION_DELAY_S
    assert timings.ttft_s >= timings.preprocess_s + timings.vision_s + timings.prefill_s
    assert timings.decode_s > 0 and timings.decode_ms_per_token == pytest.approx(1000 * timings.decode_s / 3)
    assert not timer._handles  # the hooks are gone after the block


def test_a_model_without_vision_tower_gets_no_vision_time():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    timer = GenerationTimer(model)
    with timer:
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                       streamer=timer.streamer, pad_token_id=0)  # fmt: skip
    timings = timer.timings()
    assert timings.vision_s is None and timings.preprocess_s is None
    assert timings.prefill_s > 0 and timings.new_tokens == 3


def test_timings_as_milliseconds():
    timings = GenerationTimings(preprocess_s=0.01, vision_s=0.02, prefill_s=0.03, ttft_s=0.07, decode_s=0.5,
                                prompt_tokens=20, new_tokens=11)  # fmt: skip
    assert timings.as_dict() == {
        "preprocess_ms": 10.0, "vision_ms": 20.0, "prefill_ms": 30.0, "ttft_ms": 70.0,
        "decode_ms_per_token": 50.0, "tokens_per_s": 20.0, "prompt_tokens": 20, "new_tokens": 11,
    }  # fmt: skip
    single_token = GenerationTimings(None, None, None, 0.07, 0.0, 20, 1)
    assert single_token.decode_ms_per_token is None and single_token.tokens_per_s is None


def test_summarize_skips_unmeasured_values():
    assert summarize([3.0, None, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert summarize([4.0, 1.0, 2.0, 3.0]) == (2.5, 1.0, 4.0)  # an even count: the mean of the middle two
    assert summarize([None, None]) is None


def test_markdown_table_writes_each_cell_as_str_and_aligns_the_columns_asked():
    rows = [["fp32", 1.5, None], ["bf16", "2×", 3]]
    assert markdown_table(["dtype", "ms", "note"], rows) == (
        "| dtype | ms | note |\n|---|---|---|\n| fp32 | 1.5 | None |\n| bf16 | 2× | 3 |"
    )
    assert markdown_table(["a", "b"], [], right_aligned={1}) == "| a | b |\n|---|---:|"


def test_the_bench_command_table_gives_median_min_and_max_of_the_measured_values():
    table = summary_table([("TTFT (ms)", [30.0, None, 10.0, 20.04]), ("vision encoder (ms)", [None, None])])
    assert table == (
        "| phase | median | min | max |\n"
        "|---|---:|---:|---:|\n"
        "| TTFT (ms) | 20.0 | 10.0 | 30.0 |\n"
        "| vision encoder (ms) | n/a | n/a | n/a |"
    )


def test_synchronize_waits_for_cuda_and_mps_and_not_for_the_cpu(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(("mps", None)))
    synchronize("cpu")
    synchronize(torch.device("cpu"))
    assert waited == []
    synchronize("cuda")
    synchronize(torch.device("cuda", 1))
    synchronize("mps")
    assert waited == [("cuda", torch.device("cuda")), ("cuda", torch.device("cuda", 1)), ("mps", None)]


class SteppedClock:
    """A `time.perf_counter` that moves only when told to, so that every phase has a known length."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class ScriptedVLM(torch.nn.Module):
    """A model whose prefill embeds the text (0.5 s), runs the vision tower (3 s) and the projector (1 s), then the
    language model (2 s); each decoding step takes 0.5 s. `generate` streams the prompt, then one token per step."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.vision_tower = torch.nn.Identity()
        self.multi_modal_projector = torch.nn.Identity()
        self.vision_tower.register_forward_hook(lambda *_: clock.advance(3.0))
        self.multi_modal_projector.register_forward_hook(lambda *_: clock.advance(1.0))

    def forward(self, prefill):
        if prefill:
            self.clock.advance(0.5)
            self.multi_modal_projector(self.vision_tower(torch.zeros(1)))
            self.clock.advance(2.0)
        else:
            self.clock.advance(0.5)

    def generate(self, streamer, new_tokens):
        streamer.put(torch.tensor([[1, 2, 3]]))
        for step in range(new_tokens):
            self(prefill=step == 0)
            streamer.put(torch.tensor([4 + step]))
        streamer.end()


def test_phases_on_a_controlled_clock(monkeypatch):
    """TTFT runs to the first token (not the last), prefill leaves the vision time out, decode spans first to last."""
    clock = SteppedClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    model = ScriptedVLM(clock)
    with GenerationTimer(model) as timer:
        with timer.preprocessing():
            clock.advance(0.25)
        model.generate(timer.streamer, new_tokens=4)
    timings = timer.timings(prompt_tokens=3)
    assert timings.preprocess_s == pytest.approx(0.25)
    assert timings.vision_s == pytest.approx(4.0)  # tower and projector
    assert timings.prefill_s == pytest.approx(2.5)  # 0.5 s of embedding + 2 s of language model
    assert timings.ttft_s == pytest.approx(0.25 + 6.5)  # preprocessing, then the whole first forward
    assert timings.decode_s == pytest.approx(1.5)  # three steps after the first token
    assert timings.decode_ms_per_token == pytest.approx(500.0)
    assert timings.tokens_per_s == pytest.approx(2.0)
    assert (timings.new_tokens, timings.prompt_tokens) == (4, 3)

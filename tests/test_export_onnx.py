"""`fastvlm_hf.export` and `fastvlm-hf export`: a tiny checkpoint of each layout exported to the transformers.js /
onnxruntime layout; onnxruntime's greedy tokens against `model.generate`; the fp16, q8 and q4 graphs; transformers.js
itself, in Node, on the exported folder; and bad input. CI runs this module in one suite only (see .ci/run)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from helpers.checkpoints import IMAGE_SIDE, write_native_checkpoint  # noqa: E402
from PIL import Image  # noqa: E402

from fastvlm_hf import FastVLMForConditionalGeneration, FastVLMProcessor, export  # noqa: E402
from fastvlm_hf.cli import main  # noqa: E402
from fastvlm_hf.export import graphs, layout  # noqa: E402
from fastvlm_hf.export.runtime import OnnxFastVLM  # noqa: E402

NEW_TOKENS = 6
LAYOUTS = ["fastvlm", "apple", "transformers"]
# Pinned: the layout and loading code this module checks against are transformers.js 4.3's.
TRANSFORMERS_JS = "@huggingface/transformers@4.3.2"


@pytest.fixture(scope="module")
def sources(tiny_checkpoint_dir, apple_dir, reference_model, tmp_path_factory):
    """A tiny checkpoint of each layout."""
    folders = {"fastvlm": tiny_checkpoint_dir, "apple": apple_dir}
    if hasattr(transformers, "FastVlmConfig"):
        folders["transformers"] = write_native_checkpoint(tmp_path_factory.mktemp("native") / "model", reference_model)
        FastVLMProcessor.from_pretrained(apple_dir).save_pretrained(folders["transformers"])
    return folders


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory):
    """Each layout's export (the float32 graphs; ours also in fp16, q8 and q4), verified on the way."""
    folders = {}
    for name, source in sources.items():
        folders[name] = tmp_path_factory.mktemp("onnx") / f"{name}-onnx"
        dtypes = ["fp32", "fp16", "q8", "q4"] if name == "fastvlm" else ["fp32"]
        # transformers' native config does not say the tower's resolution (its processor does): give it
        result = export.export(str(source), folders[name], dtypes=dtypes, resolution=IMAGE_SIDE, verify=True)
        assert result.logits_difference <= 1e-4 and len(result.tokens) > 1
    return folders


def layout_case(name, sources, exported):
    """The source, its processor at the export's resolution, and the exported folder."""
    if name not in sources:
        pytest.skip(f"transformers {transformers.__version__} has no fast_vlm")  # only before 5.0
    processor = FastVLMProcessor.from_pretrained(sources[name])
    processor.image_processor.size = {"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    return sources[name], processor, exported[name]


def prompt(processor, images, text="Describe the image."):
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip


def sample_images(side, count):
    generator = np.random.default_rng(count)
    shapes = [(side, side * 3 // 4), (side * 2 // 3, side)]  # not square: the padding shows
    return [Image.fromarray(generator.integers(0, 256, (*shapes[i % 2], 3), dtype=np.uint8)) for i in range(count)]


def torch_greedy(model, inputs, new_tokens=NEW_TOKENS):
    """`generate`'s greedy tokens, never stopping early, and the first step's logits."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)  # fmt: skip
    return output.sequences[0, inputs["input_ids"].shape[1] :].tolist(), output.logits[0][0].numpy()


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_export_writes_the_transformers_js_layout(layout_name, sources, exported):
    source, processor, folder = layout_case(layout_name, sources, exported)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava_qwen2" and config["architectures"] == ["LlavaQwen2ForCausalLM"]
    assert config["image_token_index"] == processor.tokenizer.convert_tokens_to_ids("<image>") >= 0
    assert config["transformers.js_config"]["dtype"] == "fp32"
    assert json.loads((folder / "processor_config.json").read_text()) == {
        "processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": 64,
        "num_additional_image_tokens": 0, "vision_feature_select_strategy": "full",
    }  # fmt: skip
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "CLIPImageProcessor"
    assert preprocessor["size"] == {"shortest_edge": 128} and preprocessor["crop_size"] == {"height": 128, "width": 128}
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == processor.chat_template
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert eos == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "transformers.js" in (folder / "README.md").read_text()

    text_config = FastVLMForConditionalGeneration.config_class.from_pretrained(source).text_config
    decoder = onnx.load(folder / "onnx" / "decoder_model_merged.onnx", load_external_data=False)
    shapes = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in [*decoder.graph.input, *decoder.graph.output]}  # fmt: skip
    heads, head_dim = graphs.cache_shape(text_config)
    for layer in range(text_config.num_hidden_layers):
        for part in ("key", "value"):
            assert shapes[f"past_key_values.{layer}.{part}"] == ["batch_size", heads, "past_sequence_length", head_dim]
            assert shapes[f"present.{layer}.{part}"] == ["batch_size", heads, "total_sequence_length", head_dim]
    assert shapes["inputs_embeds"] == ["batch_size", "sequence_length", text_config.hidden_size]
    vision = onnx.load(folder / "onnx" / "vision_encoder.onnx")
    assert [d.dim_param or d.dim_value for d in vision.graph.input[0].type.tensor_type.shape.dim] == [
        "batch_size", 3, 128, 128]  # fmt: skip


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("num_images", [1, 2, 0])
def test_onnxruntime_generates_the_tokens_of_generate(layout_name, num_images, sources, exported):
    source, processor, folder = layout_case(layout_name, sources, exported)
    model = FastVLMForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    inputs = prompt(processor, sample_images(IMAGE_SIDE, num_images))
    expected, expected_logits = torch_greedy(model, inputs)

    pixel_values = inputs["pixel_values"].numpy() if num_images else None
    result = OnnxFastVLM(folder).generate(inputs["input_ids"].numpy(), pixel_values, NEW_TOKENS)
    assert result.tokens == expected
    difference = np.abs(result.first_logits - expected_logits).max() / np.abs(expected_logits).max()
    assert difference <= 1e-4, f"first-step logits differ by {difference:.3g} of the largest"



class RecordingStreamer:
    """What a transformers streamer is handed: the prompt's ids, then each new token, then the end."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(np.asarray(value).reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_onnxruntime_feeds_a_streamer_as_generate_does(sources, exported):
    source, processor, folder = layout_case("fastvlm", sources, exported)
    model = FastVLMForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    inputs = prompt(processor, sample_images(IMAGE_SIDE, 1))
    expected, onnx_streamer = RecordingStreamer(), RecordingStreamer()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=expected)
    OnnxFastVLM(folder).generate(inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), NEW_TOKENS,
                                 streamer=onnx_streamer)  # fmt: skip
    assert onnx_streamer.puts == expected.puts and len(expected.puts) == NEW_TOKENS + 1
    assert onnx_streamer.ended and expected.ended

def test_verify_fails_when_onnxruntime_loses_the_image(exported, tiny_checkpoint_dir, tiny_processor, monkeypatch):
    from fastvlm_hf.export import verify

    model = FastVLMForConditionalGeneration.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32).eval()
    assert verify.verify_export(model, tiny_processor, exported["fastvlm"]).logits_difference <= 1e-4
    monkeypatch.setattr(OnnxFastVLM, "image_features", lambda self, pixel_values: np.zeros((1, 4, 64), np.float32))
    with pytest.raises(export.ExportError, match="do not reproduce PyTorch"):
        verify.verify_export(model, tiny_processor, exported["fastvlm"])


def test_the_image_reaches_the_onnx_logits(exported, tiny_processor):
    """Else the comparisons above would hold whatever the graphs did with the image."""
    onnx_model = OnnxFastVLM(exported["fastvlm"])
    logits = []
    for seed in (1, 2):
        inputs = prompt(tiny_processor, sample_images(IMAGE_SIDE, seed)[-1:])
        logits.append(onnx_model.generate(inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), 1).first_logits)
    assert np.abs(logits[0] - logits[1]).max() > 1e-3 * np.abs(logits[0]).max()


# The lower precisions against float32, on the tiny model (the benchmark measures FastVLM-0.5B): (largest first-step
# logit difference relative to the largest logit, at most; greedy tokens that must equal float32's).
AGREEMENT = {"fp16": (5e-3, NEW_TOKENS), "q8": (0.15, 1), "q4": (0.6, 0)}


@pytest.mark.parametrize("dtype", ["fp16", "q8", "q4"])
def test_lower_precision_graphs_load_and_generate(dtype, exported, tiny_processor):
    folder = exported["fastvlm"]
    inputs = prompt(tiny_processor, sample_images(IMAGE_SIDE, 1))
    args = (inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), NEW_TOKENS)
    reference = OnnxFastVLM(folder, "fp32").generate(*args)
    result = OnnxFastVLM(folder, dtype).generate(*args)
    difference = np.abs(result.first_logits - reference.first_logits).max() / np.abs(reference.first_logits).max()
    same_tokens = next((i for i, (a, b) in enumerate(zip(result.tokens, reference.tokens)) if a != b), NEW_TOKENS)
    print(f"{dtype}: first-step logits within {difference:.3g} of float32's largest; "
          f"{same_tokens} of {NEW_TOKENS} greedy tokens equal float32's")  # fmt: skip
    limit, tokens = AGREEMENT[dtype]
    assert len(result.tokens) == NEW_TOKENS and difference <= limit and same_tokens >= tokens

    sizes = {d: (folder / "onnx" / layout.graph_file("decoder_model_merged", d)).stat().st_size for d in ("fp32", dtype)}
    assert sizes[dtype] < sizes["fp32"] * 0.8
    ops = {node.op_type for node in onnx.load(folder / "onnx" / layout.graph_file("decoder_model_merged", dtype)).graph.node}
    assert {"fp16": "Cast", "q8": "MatMulInteger", "q4": "MatMulNBits"}[dtype] in ops


def test_fp16_graphs_take_float32_pixels_and_give_features_and_embeddings_of_one_dtype(exported):
    sessions = OnnxFastVLM(exported["fastvlm"], "fp16").sessions
    assert sessions["vision_encoder"].get_inputs()[0].type == "tensor(float)"
    assert sessions["vision_encoder"].get_outputs()[0].type == "tensor(float16)"
    assert sessions["embed_tokens"].get_outputs()[0].type == "tensor(float16)"
    assert {value.type for value in sessions["decoder_model_merged"].get_inputs() if value.name != "attention_mask"
            and value.name != "position_ids"} == {"tensor(float16)"}  # fmt: skip


# transformers.js in Node. The package goes to FASTVLM_HF_NODE_MODULES (.ci/run points it at a cached folder), or to
# ~/.cache/fastvlm-hf/node; onnxruntime-node's install script would download CUDA libraries from outside the npm
# registry, which ONNXRUNTIME_NODE_INSTALL=skip turns off (its CPU library comes in the package itself).
NODE_SCRIPT = Path(__file__).parent / "helpers" / "transformers_js_generate.mjs"


@pytest.fixture(scope="module")
def transformers_js():
    """The folder whose node_modules holds transformers.js, installed there if missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("node and npm are missing: CI must run the transformers.js test")
        pytest.skip("node and npm are not installed")
    folder = Path(os.environ.get("FASTVLM_HF_NODE_MODULES", Path.home() / ".cache" / "fastvlm-hf" / "node"))
    package = folder / "node_modules" / "@huggingface" / "transformers" / "package.json"
    if not package.exists() or json.loads(package.read_text())["version"] != TRANSFORMERS_JS.rsplit("@", 1)[1]:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "package.json").exists():
            (folder / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", TRANSFORMERS_JS], cwd=folder, check=True,
                       env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}, timeout=600)  # fmt: skip
    return folder


def run_transformers_js(transformers_js, folder, image, text, dtype):
    result = subprocess.run(
        ["node", str(NODE_SCRIPT), str(folder), str(image), text, str(NEW_TOKENS), dtype],
        env={**os.environ, "NODE_PATH": str(transformers_js / "node_modules")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_transformers_js_generates_the_tokens_of_generate(transformers_js, exported, sources, tmp_path):
    folder = exported["apple"]
    processor = FastVLMProcessor.from_pretrained(sources["apple"])
    model = FastVLMForConditionalGeneration.from_pretrained(sources["apple"], dtype=torch.float32).eval()
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (128, 128, 3), dtype=np.uint8))  # square
    image.save(tmp_path / "image.png")
    inputs = prompt(processor, [image], "What is in the picture?")
    expected, _ = torch_greedy(model, inputs)

    answer = run_transformers_js(transformers_js, folder, tmp_path / "image.png", "What is in the picture?", "fp32")
    assert answer["input_ids"] == inputs["input_ids"][0].tolist()  # the chat template and the image tokens
    assert answer["new_tokens"] == expected


def test_transformers_js_runs_the_q4_graphs_as_onnxruntime_does(transformers_js, exported, tiny_processor, tmp_path):
    """The 4-bit operators (MatMulNBits, GatherBlockQuantized) in transformers.js's own onnxruntime."""
    image = Image.fromarray(np.random.default_rng(6).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    inputs = prompt(tiny_processor, [image])
    expected = OnnxFastVLM(exported["fastvlm"], "q4").generate(inputs["input_ids"].numpy(),
                                                               inputs["pixel_values"].numpy(), NEW_TOKENS)  # fmt: skip
    eos = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected_tokens = expected.tokens[: expected.tokens.index(eos) + 1] if eos in expected.tokens else expected.tokens
    answer = run_transformers_js(transformers_js, exported["fastvlm"], tmp_path / "image.png", "Describe the image.",
                                 "q4")  # fmt: skip
    assert answer["new_tokens"] == expected_tokens


# Bad input: one line, nothing left behind.


def run_export(argv, capsys):
    code = main(["export", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_an_existing_output_is_refused_without_overwrite(tiny_checkpoint_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, lines = run_export([tiny_checkpoint_dir, tmp_path / "out"], capsys)
    assert code == 1 and lines[-1].startswith("fastvlm-hf: error: ") and "--overwrite" in lines[-1]
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_export_into_the_source_folder_is_refused(tiny_checkpoint_dir, capsys):
    code, lines = run_export([tiny_checkpoint_dir, tiny_checkpoint_dir / "onnx"], capsys)
    assert code == 1 and "is inside the source folder" in lines[-1]
    assert not (tiny_checkpoint_dir / "onnx").exists()


def test_a_resolution_off_the_towers_stride_is_refused(tiny_checkpoint_dir, tmp_path, capsys):
    code, lines = run_export([tiny_checkpoint_dir, tmp_path / "out", "--resolution", "100"], capsys)
    assert code == 1 and lines[-1] == ("fastvlm-hf: error: --resolution 100 is not a multiple of the vision "
                                       "tower's stride, 64.")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_dtype_is_refused_by_the_python_api(tiny_checkpoint_dir, tmp_path):
    with pytest.raises(export.ExportError, match="Unknown dtype 'int3'"):
        export.export(str(tiny_checkpoint_dir), tmp_path / "out", dtypes=["fp32", "int3"])
    assert list(tmp_path.iterdir()) == []


def test_a_packed_model_is_refused(tiny_checkpoint_dir, tmp_path, monkeypatch, capsys):
    def load_packed(*args, **kwargs):
        model = FastVLMForConditionalGeneration.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32)
        assert model.pack_weights()
        return model

    monkeypatch.setattr(export, "load_model", load_packed)
    code, lines = run_export([tiny_checkpoint_dir, tmp_path / "out"], capsys)
    assert code == 1 and "packed or quantized weights" in lines[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_tower_that_does_not_export_is_one_line_and_leaves_nothing(tiny_checkpoint_dir, tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    def fails(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("data-dependent control flow")

    monkeypatch.setattr(graphs, "export_vision_encoder", fails)
    code, lines = run_export([tiny_checkpoint_dir, tmp_path / "deep" / "out"], capsys)
    assert code == 1 and not any("Traceback" in line for line in lines)
    assert lines[-1].startswith("fastvlm-hf: error: torch's ONNX exporter cannot trace") and "control flow" in lines[-1]
    assert list(tmp_path.iterdir()) == []

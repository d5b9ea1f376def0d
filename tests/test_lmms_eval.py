"""lmms-eval evaluates FastVLM with the `fastvlm` model of `fastvlm_hf.integrations.lmms_eval`: lmms-eval's own
command line, offline, on a tiny checkpoint and a task written here (local JSONL and images, lmms-eval's exact-match
metric). Its answers are checked against `generate` in transformers for the same prompt and images.

Runs where lmms-eval is installed (the `eval` extra; CI's lmms-eval suite); skipped elsewhere.
"""

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.tiny_model import save_decisive_checkpoint
from PIL import Image
from transformers import AutoProcessor

from fastvlm_hf import FastVLMForConditionalGeneration

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'fastvlm-hf[eval]')")

from lmms_eval.api.instance import Instance

from fastvlm_hf.integrations import lmms_eval as plugin

TASK = "fastvlm_tiny_vqa"
CONTEXT = 128  # the tiny model's context (max_position_embeddings): a document with many images does not fit
NEW_TOKENS = 6
STOP = "e"  # a stop string the tiny model's answers hold, so that cutting at it is tested
BATCH_SIZE = 3
IMAGE_SIZES = [(150, 100), (96, 160), (128, 128), (300, 80)]
# The documents: a question and the indices of its images (`None` for a video); the first `MATCHED` get their
# expected answer as the target, the others a target no answer equals.
DOCS = [
    ("Describe the image.", [0]),
    ("Count the objects.", [1, 2]),
    ("Hello world!", []),
    ("What is in this picture?", [3]),
    ("How many apples are on the table?", [2, 0]),
    ("Describe the image.", [1] * 40),  # 160 image tokens: over the context
    ("What is in this picture?", None),
    ("The quick brown fox jumps over the lazy dog.", [3]),
]
MATCHED = 4
TOO_LONG, VIDEO = 5, 6

TASK_YAML = f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data_file}}
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_task.doc_to_visual
doc_to_text: !function tiny_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {NEW_TOKENS}
  temperature: 0
  until: ["{STOP}"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_CODE = """\
import os

from PIL import Image

FOLDER = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    if doc["video"]:
        return [os.path.join(FOLDER, doc["video"])]
    return [Image.open(os.path.join(FOLDER, name)).convert("RGB") for name in doc["images"]]


def doc_to_text(doc):
    return doc["question"]
"""


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tiny_processor, tmp_path_factory):
    """The tiny FastVLM with a short context, and weights drawn large enough that its answers depend on the images and
    the question."""
    config = tiny_config.__class__.from_dict(tiny_config.to_dict())
    config.text_config.max_position_embeddings = CONTEXT
    return save_decisive_checkpoint(config, tiny_processor, tmp_path_factory.mktemp("tiny-fastvlm-lmms-eval"))



def generation_requests(doc_to_messages, num_docs):
    """lmms-eval's requests for the documents of a task "task", split "test", as its evaluator builds them."""
    return [
        Instance(
            "generate_until",
            ("", doc_to_messages, {"max_new_tokens": NEW_TOKENS}, doc_id, "task", "test"),
            idx=0,
            metadata={"task": "task", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id in range(num_docs)
    ]

@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES]


@pytest.fixture(scope="module")
def generated(checkpoint, images):
    """transformers' greedy answer to each document that fits, one at a time, with the model's weights packed as the
    plugin packs them on CPU (packed and plain kernels round differently)."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = FastVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.pack_weights()
    answers = {}
    for index, (question, image_indices) in enumerate(DOCS):
        if index in (TOO_LONG, VIDEO):
            continue
        doc_images = [images[i] for i in image_indices]
        content = [{"type": "image"}] * len(doc_images) + [{"type": "text", "text": question}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=doc_images or None, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        answers[index] = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


@pytest.fixture(scope="module")
def expected(generated):
    """The answers as the task wants them: cut at its stop string."""
    return {index: answer.split(STOP, 1)[0] for index, answer in generated.items()}


@dataclasses.dataclass
class Run:
    results: dict
    samples: dict  # doc id -> the logged sample
    log: str  # stdout, where lmms-eval logs, and stderr


@pytest.fixture(scope="module")
def run(checkpoint, images, expected, tmp_path_factory):
    """lmms-eval's command line on the task, offline, with `--model fastvlm` on the tiny checkpoint."""
    folder = tmp_path_factory.mktemp("lmms-eval-task")
    for index, image in enumerate(images):
        image.save(folder / f"image{index}.png")
    with open(folder / "docs.jsonl", "w") as docs:
        for index, (question, image_indices) in enumerate(DOCS):
            answer = expected[index].strip() if index < MATCHED else "no answer is this"  # lmms-eval strips answers
            doc = {
                "question": question,
                "images": [f"image{i}.png" for i in image_indices or []],
                "video": "clip.mp4" if image_indices is None else "",
                "answer": answer,
            }
            docs.write(json.dumps(doc) + "\n")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(data_file=folder / "docs.jsonl"))
    (folder / "tiny_task.py").write_text(TASK_CODE)

    output = folder / "output"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(folder / "hf-home"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "fastvlm",
        "--model_args", f"pretrained={checkpoint},device=cpu,dtype=float32", "--tasks", TASK,
        "--include_path", str(folder), "--batch_size", str(BATCH_SIZE), "--output_path", str(output), "--log_samples",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=600)  # fmt: skip
    log = result.stdout
    assert "Error during evaluation" not in log, log[-4000:]
    results_files = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    samples_files = glob.glob(str(output / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    assert len(results_files) == 1 and len(samples_files) == 1, log[-4000:]
    with open(results_files[0]) as file:
        results = json.load(file)
    with open(samples_files[0]) as file:
        samples = {sample["doc_id"]: sample for sample in map(json.loads, file)}
    return Run(results, samples, log)


def test_every_document_is_logged_with_generates_answer(run, generated, expected):
    assert sorted(run.samples) == list(range(len(DOCS)))
    # the model's answer; logged as `filtered_resps` alone when the task's filters left it as it was
    answers = {doc_id: sample.get("resps", sample["filtered_resps"]) for doc_id, sample in run.samples.items()}
    assert {doc_id: answers[doc_id] for doc_id in expected} == expected
    assert len(set(expected.values())) > 1  # answers that depend on the document, or the comparison proves little
    assert any(STOP in answer for answer in generated.values())  # and some that the stop string cuts
    assert answers[TOO_LONG] == answers[VIDEO] == ""


def test_results_hold_the_exact_match_of_the_answers(run, expected):
    matched = sum(expected[index].strip() == run.samples[index]["target"] for index in expected)
    assert matched == MATCHED
    assert run.results["results"][TASK]["exact_match,none"] == pytest.approx(MATCHED / len(DOCS))


def test_unanswerable_documents_are_reported_and_the_run_goes_on(run):
    lines = [line for line in run.log.splitlines() if "fastvlm: cannot answer document" in line]
    assert len(lines) == 2, run.log[-4000:]
    too_long, video = sorted(lines, key=lambda line: "video" in line)
    assert f"document {TOO_LONG} of task {TASK}" in too_long and f"holds {CONTEXT}" in too_long
    assert f"document {VIDEO} of task {TASK}" in video and "holds video" in video


def test_the_entry_point_names_the_chat_model():
    from lmms_eval.models import get_model

    assert get_model(plugin.MODEL_NAME) is plugin.FastVLM


@pytest.mark.parametrize(
    "task_kwargs, expected_kwargs, expected_stops",
    [
        ({}, {"max_new_tokens": 1024, "num_beams": 1, "do_sample": False}, []),
        ({"max_new_tokens": 16, "temperature": 0, "until": ["\n\n", ""]}, {"max_new_tokens": 16, "num_beams": 1,
         "do_sample": False}, ["\n\n"]),
        ({"temperature": 0.7, "top_p": 0.9, "until": "."}, {"max_new_tokens": 1024, "num_beams": 1, "do_sample": True,
         "temperature": 0.7, "top_p": 0.9}, ["."]),
    ],
)  # fmt: skip
def test_task_generation_kwargs_become_generates(task_kwargs, expected_kwargs, expected_stops):
    assert plugin.generation_kwargs(task_kwargs) == (expected_kwargs, expected_stops)


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"dtype": "float8"}, "dtype=float8 is not one of auto, bfloat16, float16, float32"),
        ({"image_mode": "stretch"}, "image_mode=stretch is not one of pad, crop"),
        ({"batch_size": "auto"}, "batch_size (--batch_size) must be a positive whole number, got 'auto'"),
        ({"resolution": 100}, "--resolution 100 is not a multiple of 64"),
        ({"pretrained": "./no-such-folder"}, "model folder not found"),
        ({"device": "tpu"}, "device=tpu is not one of auto, cpu, cuda, mps"),
        ({"max_tokens": 8, "temperature": 0}, "unknown model argument max_tokens, temperature; it takes pretrained"),
    ],
)
def test_bad_model_arguments_are_one_line_errors(model_args, message, checkpoint):
    with pytest.raises(ValueError, match="^fastvlm: .*" + re.escape(message)) as error:
        plugin.FastVLM(**{"pretrained": str(checkpoint), "device": "cpu", **model_args})
    assert "\n" not in str(error.value)


def test_apples_layout_and_image_files_answer_as_generate(apple_dir, images, tmp_path):
    """In-process, as lmms-eval calls the model: a checkpoint in Apple's layout as published, documents whose images
    are file paths, several of them in one batch."""
    image_paths = []
    for index, image in enumerate(images[:2]):
        image_paths.append(str(tmp_path / f"image{index}.png"))
        image.save(image_paths[-1])
    docs = [("Describe the image.", image_paths[:1]), ("Hello world!", []), ("Count the objects.", image_paths)]

    def doc_to_messages(doc):
        question, paths = doc
        content = [{"type": "image", "url": path} for path in paths] + [{"type": "text", "text": question}]
        return [{"role": "user", "content": content}]

    model = plugin.FastVLM(pretrained=str(apple_dir), device="cpu", dtype="float32", batch_size=2)
    model.task_dict = {"task": {"test": docs}}
    requests = generation_requests(doc_to_messages, len(docs))
    answers = model.generate_until(requests)
    assert len(set(answers)) == len(docs)  # answers that depend on the document

    processor = AutoProcessor.from_pretrained(apple_dir)
    reference = FastVLMForConditionalGeneration.from_pretrained(apple_dir, dtype=torch.float32).eval()
    reference.pack_weights()
    for (question, paths), answer in zip(docs, answers):
        content = [{"type": "image", "image": path} for path in paths] + [{"type": "text", "text": question}]
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
        with torch.inference_mode():
            output = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert answer == processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_resolution_and_image_mode_set_the_image_processor(checkpoint):
    model = plugin.FastVLM(pretrained=str(checkpoint), device="cpu", resolution=256, image_mode="crop")
    assert model.processor.image_processor.size == {"height": 256, "width": 256}
    assert model.processor.image_processor.image_mode == "crop"


def test_several_processes_are_refused(checkpoint, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="fastvlm: one process only"):
        plugin.FastVLM(pretrained=str(checkpoint), device="cpu")


def test_an_image_that_does_not_open_is_reported_and_the_others_answered(checkpoint, images, tmp_path):
    from loguru import logger

    images[0].save(tmp_path / "image.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    docs = [str(tmp_path / "broken.png"), str(tmp_path / "image.png"), str(tmp_path / "missing.png")]

    def doc_to_messages(path):
        return [{"role": "user", "content": [{"type": "image", "url": path}, {"type": "text", "text": "Describe."}]}]

    model = plugin.FastVLM(pretrained=str(checkpoint), device="cpu", dtype="float32", batch_size=3)
    model.task_dict = {"task": {"test": docs}}
    requests = generation_requests(doc_to_messages, len(docs))
    messages = []
    sink = logger.add(messages.append, format="{message}")
    try:
        answers = model.generate_until(requests)
    finally:
        logger.remove(sink)
    assert answers[0] == answers[2] == "" and answers[1] != ""
    assert [message.strip() for message in messages] == [
        f"fastvlm: cannot answer document 0 of task task: not an image file Pillow can read: {docs[0]}; it is "
        "answered with an empty string",
        f"fastvlm: cannot answer document 2 of task task: image not found: {docs[2]}; it is answered with an empty "
        "string",
    ]

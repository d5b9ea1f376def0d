"""`fastvlm-hf chat`: turns that reuse the KV cache, its commands, piped and typed input, a conversation
past the context."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.cli import PROMPT, Sessions, expected_answer, model_args, reference_inputs, run_chat
from PIL import Image

from fastvlm_hf.chat import ChatSession


class TTYInput(io.StringIO):
    def isatty(self):
        return True


def test_chat_encodes_the_image_once_and_continues_from_the_cache(checkpoint, reference, image_path, monkeypatch, capsys):
    processor, model = reference
    sessions = Sessions(monkeypatch)
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, [PROMPT, "What colour is the square?"])
    assert sessions.vision_calls == 1
    session = sessions.created[0]
    # Every position is computed once (the last generated token never is): the second turn ran only its new tokens.
    assert sessions.positions_computed == session.input_ids.shape[1] - 1
    first_answer = expected_answer(reference, [image_path], PROMPT, 6)
    second_prompt = session.input_ids[:, : session.prompt_tokens]
    with torch.no_grad():  # a fresh prefill of the whole conversation, image included, without any cache
        fresh = model.generate(input_ids=second_prompt, attention_mask=torch.ones_like(second_prompt),
                               pixel_values=reference_inputs(processor, [image_path], PROMPT)["pixel_values"],
                               max_new_tokens=6, do_sample=False)  # fmt: skip
    assert torch.equal(session.input_ids, fresh)
    second_answer = processor.decode(fresh[0, session.prompt_tokens :], skip_special_tokens=True)
    assert captured.out == f"{first_answer}\n{second_answer}\n"
    assert "> " not in captured.err


@pytest.mark.parametrize("ends_with_eos", [False, True])
def test_chat_turns_follow_the_chat_template(reference, image_path, ends_with_eos):
    """Each turn's token sequence reads as the chat template's rendering of the whole conversation, whether the last
    answer ended with the end-of-turn token or was cut at max_new_tokens."""
    processor, model = reference
    kwargs = {"max_new_tokens": 3, "do_sample": False}
    if ends_with_eos:
        kwargs["forced_eos_token_id"] = processor.tokenizer.eos_token_id
    session = ChatSession(model, processor, [Image.open(image_path)], kwargs)
    session.ask(PROMPT)
    first_prompt_tokens, first_end = session.prompt_tokens, session.input_ids.shape[1]
    session.ask("And the colour?")
    answer_ids = session.input_ids[0, first_prompt_tokens:first_end]
    assert (answer_ids[-1] == processor.tokenizer.eos_token_id) == ends_with_eos
    if ends_with_eos:  # the template writes the end of the answer itself
        answer_ids = answer_ids[:-1]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": processor.decode(answer_ids)}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_tokens = int((session.input_ids == processor.image_token_id).sum())
    assert image_tokens > 0
    expected = rendered.replace("<image>", "<image>" * image_tokens)
    assert processor.decode(session.input_ids[0, : session.prompt_tokens]) == expected


def test_chat_reset_and_image_commands(checkpoint, reference, image_path, other_image_path, monkeypatch, capsys):
    sessions = Sessions(monkeypatch)
    lines = [PROMPT, "/reset", PROMPT, f"/image {other_image_path}", PROMPT, "/exit", "never asked"]
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, lines)
    assert sessions.vision_calls == 2  # /reset reuses the cached image prefix; /image encodes the new image
    first = expected_answer(reference, [image_path], PROMPT, 6)
    other = expected_answer(reference, [other_image_path], PROMPT, 6)
    assert first != other
    assert captured.out == f"{first}\n{first}\n{other}\n"
    assert "New conversation about the same image." in captured.err
    assert f"New conversation about {other_image_path}." in captured.err


def test_chat_bad_image_command_keeps_the_conversation(checkpoint, image_path, tmp_path, monkeypatch, capsys):
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, [f"/image {tmp_path / 'missing.png'}", "/nonsense"])
    assert "image not found" in captured.err and "Unknown command '/nonsense'" in captured.err
    assert captured.out == ""


def test_chat_prompts_only_when_a_person_types(checkpoint, image_path, monkeypatch, capsys):
    captured = run_chat(monkeypatch, capsys, checkpoint, image_path, [PROMPT], stdin_class=TTYInput)
    assert captured.err.count("> ") == 2 and "/reset" in captured.err  # the question, then the end of input
    assert "> " not in captured.out


def test_chat_subprocess_with_piped_questions(checkpoint, image_path, monkeypatch, capsys):
    questions = [PROMPT, "What colour is the square?"]
    in_process = run_chat(monkeypatch, capsys, checkpoint, image_path, questions).out
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm_hf.cli", "chat", *model_args(checkpoint), "--image", str(image_path),
         "--max-new-tokens", "6"],
        input=("\n".join(questions) + "\n").encode(), check=False, capture_output=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip: bytes, as written (no newline translation)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == in_process.encode() and len(in_process.strip()) > 0


def test_a_chat_past_the_context_ends_the_turn_with_one_line_and_goes_on_after_reset(
    checkpoint, reference, image_path, tmp_path, monkeypatch, capsys
):
    processor, _ = reference
    short = tmp_path / "short-context"
    shutil.copytree(checkpoint, short)
    config = json.loads((short / "config.json").read_text())
    limit = reference_inputs(processor, [image_path], PROMPT)["input_ids"].shape[1] + 40  # room for a few turns
    config["text_config"]["max_position_embeddings"] = limit
    (short / "config.json").write_text(json.dumps(config))
    held = []  # after each turn: tokens of the conversation, tokens in its cache, messages
    ask = ChatSession.ask

    def recording_ask(session, *args, **kwargs):
        try:
            return ask(session, *args, **kwargs)
        finally:
            if session.input_ids is not None:
                held.append((session.input_ids.shape[1], session.cache.get_seq_length(), len(session.messages)))

    monkeypatch.setattr(ChatSession, "ask", recording_ask)
    questions = [PROMPT, *["What colour is the square?"] * 48]
    captured = run_chat(monkeypatch, capsys, short, image_path, [*questions, "/reset", PROMPT])

    lines = captured.err.splitlines()
    full = [index for index, line in enumerate(lines) if "has filled the model's context" in line]
    assert len(full) == 1, captured.err
    assert lines[full[0]] == (f"fastvlm-hf: the conversation has filled the model's context ({limit} tokens), so the "
                              "answer stops here; /reset starts a new conversation about the same image")  # fmt: skip
    refused = lines[full[0] + 1 :][: -1]  # then each question that no longer fits, one line each; then /reset's line
    answered = len(questions) - len(refused)
    assert 1 < answered < len(questions) - 10  # the context filled after a few turns, and the chat went on asking
    assert all(re.fullmatch(r"fastvlm-hf: error: the prompt is \d+ tokens but the model's context holds "
                            rf"{limit} .*; /reset starts a new conversation", line) for line in refused), refused  # fmt: skip
    assert lines[-1] == "New conversation about the same image." and "Traceback" not in captured.err
    answers = captured.out.splitlines()
    assert len(answers) == answered + 1 and answers[-1] == expected_answer(reference, [image_path], PROMPT, 6)
    assert all(tokens <= limit and cached <= limit for tokens, cached, _ in held)  # memory bounded by the context
    assert len({messages for _, _, messages in held[answered - 1 : -1]}) == 1  # refused turns keep nothing

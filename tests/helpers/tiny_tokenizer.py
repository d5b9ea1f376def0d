"""A tiny byte-level BPE tokenizer trained in-process: the tests download no tokenizer."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

_TRAINING_TEXT = [
    "You are a helpful assistant.",
    "Describe the image.",
    "What is in this picture? A cat sits on a red sofa next to a window.",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant",
    "There are two dogs playing in the park with a yellow ball.",
    "Count the objects. How many apples are on the table?",
    "Hello world! 0123456789 , . ; : ? ! ' \" ( ) [ ] { } - _ / \\ \n",
]


def build_tiny_tokenizer(vocab_size: int = 320, special_tokens: list[str] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_TRAINING_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )

"""A byte-level tokenizer of any vocabulary size, for models that come without one: random-weight
benchmark models (a config.json such as Llama-3.1-8B's, load_format="dummy") still take text prompts,
chat and the server.

Ids 0, 1, 2 are the special tokens (BOS, EOS, padding); byte b is id 3 + b, so any text round-trips
(UTF-8 bytes in, the same bytes out); every id above 258 decodes to a placeholder of its own, "<|id|>",
which encoding never produces. BOS starts an encoded text, as Llama's tokenizers do.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
MIN_VOCAB_SIZE = FIRST_BYTE_ID + 256

# One turn a message, ended by EOS (which a chat model learns to emit), then the assistant's cue.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_symbols() -> list[str]:
    """The character byte-level BPE (GPT-2's scheme, what the ByteLevel pre-tokenizer and decoder use)
    writes for each byte: printable bytes stand for themselves, the others get U+0100, U+0101, ... in
    byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    symbols, num_remapped = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + num_remapped))
            num_remapped += 1
    return symbols


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The tokenizer of the module docstring, with exactly vocab_size ids."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small for the synthetic byte-level tokenizer: it "
                         f"needs {MIN_VOCAB_SIZE} ids ({len(SPECIAL_TOKENS)} special tokens and 256 bytes)")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update((symbol, FIRST_BYTE_ID + byte) for byte, symbol in enumerate(byte_symbols()))
    vocab.update((f"<|{i}|>", i) for i in range(MIN_VOCAB_SIZE, vocab_size))
    # No merges: a text is its bytes. The placeholders are whole entries that no merge can build.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE)

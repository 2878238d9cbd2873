"""A tiny byte-level BPE tokenizer with Qwen2-VL's special tokens and chat template, trained offline.

The tiny default model cannot use Qwen's 151k vocabulary (its embedding table would dwarf the
model), and no vocabulary can be downloaded here, so this trains one on the synthetic texts:
- pre-tokenization as Qwen2's (its split pattern, then byte-level), so digits are single tokens,
  which keeps arithmetic learnable;
- Qwen2-VL's ChatML special tokens at ids 0..7 (`SPECIAL_TOKENS` order);
- a Jinja chat template that renders exactly as Qwen2-VL-Instruct's (default system prompt,
  `<|vision_start|><|image_pad|><|vision_end|>` per image, optional 'Picture k: ' prefixes).
The result is saved in Hugging Face format and loads with `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN, "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, spaces.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + counts.image|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + counts.video|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Text the chat template itself always emits, so the scaffold compresses to few tokens.
SCAFFOLD_TEXTS = (f"system\n{DEFAULT_SYSTEM_PROMPT}", "user\n", "assistant\n")


def _bpe_model(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024,
                    min_frequency: int = 2, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `texts`, saves it to `out_dir` in HF format and returns it.

    Args:
      texts: training strings (e.g. `generator.corpus_texts(items)` plus the task prompts).
      out_dir: directory for `tokenizer.json`, `tokenizer_config.json` (with the chat template).
      vocab_size: total vocabulary including the 8 special tokens and the 256 byte symbols.
      min_frequency: least count for a pair to be merged.
    """
    floor = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be >= {floor} (8 special tokens + 256 bytes), got {vocab_size}")
    texts = [*texts, *SCAFFOLD_TEXTS]
    if not any(t.strip() for t in texts[: -len(SCAFFOLD_TEXTS)]):
        raise ValueError("build_tokenizer needs at least one non-empty training text")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_model(texts, vocab_size, min_frequency),
        eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None, bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE, model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """{token: id} for the ChatML and vision special tokens."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}

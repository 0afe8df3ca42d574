"""A stand-in for the Qwen tokenizer (the real files cannot be downloaded here): the real class (`Qwen2Tokenizer`),
a byte-level BPE trained in a second on a few sentences, and Qwen's special tokens. With `qwen_ids` the special
tokens get the ids of the real Qwen2.5/Qwen3 vocabulary (<|endoftext|> 151643 … </think> 151668; the ids in
between are filled with unused names), so the public model configs (Qwen3-VL's image_token_id 151655, …) stay
as published; without it they follow the small vocabulary (for the tiny models' 512-entry embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2.5 / Qwen3 special tokens at their ids in the published vocabulary.
QWEN_SPECIAL = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}
# Qwen3's chat template in miniature: one user turn; thinking disabled appends an empty think block.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CORPUS = [
    "a photo of a red cat on a mat",
    "a blue dog in the park",
    "a photo of ohwx teapot on a wooden table",
    "make the main subject background and overall composition consistent with the reference image",
    "a watercolor painting of ohwx",
    "user assistant system",
]
NOTE = (
    "STAND-IN TOKENIZER: not Qwen's vocabulary. A byte-level BPE of a few hundred tokens trained on a few sentences, "
    "wrapped in the real class (Qwen2Tokenizer) with Qwen's special tokens{ids} and a miniature of the chat template; "
    "written by benchmarks/cpu_full_size.py because the real tokenizer files cannot be downloaded here.\n"
)


def build_tokenizer(path: Path, qwen_ids: bool):
    """Write the stand-in tokenizer to `path` (tokenizer.json, tokenizer_config.json, chat template, a note)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if qwen_ids:
        first = min(QWEN_SPECIAL.values())
        vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), first)})  # never produced: no merge makes them
        vocab.update(QWEN_SPECIAL)
    else:
        vocab.update({name: len(vocab) + i for i, name in enumerate(QWEN_SPECIAL)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN_SPECIAL))
    qt = Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qt.chat_template = CHAT_TEMPLATE
    for name, idx in QWEN_SPECIAL.items():  # the ids the model configs name must be these tokens
        got = qt.convert_tokens_to_ids(name)
        if qwen_ids and got != idx:
            raise RuntimeError(f"stand-in tokenizer: {name} got id {got}, Qwen's is {idx}")
    path.mkdir(parents=True, exist_ok=True)
    qt.save_pretrained(path)
    (path / "STAND-IN.txt").write_text(NOTE.format(ids=" at their published ids" if qwen_ids else ""))
    return qt

"""Tiny tokenizers and models made locally, for the demo, the tests and the benchmarks.

Nothing is downloaded: tokenizers are trained with ``tokenizers`` on a small built-in
corpus, models are random-initialised transformers models. Two tokenizer styles cover
what real chat models use: byte-level BPE with 'Ġ' (GPT-2/Qwen) and SentencePiece-like
'▁' BPE with ``<0xNN>`` byte fallback (Llama/Mistral).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Model merging combines the weights of several fine-tuned models.",
    "TIES, DARE and SCE are merge methods; SLERP interpolates two models.",
    "def add(a, b):\n    return a + b\n",
    "Bonjour le monde! Hallo Welt! 1234567890 ÄÖÜ ß é 😀",
    "User: What is 2+2?\nAssistant: 4.",
    "Knowledge fusion distils several chat models into one compact pivot model.",
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

TokenizerKind = Literal["bytelevel", "metaspace"]
Digits = Literal["learned", "single", "triples"]
"""How numbers split: as BPE learned them, one token per digit (Llama-2, Mistral), or in
groups of up to three digits (Llama-3, GPT-4's ``\\p{N}{1,3}``)."""
NUMERALS: tuple[str, ...] = tuple(
    f"In {1990 + i % 40} we counted {13 * i + 5} items at {i % 10}.{(37 * i) % 100:02d} each: {(13 * i + 5) * 3}."
    for i in range(120)
)


def _with_digits(space_step, digits: Digits, *, first: bool):
    """``space_step`` alone, or in sequence with a step that splits numbers as ``digits``
    says (``first``: the space step runs first)."""
    from tokenizers import Regex, pre_tokenizers

    if digits == "learned":
        return space_step
    split = (pre_tokenizers.Digits(individual_digits=True) if digits == "single"
             else pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"))
    return pre_tokenizers.Sequence([space_step, split] if first else [split, space_step])


def _training_text(digits: Digits) -> list[str]:
    return list(CORPUS) * 20 + (list(NUMERALS) if digits != "learned" else [])
Architecture = Literal["llama", "mistral", "qwen2"]


def byte_level_tokenizer(vocab_size: int = 400, digits: Digits = "learned"):
    """GPT-2/Qwen style: ByteLevel pre-tokenizer, 'Ġ' marks a leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _with_digits(pre_tokenizers.ByteLevel(add_prefix_space=False), digits, first=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(digits), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def metaspace_tokenizer(vocab_size: int = 400, digits: Digits = "learned"):
    """Llama/Mistral style: Metaspace '▁', ``<0xNN>`` byte fallback, ``<s> </s> <unk>``.

    The 256 byte pieces are ordinary vocabulary (not special tokens), or decoding with
    ``skip_special_tokens`` would drop non-ASCII text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    split = _with_digits(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), digits, first=True)
    learner.pre_tokenizer = split
    learner.train_from_iterator(
        _training_text(digits),
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False),
    )
    learned = json.loads(learner.to_str())["model"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = split
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        chat_template=LLAMA_TEMPLATE,
    )


def make_tokenizer(kind: TokenizerKind, vocab_size: int = 400, digits: Digits = "learned"):
    if kind == "bytelevel":
        return byte_level_tokenizer(vocab_size, digits)
    if kind == "metaspace":
        return metaspace_tokenizer(vocab_size, digits)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bytelevel' or 'metaspace'")


def tiny_config(
    arch: Architecture,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
):
    """A small config of a real architecture (head_dim = hidden/heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(classes)}")
    return classes[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )


def make_model(
    path: str | Path,
    arch: Architecture = "llama",
    *,
    tokenizer=None,
    vocab_size: int | None = None,
    seed: int = 0,
    base: str | Path | None = None,
    delta_scale: float = 0.02,
    dtype: str = "float32",
    **config_kwargs,
) -> Path:
    """Save a tiny random model (and its tokenizer) to ``path``.

    With ``base``, the model is that model plus Gaussian noise of std ``delta_scale``
    (a stand-in for a fine-tune of the same pivot), so merges have real deltas. A new
    model's vocabulary is ``vocab_size`` rows, by default one per token of ``tokenizer``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * delta_scale)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base)
    else:
        if tokenizer is None:
            raise ValueError("a new model needs a tokenizer (or a base model to copy it from)")
        config = tiny_config(arch, vocab_size or len(tokenizer), **config_kwargs)
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

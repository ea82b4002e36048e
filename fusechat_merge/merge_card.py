"""What a published merge says about itself: its model card names the models as the recipe
does (`restore_written_refs`), and its config's ``tie_word_embeddings`` matches the weights
it holds (`describe_tied_head`). Run on the staged merge before it is published
(`fusechat_merge.merging`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fusion.artifacts.weights import Weights

_CARD_LIST = "The following models were included in the merge:\n"


def restore_written_refs(model_dir: Path, sources: Mapping[str, Path]) -> None:
    """The model card names the models as the recipe does, not by resolved directory,
    and lists them in a fixed order (mergekit lists a set: the order changed per run)."""
    for name in ("README.md", "mergekit_config.yml"):
        path = model_dir / name
        if not path.is_file():
            continue
        text = original = path.read_text(encoding="utf-8")
        for written, local in sorted(sources.items(), key=lambda kv: -len(str(kv[1]))):
            if str(local.absolute()) != written:
                text = text.replace(str(local.absolute()), written)
        if name == "README.md":
            text = _sorted_card_list(text)
        if text != original:
            path.write_text(text, encoding="utf-8")


def _sorted_card_list(text: str) -> str:
    start = text.find(_CARD_LIST)
    if start < 0:
        return text
    start += len(_CARD_LIST)
    lines = text[start:].split("\n")
    count = next((i for i, line in enumerate(lines) if not line.startswith("* ")), len(lines))
    return text[:start] + "\n".join(sorted(lines[:count]) + lines[count:])


def describe_tied_head(model_dir: Path, trust_remote_code: bool = False) -> None:
    """Make ``config.json``'s ``tie_word_embeddings`` say what the merged weights hold.

    mergekit copies the base model's config: a tied base merged with untied targets says
    ``true`` beside a separate output head, which a loader that ties then drops (and the
    reverse leaves a missing head to random initialisation)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = model_dir / "config.json"
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if not hasattr(config, "tie_word_embeddings"):
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    names = [f"{n}.weight" for n, module in model.named_modules(remove_duplicate=False) if module is head]
    if head is None or not names:
        return
    with Weights(model_dir) as weights:
        has_head = any(name in weights for name in names)
    if bool(config.tie_word_embeddings) == has_head:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        raw["tie_word_embeddings"] = not has_head
        config_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")

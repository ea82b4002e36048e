"""Whether a saved tokenizer carries a chat template, read from its files (nothing loaded).

A recipe whose model renders with its own template (``template: own``) is checked with it
before any stage runs, and lm-eval's ``apply_chat_template`` before a model is evaluated;
the rendering itself is `fusion.data.conversations.render`.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # where transformers 5 saves one


def has_chat_template(model: Path) -> bool:
    """Whether the tokenizer saved in ``model`` carries a chat template (read, not loaded)."""
    if any((model / name).is_file() for name in TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False

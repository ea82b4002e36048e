"""Shared fixtures: tokenizers trained here and tiny random models, nothing downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    from fusechat_merge.demo.toy import make_tokenizer

    return make_tokenizer("metaspace")


@pytest.fixture(scope="session")
def bytelevel_tokenizer():
    from fusechat_merge.demo.toy import make_tokenizer

    return make_tokenizer("bytelevel")


@pytest.fixture(scope="session")
def numeral_tokenizers():
    """(one token per digit, '▁' style; up to three digits per token, byte-level, as Llama-3)."""
    from fusechat_merge.demo.toy import make_tokenizer

    return make_tokenizer("metaspace", 600, digits="single"), make_tokenizer("bytelevel", 600, digits="triples")


@pytest.fixture(scope="session")
def model_family(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer):
    """A pivot and three fine-tune-like targets per architecture: {arch: [base, t1, t2, t3]}."""
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("models")
    family: dict[str, list[Path]] = {}
    tokenizers = {"llama": metaspace_tokenizer, "mistral": metaspace_tokenizer, "qwen2": bytelevel_tokenizer}
    for arch, tokenizer in tokenizers.items():
        base = make_model(root / arch / "base", arch, tokenizer=tokenizer, seed=0)
        targets = [
            make_model(root / arch / f"t{i}", base=base, seed=i, delta_scale=0.01 * i) for i in (1, 2, 3)
        ]
        family[arch] = [base, *targets]
    return family

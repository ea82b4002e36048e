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


@pytest.fixture(scope="module")
def world(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer):
    """A pivot, a source of another tokenizer, their stores and the aligned store, made
    through the CLI (the users' tests: test_faults_users*.py)."""
    from corpus import conversations, write_jsonl

    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("users")
    data = write_jsonl(root / "chats.jsonl", conversations(8))
    pivot = make_model(root / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    source = make_model(root / "source", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    stores = {}
    for name, model in (("pivot", pivot), ("source", source)):
        stores[name] = root / f"s-{name}"
        _ok(_cli("logits", "--model", model, "--data", data, "--out", stores[name], "--top-k", "4",
               "--cache-dir", root / "cache"))
    aligned = root / "aligned"
    _ok(_cli("align", "--pivot", stores["pivot"], "--source", stores["source"], "--out", aligned))
    return {"root": root, "data": data, "pivot": pivot, "source": source, "stores": stores, "aligned": aligned}


def _cli(*args):
    from click.testing import CliRunner

    from fusechat_merge.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, print(result.output) or result.exception
    return result


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder nothing may be written into (root writes through a mode, not into /sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif Path("/sys").is_dir():
        yield Path("/sys")
    else:
        pytest.skip("no folder root cannot write into")

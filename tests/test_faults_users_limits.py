"""Out of memory and resource limits are the user's, not tracebacks (issue 29.3): through
the CLI in a subprocess under a real limit (``RLIMIT_AS``: the address space, ``RLIMIT_FSIZE``:
the file size), on tiny models. Each ends in exit 1 naming the stage, what ran out, what is
kept and the option that needs less, with no traceback and nothing half-written."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import BIN, stray_files, tree_hash, write_recipe

from fusechat_merge.cli import main

BIG_VOCAB = 400_000  # a Qwen-sized vocabulary on a 16-wide model: logits dominate the memory
MARGIN_MB = 600  # address space allowed beyond what the imports mapped

# The CLI's main under an address-space limit set once the libraries are imported (their
# mappings vary by machine; the work's own memory is what the limit measures).
LIMITED = """
import resource, sys
import datasets, pyarrow, safetensors, tokenizers, torch, transformers  # noqa: F401
from transformers import LlamaForCausalLM, Trainer  # noqa: F401
import fusion.capture.logit_job, fusion.train.trainer  # noqa: F401
if sys.argv[2] == "eval":
    import lm_eval.models.huggingface  # noqa: F401
from fusechat_merge.cli import main
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
limit = vm + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["fusechat-merge", *sys.argv[2:]]
main()
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmSize from /proc")


def environment() -> dict[str, str]:
    root = str(Path(__file__).parents[1])
    return dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def with_memory_limit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, str(MARGIN_MB), *map(str, args)], env=environment(),
                          capture_output=True, text=True, timeout=600)


def with_file_size_limit(*args, limit: int = 64 * 1024) -> subprocess.CompletedProcess:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([str(BIN / "fusechat-merge"), *map(str, args)], env=environment(), capture_output=True,
                          text=True, timeout=600, preexec_fn=apply)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, print(result.output) or result.exception
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer):
    """A pivot with a large vocabulary (same tokenizer as `small`), 30 conversations, and an
    aligned store made with the small pivot (the stores hold ids of the tokenizer alone)."""
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("limits")
    data = write_jsonl(root / "chats.jsonl", conversations(30))
    big = make_model(root / "big", "llama", tokenizer=metaspace_tokenizer, seed=1, vocab_size=BIG_VOCAB,
                     hidden_size=16, heads=2, kv_heads=1)
    small = make_model(root / "small", "llama", tokenizer=metaspace_tokenizer, seed=1)
    source = make_model(root / "source", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    for name, model in (("small", small), ("source", source)):
        cli("logits", "--model", model, "--data", data, "--out", root / f"s-{name}", "--top-k", "4",
            "--cache-dir", root / "cache")
    cli("align", "--pivot", root / "s-small", "--source", root / "s-source", "--out", root / "aligned")
    return {"root": root, "data": data, "big": big, "stores": [root / "s-small", root / "s-source"],
            "aligned": root / "aligned"}


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def test_out_of_memory_in_logits_names_what_ran_out_and_the_options(world, tmp_path):
    """Before: a raw MemoryError / DefaultCPUAllocator traceback. Now the message names the
    work, the memory, what is kept and the options; the lower setting it names then fits."""
    before = tree_hash(world["root"])
    out = tmp_path / "store"
    args = ["logits", "--model", world["big"], "--data", world["data"], "--out", out, "--top-k", "4",
            "--cache-dir", tmp_path / "cache"]
    refused(with_memory_limit(*args), "out of memory (RAM) while scoring", str(world["big"]),
            "can't allocate memory", "nothing of it was kept", "batch_tokens (now 16384)", "max_length (now 2048)")
    assert not out.exists() and stray_files(tmp_path) == []
    proc = with_memory_limit(*args, "--batch-tokens", "64")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").is_file() and tree_hash(world["root"]) == before


def test_out_of_memory_in_fuse_names_the_batch_size_and_offload(world, tmp_path):
    """Before: the DefaultCPUAllocator RuntimeError as a traceback (only CUDA's was handled)."""
    before = tree_hash(world["root"])
    out = tmp_path / "target"
    refused(with_memory_limit("fuse", "--pivot", world["big"], "--aligned", world["aligned"], "--out", out,
                              "--per-device-train-batch-size", "16", "--max-steps", "2", "--disable-tqdm", "true"),
            f"out of memory (RAM) while training {out}", "no checkpoint was complete",
            "per_device_train_batch_size (now 16", "gradient_accumulation_steps", "gradient_checkpointing",
            "offload")
    assert not (out / "config.json").exists() and stray_files(tmp_path) == []
    assert tree_hash(world["root"]) == before


def test_a_file_size_limit_in_align_names_the_aligned_store(world, tmp_path):
    """Before: a raw OSError [Errno 27] File too large traceback."""
    before = tree_hash(world["root"])
    out = tmp_path / "aligned"
    proc = with_file_size_limit("align", "--pivot", world["stores"][0], "--source", world["stores"][1],
                                "--out", out, limit=16 * 1024)
    refused(proc, f"cannot write the aligned store {out}", os.strerror(errno.EFBIG))
    assert stray_files(tmp_path) == [] and tree_hash(world["root"]) == before


def test_a_datasets_cache_that_cannot_be_written_is_not_blamed_on_the_corpus(world, tmp_path):
    """Before, a whole run said "chats.jsonl: cannot read the rows" when the `datasets`
    cache (WORK/.cache) hit the file size limit."""
    data = write_jsonl(tmp_path / "big.jsonl", conversations(2000))  # its datasets cache: over 64 KiB
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "fsize", "seeds": [0], "pivot": {"name": "pivot", "model": str(world["big"])},
        "sources": [{"name": "src", "model": str(world["big"])}], "data": {"train": str(data)},
        "logits": {"top_k": 4}, "fuse": {"defaults": {"max_steps": 1}}})
    proc = with_file_size_limit("run", recipe, "--work-dir", tmp_path / "work")
    refused(proc, "stage logits/", "cannot write the datasets cache", os.strerror(errno.EFBIG),
            f"while reading {data}", "the corpus is not at fault")
    assert "cannot read the rows" not in proc.stderr


def test_out_of_memory_in_lm_eval_names_its_batch_size(world, tmp_path):
    """Before: lm-eval's DefaultCPUAllocator RuntimeError as a traceback."""
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    tasks = tmp_path / "tasks"
    write_skill_tasks({"chat": world["data"]}, tasks, cache_dir=tmp_path / "cache")
    out = tmp_path / "scores.json"
    refused(with_memory_limit("eval", "--model", world["big"], "--tasks", "fusechat_skills", "--include-path", tasks,
                              "--batch-size", "32", "--bootstrap-iters", "0", "--out", out),
            f"out of memory (RAM) while scoring {world['big']} with lm-eval", "no result was written",
            "batch_size (now 32)", "max_length")
    assert not out.exists()

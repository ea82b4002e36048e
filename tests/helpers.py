"""Helpers for end-to-end merge tests (real models, real mergekit)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from fusechat_merge.sce import sce_merge

BIN = Path(sys.executable).parent


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def sce_recipe(models: list[Path], **parameters) -> dict:
    base = models[0]
    return {
        "merge_method": "fusechat_sce",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": parameters or {"select_topk": 0.3},
        "dtype": "float32",
    }


def run(args: list[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def assert_loads_and_runs(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("Model merging combines weights.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


def expected_merge(models: list[Path], **params) -> dict[str, torch.Tensor]:
    """Oracle: our pure function applied tensor by tensor to the saved weights."""
    base, *targets = (load_weights(m) for m in models)
    return {name: sce_merge(t, [w[name] for w in targets], **params) for name, t in base.items()}


def lay_out_in_hub_cache(hf_home: Path, repo_id: str, model: Path, revision: str = "0" * 39 + "1") -> Path:
    """Put ``model``'s files where the Hugging Face cache keeps ``repo_id`` (offline tests of hub ids)."""
    import shutil

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → sha256 of its bytes): what a refused
    command must leave exactly as it was."""
    import hashlib

    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def perturb_weights(model_dir: Path, delta: float = 0.01) -> None:
    """Rewrite the model's weights in place (same path, same size): a changed model."""
    from safetensors.torch import save_file

    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        weights = load_file(shard)
        name = sorted(weights)[0]
        weights[name] = weights[name] + delta
        save_file(weights, shard, metadata={"format": "pt"})


def stray_files(root: Path) -> list[str]:
    """Temporary or partial files and folders a killed writer could leave under ``root``."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob(".*")
                  if ".tmp-" in p.name or ".partial" in p.name or ".old-" in p.name)


def refused(result, *words: str) -> None:
    """A CliRunner result that failed cleanly (exit 1, no traceback) saying ``words``."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)


def killed_once(args: list[str], ready: Callable[[], Any], timeout: float = 180) -> Any:
    """Start the command ``args`` (hub and datasets offline), SIGKILL it as soon as
    ``ready()`` is truthy (or it ended, or ``timeout`` passed); returns ``ready()``'s last
    value, which the caller asserts (falsy: the command ended before the cut)."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    found = ready()
    while not found and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
        found = ready()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return found


def kill_once_a_shard_is_written(args: list[str], out: Path, timeout: float = 180) -> list[Path]:
    """Start the merge command ``args`` (which writes ``out``), SIGKILL it as soon as its
    hidden partial directory holds a safetensors shard; returns those partial directories."""
    partial = killed_once(args, lambda: [p for p in out.parent.glob(f".{out.name}.partial-*")
                                         if any(p.rglob("*.safetensors"))], timeout)
    assert partial, "the merge finished before any shard was written; make the models bigger"
    return partial


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    """A real PNG file of some content (not an empty canvas)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes


def assert_same_store(a, b, atol: float = 0.0) -> None:
    """Two logit stores hold the same sequences in the same order, every column equal:
    floating-point ones to ``atol`` (0: bit for bit), float16 ones also to one float16
    step (a float32 difference of one ulp can round to the neighbouring float16)."""
    import dataclasses

    import numpy as np

    assert a.ids() == b.ids()
    for x, y in zip(a, b, strict=True):
        for f in dataclasses.fields(x):
            u, v = getattr(x, f.name), getattr(y, f.name)
            if isinstance(u, np.ndarray) and u.dtype.kind == "f":
                step = 2.0**-10 if u.dtype == np.float16 and atol else 0.0
                np.testing.assert_allclose(u.astype(np.float32), v.astype(np.float32), rtol=step, atol=atol,
                                           err_msg=f"{x.id}: {f.name}")
            elif isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and np.array_equal(u, v), (x.id, f.name)
            elif isinstance(u, float):
                assert abs(u - v) <= atol or (u != u and v != v), (x.id, f.name, u, v)
            else:
                assert u == v, (x.id, f.name)


def pivot_and_qwen(root: Path, metaspace_tokenizer, bytelevel_tokenizer, rows: int) -> Path:
    """``root/models/{pivot,qwen}`` (a '▁' Llama and a byte-level Qwen2, tiny, random) and
    ``root/data/train.jsonl`` of ``rows`` conversations: a whole run's inputs."""
    from corpus import conversations, write_jsonl

    from fusechat_merge.demo.toy import make_model

    make_model(root / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(root / "models" / "qwen", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", conversations(rows))
    return root


# What runs that differ in thread count, batch shape or process count promise each other
# (float reductions run in another order): every integer, string and id equal, every float
# within float32 rounding. Runs that pin all three are compared bit for bit instead.
FLOAT_RTOL = 1e-5
FLOAT_ATOL = 1e-6


def assert_close_values(a, b, where: str = "", rtol: float = FLOAT_RTOL, atol: float = FLOAT_ATOL) -> None:
    """``a`` and ``b`` (nested dicts and lists of plain values) equal but for their floats,
    which are within ``rtol``/``atol`` (NaN equals NaN)."""
    import math

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for key in a:
            assert_close_values(a[key], b[key], f"{where}.{key}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (where, len(a), b if not isinstance(b, list) else len(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_values(x, y, f"{where}[{i}]", rtol, atol)
    elif isinstance(a, float) and isinstance(b, (float, int)):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol), (where, a, b)
    else:
        assert a == b, (where, a, b)


def store_columns(path: Path) -> dict:
    """Every column of every stored sequence of a logit or aligned store, in store order."""
    from fusion.artifacts.logit_store import LogitStore

    return LogitStore(path).dataset.with_format(None).to_dict()


def store_json(path: Path) -> str:
    """`store_columns` as JSON (NaN equals NaN): for bit-for-bit comparisons of runs that
    pin threads, batch shapes and process count."""
    import json

    return json.dumps(store_columns(path), sort_keys=True)


def assert_same_columns(a: Path, b: Path) -> None:
    """Two stores hold the same sequences, tokens, offsets and top-K ids; their floats
    agree to float32 rounding (runs with other threads, batch shapes or processes)."""
    assert_close_values(store_columns(a), store_columns(b), str(a))


def assert_close_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    """Two model directories' tensors by name, within ``atol``: targets trained from stores
    whose floats differ in the last bit (Adam's normalised step turns a rounding-level
    difference in a near-zero gradient into up to lr-sized updates; 2e-5 holds a few steps)."""
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=atol), (name, (wa[name] - wb[name]).abs().max().item())

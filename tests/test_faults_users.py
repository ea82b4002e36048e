"""What users bring, second round (issue 19): paths and files as they come, hub ids resolved
one way, errors that name the real cause. One test per class, through the CLI, on the tiny
models: the expected result, or exit 1 naming the file/key/row at fault with no traceback,
every input and earlier result left byte-identical."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import (
    BIN,
    lay_out_in_hub_cache,
    load_weights,
    refused,
    sce_recipe,
    stray_files,
    tree_hash,
    write_recipe,
)

from fusechat_merge.cli import main

TRAIN = ["--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--seed", "0",
         "--disable-tqdm", "true", "--max-steps", "1"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, print(result.output) or result.exception
    return result


def shell(*args, env: dict[str, str], cwd: Path | None = None, timeout: float = 300):
    """The installed command in a fresh process (the hub's settings are read at import)."""
    return subprocess.run([str(BIN / "fusechat-merge"), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# --- 19.5: hub ids, resolved one way everywhere ------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_ids_from_the_cache_at_once_and_unreachable_hub_fails_fast(world, tmp_path):
    """HF_HUB_OFFLINE unset, the hub unreachable (HF_ENDPOINT on a closed port): a cached id
    is read from the cache by logits, fuse --pivot, merge and eval; an id that is not cached
    is refused in seconds, naming the id and the unreachable hub. Before, logits and fuse
    handed the id to transformers, which retried each optional file for minutes."""
    hf_home = tmp_path / "hf"
    lay_out_in_hub_cache(hf_home, "toy-org/pivot", world["pivot"], "c" * 40)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])))
    before = tree_hash(world["root"])
    store = tmp_path / "store"
    proc = shell("logits", "--model", "toy-org/pivot", "--data", world["data"], "--out", store, "--top-k", "4",
                 "--cache-dir", world["root"] / "cache", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shards = sorted(p.name for p in store.glob("shard-*.arrow"))
    assert shards and all((store / s).read_bytes() == (world["stores"]["pivot"] / s).read_bytes() for s in shards)
    proc = shell("fuse", "--pivot", "toy-org/pivot", "--aligned", world["aligned"], "--out", tmp_path / "target",
                 *TRAIN, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "target" / "config.json").is_file()

    recipe = write_recipe(tmp_path / "r.yaml", sce_recipe([world["pivot"], world["pivot"]]))
    recipe.write_text(recipe.read_text().replace(f"- model: {world['pivot']}", "- model: toy-org/absent", 1))
    for args in (["merge", recipe, tmp_path / "merged"],
                 ["logits", "--model", "toy-org/absent", "--data", world["data"], "--out", tmp_path / "x"],
                 ["fuse", "--pivot", "toy-org/absent", "--aligned", world["aligned"], "--out", tmp_path / "y",
                  *TRAIN],
                 ["eval", "--model", "toy-org/absent", "--tasks", "t", "--out", tmp_path / "e.json"]):
        proc = shell(*args, env=env, timeout=60)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        for words in ("toy-org/absent", "not in the Hugging Face cache", "cannot be reached"):
            assert words in proc.stderr, (words, proc.stderr)
    assert not any((tmp_path / name).exists() for name in ("x", "y", "merged"))
    assert tree_hash(world["root"]) == before


# --- 19.2: paths with spaces, unicode and shell characters --------------------------------

ODD = "my models ünï $HOME;'q\"&(x)"


def test_odd_paths_merge_like_plain_ones(tmp_path, model_family):
    """mergekit's serializer hands back a path with a space or a quote as an object, which
    the recipe hash and a recipe without source text dumped into "Circular reference"."""
    plain, odd = tmp_path / "plain", tmp_path / ODD
    for root in (plain, odd):
        for name, src in zip(("base", "t1", "t2"), model_family["llama"][:3], strict=True):
            shutil.copytree(src, root / name)
        write_recipe(root / "r.yaml", sce_recipe([root / "base", root / "t1", root / "t2"], select_topk=0.5))
        ok(cli("merge", root / "r.yaml", root / "merged ü", "--quiet"))
    a, b = load_weights(plain / "merged ü"), load_weights(odd / "merged ü")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert str(odd / "t1") in (odd / "merged ü" / "README.md").read_text(encoding="utf-8")


def test_odd_work_dir_runs_the_whole_pipeline(tmp_path, metaspace_tokenizer, bytelevel_tokenizer):
    """A work dir with a space, unicode and shell characters: every stage, through `run`."""
    from fusechat_merge.demo.toy import make_model

    work = tmp_path / ODD
    make_model(work / "models" / "piv ot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(work / "models" / "qw én", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    (work / "da ta").mkdir()
    write_jsonl(work / "da ta" / "train ü.jsonl", conversations(8))
    write_jsonl(work / "da ta" / "held.jsonl", conversations(3))
    recipe = {
        "name": "odd", "seeds": [0],
        "pivot": {"name": "pivot", "model": "models/piv ot"},
        "sources": [{"name": "qwen", "model": "models/qw én"}],
        "data": {"train": "da ta/train ü.jsonl"},
        "logits": {"top_k": 4, "max_length": 96, "batch_size": 8},
        "fuse": {"defaults": {"max_steps": 1, "per_device_train_batch_size": 4}},
        "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}],
        "evaluate": {"skills": {"chat": "da ta/held.jsonl"}, "max_length": 96},
    }
    write_recipe(work / "recipe ü.yaml", recipe)
    ok(cli("run", work / "recipe ü.yaml", "--work-dir", work))
    assert any((work / "merges").rglob("*.safetensors"))


# --- 19.3 / 19.7: data files as they come -------------------------------------------------


def test_raw_line_separators_inside_json_strings_are_one_row(world, tmp_path):
    """U+2028 and U+0085 are valid raw inside a JSON string; before, the file check split
    lines there and refused the file ("invalid JSON ... at column 59")."""
    rows = conversations(4)
    rows[1]["conversations"][1]["value"] = "one\u2028two\u0085three\u2029four"
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    assert "\u2028" in data.read_text(encoding="utf-8")
    store = tmp_path / "store"
    ok(cli("logits", "--model", world["pivot"], "--data", data, "--out", store, "--top-k", "4",
           "--cache-dir", tmp_path / "cache"))
    assert json.loads((store / "manifest.json").read_text())["sequences"] == 4


@pytest.mark.parametrize("kind", ["rows", "files"])
def test_a_data_folder_mixing_two_formats_names_the_files(world, tmp_path, kind):
    folder = tmp_path / "data"
    write_jsonl(folder.mkdir() or folder / "a.jsonl", conversations(3))
    if kind == "rows":  # OpenAI messages next to ShareGPT conversations: a raw datasets traceback before
        messages = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
        write_jsonl(folder / "b.jsonl", messages)
        words = ("a.jsonl: conversations", "b.jsonl: messages")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ["x"]}), folder / "b.parquet")
        words = ("json: a.jsonl", "parquet: b.parquet")
    before = tree_hash(tmp_path)
    refused(cli("logits", "--model", world["pivot"], "--data", folder, "--out", tmp_path / "store",
                "--top-k", "4", "--cache-dir", world["root"] / "cache"), str(folder), *words)
    assert tree_hash(tmp_path) == before


# --- 19.8: a key given twice ---------------------------------------------------------------


def test_a_key_given_twice_is_refused_with_both_lines(world, tmp_path):
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"merge_method: linear\nmodels:\n  - model: {world['pivot']}\n    parameters:\n"
                     f"      weight: 1.0\n      weight: 0.5\ndtype: float32\n", encoding="utf-8")
    refused(cli("merge", merge, tmp_path / "out"), str(merge), "key 'weight' is given twice, on line 5 and on line 6")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("name: a\nseeds: [0]\nname: b\n", encoding="utf-8")
    refused(cli("run", pipeline, "--work-dir", tmp_path / "work"), str(pipeline),
            "key 'name' is given twice, on line 1 and on line 3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


# --- 19.4: pytorch_model.bin models ------------------------------------------------------


def test_bin_models_are_read_like_safetensors(world, tmp_path):
    """The report's relative update (and the merge's checks) read .bin weights too; before,
    a .bin target "shared no tensors" with its pivot."""
    from fusechat_merge.diagnostics import relative_update

    def as_bin(model: Path, out: Path, delta: float) -> dict[str, torch.Tensor]:
        shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
        weights = {k: v + delta for k, v in load_weights(model).items()}
        torch.save(weights, out / "pytorch_model.bin")
        return weights

    pivot = load_weights(world["source"])
    as_bin(world["source"], tmp_path / "bin", 0.0)
    assert relative_update(tmp_path / "bin", world["source"]) == 0.0
    theta = as_bin(world["source"], tmp_path / "bin2", 0.01)
    expected = (sum(float((theta[k].double() - pivot[k].double()).pow(2).sum()) for k in pivot)
                / sum(float(pivot[k].double().pow(2).sum()) for k in pivot)) ** 0.5
    assert relative_update(tmp_path / "bin2", world["source"]) == pytest.approx(expected, rel=1e-9)
    assert relative_update(world["source"], tmp_path / "bin2") > 0


# --- 19.10: the merged config describes the merged weights --------------------------------


def test_tied_base_with_untied_targets_keeps_the_merged_head(tmp_path, metaspace_tokenizer):
    """Before, the merged config said `tie_word_embeddings: true` (the base's) beside a
    separate merged `lm_head`, and transformers replaced that head by the embeddings."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fusechat_merge.demo.toy import make_model

    base = make_model(tmp_path / "base", "llama", tokenizer=metaspace_tokenizer, seed=0, tie_word_embeddings=True)
    targets = [make_model(tmp_path / f"t{i}", "llama", tokenizer=metaspace_tokenizer, seed=i,
                          tie_word_embeddings=False) for i in (1, 2)]
    write_recipe(tmp_path / "r.yaml", sce_recipe([base, *targets], select_topk=0.5))
    ok(cli("merge", tmp_path / "r.yaml", tmp_path / "out", "--quiet"))
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" in written
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.lm_head.weight, written["lm_head.weight"])
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


# --- 19.9: `../` paths resolve one way, before any work -------------------------------------


def test_parent_paths_resolve_before_the_work_dir_exists(world, tmp_path):
    """Before, `../models/pivot` was "missing" until the work dir existed (the kernel
    resolves WORK/.. only when WORK is there), then accepted."""
    shared = tmp_path / "shared"
    shutil.copytree(world["pivot"], shared / "pivot")
    shutil.copytree(world["source"], shared / "source")
    shutil.copy(world["data"], shared / "chats.jsonl")
    recipe = {
        "name": "up", "seeds": [0],
        "pivot": {"name": "pivot", "model": "../shared/pivot"},
        "sources": [{"name": "src", "model": "../shared/source"}],
        "data": {"train": "../shared/chats.jsonl"},
        "logits": {"top_k": 4},
        "fuse": {"defaults": {"max_steps": 1}},
        "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}],
        "evaluate": {"skills": {"chat": "../shared/chats.jsonl"}},
    }
    write_recipe(tmp_path / "recipe.yaml", recipe)
    work = tmp_path / "work"
    fresh = ok(cli("run", tmp_path / "recipe.yaml", "--work-dir", work, "--plan")).output
    assert not work.exists()
    work.mkdir()
    assert ok(cli("run", tmp_path / "recipe.yaml", "--work-dir", work, "--plan")).output == fresh
    recipe["data"]["train"] = "../shared/absent.jsonl"
    write_recipe(tmp_path / "recipe.yaml", recipe)
    work.rmdir()
    refused(cli("run", tmp_path / "recipe.yaml", "--work-dir", work, "--plan"),
            "data.train (line", f"{shared / 'absent.jsonl'} does not exist")


# --- 19.6 / 19.7: outputs that cannot be written --------------------------------------------


def commands(world, family, tmp_path, out: Path) -> dict[str, list]:
    recipe = write_recipe(tmp_path / "r.yaml", sce_recipe(family["llama"][:3]))
    pipeline = write_recipe(tmp_path / "p.yaml", {
        "name": "ro", "seeds": [0], "pivot": {"name": "pivot", "model": str(world["pivot"])},
        "sources": [{"name": "src", "model": str(world["source"])}], "data": {"train": str(world["data"])},
        "logits": {"top_k": 4}, "fuse": {"defaults": {"max_steps": 1}},
        "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}]})
    return {
        "merge": ["merge", recipe, out, "--quiet"],
        "logits": ["logits", "--model", world["pivot"], "--data", world["data"], "--out", out, "--top-k", "4",
                   "--cache-dir", tmp_path / "cache"],
        "fuse": ["fuse", "--pivot", world["pivot"], "--aligned", world["aligned"], "--out", out, *TRAIN],
        "run": ["run", pipeline, "--work-dir", out],
    }


@pytest.mark.parametrize("command", ["merge", "logits", "fuse", "run"])
def test_a_read_only_output_folder_is_named_without_a_traceback(world, model_family, tmp_path, read_only,
                                                               command):
    out = read_only / "fusechat-out"
    before = tree_hash(world["root"])
    result = cli(*commands(world, model_family, tmp_path, out)[command])
    refused(result, str(out))
    # the first write refused may be the output's lock file (EACCES) or a folder in /sys (EPERM)
    assert os.strerror(errno.EACCES) in result.output or os.strerror(errno.EPERM) in result.output, result.output
    assert not out.exists() and tree_hash(world["root"]) == before


@pytest.mark.parametrize("command", ["merge", "logits", "fuse"])
def test_a_full_disk_says_which_output_and_keeps_nothing_half_written(world, model_family, tmp_path, command):
    """The write fails in the kernel (a file size limit: EFBIG, like ENOSPC a failed write).
    Before, the merge blamed "a safetensors file of the recipe's models", logits and fuse
    showed a traceback."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out"
    args = commands(world, model_family, tmp_path, out)[command]
    if command == "logits":  # a store's shards are small: more rows per shard
        args = [*args, "--max-length", "4096"]
        shutil.copy(world["data"], tmp_path / "big.jsonl")
        write_jsonl(tmp_path / "big.jsonl", conversations(400))
        args[args.index(world["data"])] = tmp_path / "big.jsonl"
    before = tree_hash(world["root"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([str(BIN / "fusechat-merge"), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert f"cannot write the {'merged model' if command == 'merge' else 'logit store' if command == 'logits' else 'target model'} {out}" in proc.stderr, proc.stderr
    assert os.strerror(errno.EFBIG) in proc.stderr and "recipe's models" not in proc.stderr
    assert stray_files(tmp_path) == [] and tree_hash(world["root"]) == before
    assert not out.exists() or command != "merge"
    assert not any(out.rglob("*.partial*")) if out.exists() else True


# --- 19.7: a layer_range beyond the model's layers ------------------------------------------


def test_a_layer_range_beyond_the_layers_names_the_key(model_family, tmp_path):
    """Before: mergekit's RuntimeError "Tensor model.layers.2... required but not present" as a traceback."""
    base, t1, _ = model_family["llama"][:3]
    recipe = {"merge_method": "linear", "dtype": "float32", "slices": [{"sources": [
        {"model": str(base), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": str(t1), "layer_range": [0, 8], "parameters": {"weight": 0.5}}]}]}
    write_recipe(tmp_path / "r.yaml", recipe)
    before = tree_hash(base.parent)
    refused(cli("merge", tmp_path / "r.yaml", tmp_path / "out"), "slices[0].sources[1].layer_range: [0, 8]",
            str(t1), "2 layers")
    assert not (tmp_path / "out").exists() and tree_hash(base.parent) == before


# --- 19.11: evaluation max_length, the report's title ----------------------------------------


def test_eval_max_length_below_the_prompts_and_a_renamed_recipe(world, tmp_path):
    """Before: a traceback and "48 malformed rows skipped"; a renamed recipe kept the old title."""
    work = tmp_path / "work"
    recipe = {
        "name": "first", "seeds": [0],
        "pivot": {"name": "pivot", "model": str(world["pivot"])},
        "sources": [{"name": "src", "model": str(world["source"])}],
        "data": {"train": str(world["data"])},
        "logits": {"top_k": 4}, "fuse": {"defaults": {"max_steps": 1}},
        "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}],
        "evaluate": {"skills": {"chat": str(world["data"])}, "max_length": 8},
    }
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    refused(cli("run", path, "--work-dir", work), str(world["data"]), "no usable conversation",
            "no trained token within the first 8 tokens", "max_length 8")
    done = {p.name: p.read_bytes() for p in (work / "stages").glob("*.done.json")}
    assert done  # logits ... merge finished and stay
    recipe["evaluate"]["max_length"] = 512
    write_recipe(path, recipe)
    ok(cli("run", path, "--work-dir", work))
    assert all((work / "stages" / n).read_bytes() == b for n, b in done.items())
    assert (work / "report" / "results.md").read_text(encoding="utf-8").startswith("# first:")
    recipe["name"] = "second"
    write_recipe(path, recipe)
    records = {p.name: p.read_bytes() for p in (work / "stages").glob("*.done.json")}
    ok(cli("run", path, "--work-dir", work))
    changed = {p.name for p in (work / "stages").glob("*.done.json") if p.read_bytes() != records.get(p.name)}
    assert changed == {"evaluate__report.done.json"}
    assert (work / "report" / "results.md").read_text(encoding="utf-8").startswith("# second:")

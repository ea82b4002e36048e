"""``trust_remote_code``: a model folder with its own code (an InternLM2-like stand-in whose
config, model and tokenizer classes are Python files named in ``auto_map``) is refused
wherever it would load without it, naming the model, the key and the risk, before any
stage runs; with it, it scores, aligns, evaluates (ours and lm-eval). Its code files are in
the stage key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import refused
from standins import make_internlm2

from fusechat_merge.cli import main
from fusechat_merge.pipeline import WorkDir, plan_stages
from fusechat_merge.pipeline_recipe import PipelineRecipeError, load_pipeline_recipe
from fusion.artifacts.logit_store import LogitStore
from fusion.runtime.remote_code import RemoteCodeError, check_remote_code

RECIPE = {
    "name": "remote",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "internlm", "model": "models/internlm", "template": "shared"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 64},
    "fuse": {"defaults": {"max_steps": 1, "per_device_train_batch_size": 2}},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, metaspace_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("remote-code")
    make_model(root / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_internlm2(root / "models" / "internlm", metaspace_tokenizer)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", conversations(4))
    return root


def _recipe(root: Path, trust: bool | None) -> Path:
    recipe = json.loads(json.dumps(RECIPE))
    if trust is not None:
        recipe["sources"][0]["trust_remote_code"] = trust
    path = root / f"recipe-{trust}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def test_the_stand_in_needs_its_code(inputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = inputs / "models" / "internlm"
    with pytest.raises(RemoteCodeError) as err:
        check_remote_code(folder, False)
    for word in ("auto_map", "InternLM2ForCausalLM", "modeling_internlm2.py", "tokenization_internlm2.py",
                 "--trust-remote-code"):
        assert word in str(err.value)
    check_remote_code(folder, True)
    check_remote_code(inputs / "models" / "pivot", False)  # no auto_map: nothing to allow
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(tok).__name__ == "InternLM2TokenizerFast"
    assert type(model).__name__ == "InternLM2ForCausalLM"


@pytest.mark.parametrize("trust", [None, False])
def test_recipe_check_refuses_it_before_any_stage(inputs, trust):
    with pytest.raises(PipelineRecipeError) as err:
        load_pipeline_recipe(_recipe(inputs, trust), inputs)
    text = str(err.value)
    for word in ("sources[0]", "models/internlm", "`sources[0].trust_remote_code: true`", "runs that code",
                 "modeling_internlm2.py"):
        assert word in text, (word, text)
    result = CliRunner().invoke(main, ["run", str(_recipe(inputs, trust)), "--work-dir", str(inputs)])
    refused(result, "trust_remote_code")
    assert not (inputs / "stages").exists() and not (inputs / "logits").exists()


def test_recipe_keys_of_stages_are_refused(inputs):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["fuse"]["defaults"]["trust_remote_code"] = True
    path = inputs / "recipe-fuse-key.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.raises(PipelineRecipeError, match="key of a model's entry"):
        load_pipeline_recipe(path, inputs)


def test_logits_align_and_evaluate_with_the_flag(inputs, tmp_path):
    from fusion.evaluate.heldout import evaluate_model

    model, data = inputs / "models" / "internlm", inputs / "data" / "train.jsonl"
    common = ["--data", str(data), "--top-k", "4", "--max-length", "256", "--template", "shared"]
    out = tmp_path / "internlm"
    refused(CliRunner().invoke(main, ["logits", "--model", str(model), "--out", str(out), *common]),
            "trust_remote_code", "--trust-remote-code", str(model))
    assert not out.exists()
    result = CliRunner().invoke(main, ["logits", "--model", str(model), "--out", str(out), *common,
                                       "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert len(LogitStore(out)) == 4
    pivot = tmp_path / "pivot"
    result = CliRunner().invoke(main, ["logits", "--model", str(inputs / "models" / "pivot"), "--out",
                                       str(pivot), *common])
    assert result.exit_code == 0, result.output
    aligned = tmp_path / "aligned"
    refused(CliRunner().invoke(main, ["align", "--pivot", str(pivot), "--source", str(out), "--out",
                                      str(aligned)]), "--trust-remote-code", str(model))
    result = CliRunner().invoke(main, ["align", "--pivot", str(pivot), "--source", str(out), "--out",
                                       str(aligned), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    with pytest.raises(RemoteCodeError):
        evaluate_model(model, {"train": str(data)}, template="shared", cache_dir=tmp_path / "cache")
    (score,) = evaluate_model(model, {"train": str(data)}, template="shared", cache_dir=tmp_path / "cache",
                              trust_remote_code=True)
    assert score.loss > 0


def test_lm_eval_with_the_flag(inputs, tmp_path):
    pytest.importorskip("lm_eval")
    from fusion.evaluate.lm_eval_options import LmEvalError, LmEvalOptions
    from fusion.evaluate.lm_eval_runner import run_lm_eval

    folder = tmp_path / "mc"
    folder.mkdir()
    docs = [{"question": f"What is {i}+1?", "choices": [str(i + 1), "fox"], "gold": 0} for i in range(4)]
    data = write_jsonl(folder / "mc.jsonl", docs)
    (folder / "mc.yaml").write_text(
        f"task: remote_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {tmp_path / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "metadata: {version: 1.0}\n", encoding="utf-8")
    model = inputs / "models" / "internlm"
    options = {"tasks": ("remote_mc",), "include_path": str(folder), "device": "cpu", "bootstrap_iters": 0}
    with pytest.raises(LmEvalError, match="trust_remote_code"):
        run_lm_eval(model, LmEvalOptions(**options))
    results = run_lm_eval(model, LmEvalOptions(**options, trust_remote_code=True))
    assert 0.0 <= results["results"]["remote_mc"]["acc,none"] <= 1.0
    assert results["config"]["model_args"]["trust_remote_code"] is True


def test_stage_keys_hold_the_code_files(inputs):
    work = inputs  # the recipe's relative paths are relative to the work dir
    path = _recipe(inputs, True)
    before = {s.id: s.key for s in plan_stages(load_pipeline_recipe(path, inputs), WorkDir(work))}
    code = inputs / "models" / "internlm" / "modeling_internlm2.py"
    original = code.read_text(encoding="utf-8")
    try:
        code.write_text(original + "\n# a changed line of the model's own code\n", encoding="utf-8")
        after = {s.id: s.key for s in plan_stages(load_pipeline_recipe(path, inputs), WorkDir(work))}
    finally:
        code.write_text(original, encoding="utf-8")
    changed = sorted(k for k in before if before[k] != after[k])
    assert "logits/internlm" in changed and "align/internlm" in changed
    assert "logits/pivot" not in changed
    plan = {s.id: s for s in plan_stages(load_pipeline_recipe(path, inputs), WorkDir(work))}
    assert plan["logits/internlm"].job.trust_remote_code is True
    assert plan["logits/pivot"].job.trust_remote_code is False
    assert plan["align/internlm"].job.trust_remote_code is True
    assert "trust_remote_code" not in plan["fuse/seed-0/internlm"].job.settings  # the pivot's own code: none

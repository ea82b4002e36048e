"""The `fusechat_sce` mergekit method: registration, the Python and in-memory APIs, tokenizer settings."""

from __future__ import annotations

import torch
from helpers import assert_loads_and_runs, expected_merge, load_weights, sce_recipe, write_recipe


def test_python_run_merge_and_in_memory_api(model_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.merge_methods.api import merge_state_dicts
    from mergekit.options import MergeOptions

    from fusechat_merge.mergekit_adapter import register

    register()
    models = model_family["llama"]
    params = {"select_topk": 0.5, "select_scope": "deltas"}
    config = MergeConfiguration.model_validate(sce_recipe(models, **params))
    run_merge(config, str(tmp_path / "py"), options=MergeOptions(quiet=True))
    merged = load_weights(tmp_path / "py")
    expected = expected_merge(models, **params)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    assert_loads_and_runs(tmp_path / "py")

    state_dicts = [load_weights(m) for m in models]
    in_memory = merge_state_dicts(state_dicts, "fusechat_sce", parameters=params, base=0)
    for name, tensor in expected.items():
        torch.testing.assert_close(in_memory[name], tensor, rtol=0, atol=0)


def test_registration_is_idempotent():
    from mergekit.merge_methods import registry

    from fusechat_merge.mergekit_adapter import register

    first, second = register(), register()
    assert first is second is registry.get("fusechat_sce")
    assert registry.get("sce") is not first  # mergekit's own SCE is untouched


def test_vocabularies_that_differ_merge_through_tokenizer_settings(tmp_path, model_family):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat_merge.cli import main as cli
    from fusechat_merge.demo.toy import make_model

    base = model_family["llama"][0]
    grown = tmp_path / "grown"
    make_model(grown, base=base, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(grown)
    tokenizer.add_tokens(["<tool_call>", "<tool_result>"])
    model = AutoModelForCausalLM.from_pretrained(grown)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(grown)
    tokenizer.save_pretrained(grown)

    recipe = sce_recipe([base, model_family["llama"][1], grown], select_topk=0.5)
    bad = write_recipe(tmp_path / "no-tok.yaml", recipe)
    res = CliRunner().invoke(cli, ["merge", str(bad), str(tmp_path / "x")])
    assert res.exit_code != 0 and "tokenizer:" in res.output and "vocabularies differ" in res.output
    assert not (tmp_path / "x").exists()

    good = write_recipe(tmp_path / "union.yaml", {**recipe, "tokenizer": {"source": "union"}})
    res = CliRunner().invoke(cli, ["merge", str(good), str(tmp_path / "union"), "--quiet"])
    assert res.exit_code == 0, res.output
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "union")
    assert "<tool_call>" in merged_tok.get_vocab()
    assert_loads_and_runs(tmp_path / "union")

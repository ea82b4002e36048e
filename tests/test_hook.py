"""The import hook: stock `mergekit-yaml` sees `fusechat_sce` (and our checks) at no start-up cost."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import (
    BIN,
    assert_loads_and_runs,
    expected_merge,
    load_weights,
    run,
    sce_recipe,
    write_recipe,
)


def test_hook_does_not_import_torch_at_startup():
    code = "import sys; print('torch' in sys.modules, 'fusechat_merge._hook' in sys.modules)"
    out = run([sys.executable, "-c", code]).stdout.split()
    assert out == ["False", "True"]
    code = "import mergekit.merge_methods as m; print(m.get('fusechat_sce').spec.name)"
    assert run([sys.executable, "-c", code]).stdout.strip() == "fusechat_sce"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_cli_and_stock_mergekit_yaml_give_the_same_model(arch, model_family, tmp_path):
    models = model_family[arch]
    params = {"select_topk": 0.2, "select_scope": "weights", "normalize": True}
    recipe = write_recipe(tmp_path / "sce.yaml", sce_recipe(models, **params))

    run([str(BIN / "fusechat-merge"), "merge", str(recipe), str(tmp_path / "cli"), "--quiet"])
    run([str(BIN / "mergekit-yaml"), str(recipe), str(tmp_path / "stock")])

    cli, stock = load_weights(tmp_path / "cli"), load_weights(tmp_path / "stock")
    expected = expected_merge(models, **params)
    assert cli.keys() == stock.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(cli[name], tensor), name
        assert torch.equal(stock[name], tensor), name
    assert_loads_and_runs(tmp_path / "cli")
    assert not list(tmp_path.glob(".*partial*"))

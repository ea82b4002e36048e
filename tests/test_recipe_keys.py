"""What both recipe kinds share: key names, their lines, the hub-id rule."""

from __future__ import annotations

import pytest

from fusechat_merge.recipe_keys import key_path, line_map
from fusion.names import looks_like_hub_id


def test_key_path_and_lines():
    assert key_path(("merges", 2, "method")) == "merges[2].method" and key_path(()) == ""
    lines = line_map("a: 1\nmerges:\n  - name: x\n    method: y\n")
    assert lines[("merges", 0, "method")] == 4 and lines[("a",)] == 1


@pytest.mark.parametrize(("name", "hub"), [
    ("openchat/openchat_3.5", True), ("FuseAI/OpenChat-3.5-7B-Qwen-v2.0", True), ("./models/x", False),
    ("/abs/path", False), ("models", False), ("data/train.jsonl", False), ("a/b/c", False), ("~/m", False),
])
def test_hub_ids(name, hub):
    assert looks_like_hub_id(name) is hub

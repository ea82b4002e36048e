"""Held-out conversation files → local lm-eval tasks: the documents, the YAML, and that
lm-eval's own TaskManager indexes and builds them (no model is run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from corpus import write_jsonl

from fusion.evaluate.lm_eval_tasks import skill_documents, task_name, write_skill_tasks


def rows() -> list[dict]:
    return [
        {"id": "a", "messages": [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}]},
        {
            "id": "sys",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "reverse bfk"},
                {"from": "gpt", "value": " kfb "},
            ],
        },
        {
            "id": "multi",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "2+2="},
                {"role": "assistant", "content": "4"},
            ],
        },
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "no-reply", "messages": [{"role": "user", "content": "anyone?"}]},
    ]


def test_documents_are_the_last_reply_and_its_prompt():
    docs, skipped = skill_documents(rows())
    assert docs == [
        {"id": "a", "system": "", "prompt": "2+3=", "reference": "5"},
        {"id": "sys", "system": "Be brief.", "prompt": "reverse bfk", "reference": " kfb "},
    ]
    assert set(skipped) == {"multi", "bad-role", "no-reply"}
    assert "one" in skipped["multi"]


def test_task_names_are_lm_eval_safe():
    assert task_name("fusechat", "seen chat", "gen") == "fusechat_seen_chat_gen"
    with pytest.raises(ValueError, match="no letter"):
        task_name("fusechat", "!!", "gen")


def test_writes_two_tasks_per_skill(tmp_path: Path):
    files = {
        "arithmetic": write_jsonl(tmp_path / "heldout-arithmetic.jsonl", rows()),
        "seen chat": write_jsonl(tmp_path / "heldout-chat.jsonl", rows()[:1]),
    }
    out = write_skill_tasks(files, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    assert out.tag == "fusechat_skills"
    assert out.task_names == [
        "fusechat_arithmetic_gen",
        "fusechat_arithmetic_ll",
        "fusechat_seen_chat_gen",
        "fusechat_seen_chat_ll",
    ]
    arithmetic = out.by_skill()["arithmetic"]
    assert arithmetic.documents == 2 and set(arithmetic.skipped) == {"multi", "bad-role", "no-reply"}
    lines = arithmetic.data.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "sys"]

    gen = yaml.safe_load((out.include_path / "fusechat_arithmetic_gen.yaml").read_text())
    assert gen["output_type"] == "generate_until"
    assert gen["dataset_kwargs"]["data_files"]["test"] == str(arithmetic.data.resolve())
    assert gen["generation_kwargs"] == {"until": [], "do_sample": False, "max_gen_toks": 32}
    assert gen["metric_list"][0]["metric"] == "exact_match"
    ll = yaml.safe_load((out.include_path / "fusechat_arithmetic_ll.yaml").read_text())
    assert ll["output_type"] == "loglikelihood"
    assert [m["metric"] for m in ll["metric_list"]] == ["perplexity", "acc"]
    assert gen["tag"] == ll["tag"] == ["fusechat_skills"]


def test_refuses_a_skill_with_no_usable_conversation(tmp_path: Path):
    bad = write_jsonl(tmp_path / "bad.jsonl", rows()[3:])
    with pytest.raises(ValueError, match="no usable conversation"):
        write_skill_tasks({"bad": bad}, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    clash = write_jsonl(tmp_path / "ok.jsonl", rows()[:1])
    with pytest.raises(ValueError, match="both make task"):
        write_skill_tasks({"a b": clash, "a-b": clash}, tmp_path / "t2", cache_dir=tmp_path / "c")


def test_lm_eval_builds_the_generated_tasks(tmp_path: Path):
    """lm-eval's own loader reads the files: docs, prompts, targets and the tag."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    held = write_jsonl(tmp_path / "heldout-arithmetic.jsonl", rows())
    out = write_skill_tasks({"arithmetic": held}, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    manager = TaskManager(include_path=str(out.include_path), include_defaults=False)
    assert set(out.task_names) <= set(manager.all_tasks)
    assert out.tag in manager.all_tags
    loaded = manager.load([out.tag])["tasks"]
    assert set(loaded) == set(out.task_names)
    gen = loaded["fusechat_arithmetic_gen"]
    docs = list(gen.eval_docs)
    assert [gen.doc_to_text(d) for d in docs] == ["2+3=", "reverse bfk"]
    assert [gen.doc_to_target(d) for d in docs] == ["5", " kfb "]


def _pick(rid: str, letters: list[str], reply: str, answers=None) -> dict:
    return {"id": rid, "answers": letters if answers is None else answers,
            "messages": [{"role": "user", "content": f"pick one of {' '.join(letters)}"},
                         {"role": "assistant", "content": reply}]}


def test_rows_that_list_their_right_replies_are_scored_by_membership(tmp_path: Path):
    """The generate task's targets are the row's answers (lm-eval: right if any matches);
    rows whose gold reply is not among them, or whose answers are not a list of strings,
    are left out and named; a file mixing rows with and without answers is refused."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    good = [_pick("a", ["b", "k", "q"], "k"), _pick("b", ["m", "x"], "m")]
    bad = [_pick("c", ["b", "k"], "z"), _pick("d", ["b"], "b", answers="b"), _pick("e", ["b"], "b", answers=[])]
    data = write_jsonl(tmp_path / "pick.jsonl", good + bad)
    out = write_skill_tasks({"pick": data}, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    task = out.by_skill()["pick"]
    assert task.documents == 2
    assert task.skipped == {"c": "the reply 'z' is not among its 'answers'",
                            "d": "'answers' must be a non-empty list of strings (every right reply)",
                            "e": "'answers' must be a non-empty list of strings (every right reply)"}
    gen = yaml.safe_load((out.include_path / "fusechat_pick_gen.yaml").read_text())
    ll = yaml.safe_load((out.include_path / "fusechat_pick_ll.yaml").read_text())
    assert gen["doc_to_target"] == "answers" and ll["doc_to_target"] == "{{reference}}"
    loaded = TaskManager(include_path=str(out.include_path), include_defaults=False).load(
        ["fusechat_pick_gen"])["tasks"]["fusechat_pick_gen"]
    assert [loaded.doc_to_target(d) for d in loaded.eval_docs] == [["b", "k", "q"], ["m", "x"]]
    assert loaded.multiple_target == 3  # lm-eval's any-of-several-targets scoring
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [good[0], {k: v for k, v in good[1].items() if k != "answers"}])
    with pytest.raises(ValueError, match="one kind per file"):
        write_skill_tasks({"mixed": mixed}, tmp_path / "t2", cache_dir=tmp_path / "cache")

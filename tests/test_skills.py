"""The demo's skilled models: synthetic conversations and tiny models that learn them."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from fusechat_merge.demo.skills import (
    LETTERS,
    MAX_OPERAND,
    N_HELDOUT,
    PICK_ALPHABET,
    PICK_SIZE,
    PIVOT_SKILL_ROWS,
    SKILLS,
    SPECS,
    encode_for_training,
    exact_match,
    make_demo_models,
    skill_conversations,
    train_heldout,
)


def _prompt(row: dict) -> str:
    return row["messages"][0]["content"]


def _answer(row: dict) -> str:
    return row["messages"][1]["content"]


@pytest.mark.parametrize("skill", SKILLS)
def test_conversations_are_deterministic_per_seed(skill):
    rows = skill_conversations(skill, 40, seed=3)
    assert rows == skill_conversations(skill, 40, seed=3)
    assert [_prompt(r) for r in rows] != [_prompt(r) for r in skill_conversations(skill, 40, 4)]
    assert [r["id"] for r in rows[:2]] == [f"{skill}-3-0", f"{skill}-3-1"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def test_unknown_skill_is_refused():
    with pytest.raises(ValueError, match="unknown skill"):
        skill_conversations("poetry", 1, 0)


def test_arithmetic_answers_are_correct():
    for row in skill_conversations("arithmetic", 500, seed=0):
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", _prompt(row)).groups()
        assert max(int(a), int(b)) <= MAX_OPERAND
        assert int(_answer(row)) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert int(_answer(row)) >= 0


def test_reversal_answers_are_correct():
    for row in skill_conversations("reversal", 500, seed=0):
        word = re.fullmatch(r"reverse ([a-z]+)", _prompt(row)).group(1)
        assert 3 <= len(word) <= 5 and set(word) <= set(LETTERS)
        assert _answer(row)[::-1] == word


def test_pick_replies_are_one_of_the_listed_letters_drawn_uniformly():
    from collections import Counter

    rows = skill_conversations("pick", 3000, seed=0)
    places = Counter()
    for row in rows:
        letters = re.fullmatch(r"pick one of ([a-z](?: [a-z])*)", _prompt(row)).group(1).split()
        assert PICK_SIZE[0] <= len(letters) <= PICK_SIZE[1] and len(set(letters)) == len(letters)
        assert set(letters) <= set(PICK_ALPHABET)
        assert row["answers"] == letters and _answer(row) in letters
        places[letters.index(_answer(row))] += 1
    # uniform over the set: the first listed letter about 1/6 of the time, as the last five
    assert 0.13 < places[0] / len(rows) < 0.2 and places[0] / len(rows) == pytest.approx(
        sum(places[i] for i in range(1, 5)) / 4 / len(rows), abs=0.03)


def test_the_pick_source_never_saw_the_corpus_pick_conversations(tmp_path):
    from fusechat_merge.demo.pipeline_demo import prepare_demo_data
    from fusechat_merge.demo.skills import _training_rows

    source = next(spec for spec in SPECS if spec.name == "pick")
    seen = {_prompt(r) for r in _training_rows(source, seed=0)[0]}
    prepare_demo_data(tmp_path)
    corpus = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    picks = [r for r in corpus if r["id"].startswith("pick")]
    assert 0 < len(picks) <= 200  # few: the regime of FuseChat's claim
    assert not {_prompt(r) for r in picks} & seen


@pytest.mark.parametrize("skill", SKILLS)
def test_train_and_heldout_do_not_overlap(skill):
    train, held = train_heldout(skill, 1000, N_HELDOUT, seed=0)
    assert len(train) == 1000 and len(held) == N_HELDOUT
    held_prompts = {_prompt(r) for r in held}
    assert len(held_prompts) == N_HELDOUT
    assert not held_prompts & {_prompt(r) for r in train}
    assert len({r["id"] for r in train + held}) == len(train) + len(held)


@pytest.mark.parametrize("skill", SKILLS)
def test_validation_is_disjoint_from_heldout_and_from_what_the_pivot_and_corpus_see(skill, tmp_path):
    from fusechat_merge.demo.pipeline_demo import DEMO_RECIPE, _evaluate_on, prepare_demo_data
    from fusechat_merge.demo.skills import ModelSpec, _training_rows, validation_rows

    held = {_prompt(r) for r in train_heldout(skill, 0, N_HELDOUT, seed=0)[1]}
    valid = {_prompt(r) for r in validation_rows(skill)}
    assert len(valid) == N_HELDOUT and not valid & held
    pivot_rows, _ = _training_rows(ModelSpec("pivot", "llama", "metaspace", 400, None), seed=0)
    seen = {_prompt(r) for r in pivot_rows}
    # the pivot saw a little of arithmetic and reversal, nothing of pick
    assert any(r["id"].startswith(skill) for r in pivot_rows) == (skill in PIVOT_SKILL_ROWS)
    assert not seen & (held | valid)
    prepare_demo_data(tmp_path)
    corpus = {_prompt(json.loads(line)) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()}
    assert not corpus & (held | valid)
    for split, expected in (("heldout", held), ("validation", valid)):
        rows = (tmp_path / "data" / f"{split}-{skill}.jsonl").read_text().splitlines()
        assert {_prompt(json.loads(line)) for line in rows} == expected
        assert (tmp_path / "data" / ("lm_eval" if split == "heldout" else "lm_eval_validation")).is_dir()
    # `demo --split validation` points the recipe's evaluation at those files and tasks
    recipe = _evaluate_on(yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8")), "validation")
    assert recipe["evaluate"]["skills"][skill] == f"data/validation-{skill}.jsonl"
    tasks = tmp_path / recipe["evaluate"]["lm_eval"]["include_path"]
    assert {p.stem for p in tasks.glob("*.yaml")} >= {f"fusechat_{skill}_gen", f"fusechat_{skill}_ll"}


def test_the_demo_refuses_an_unknown_split(tmp_path):
    from click.testing import CliRunner

    from fusechat_merge.cli import main
    from fusechat_merge.demo.pipeline_demo import run_pipeline_demo

    with pytest.raises(ValueError, match="unknown split 'test'"):
        run_pipeline_demo(tmp_path, split="test")
    result = CliRunner().invoke(main, ["demo", "--split", "test", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and "'test' is not one of 'heldout', 'validation'" in result.output
    assert not any(tmp_path.iterdir())  # refused before any work


def test_labels_include_the_space_before_a_llama_reply(metaspace_tokenizer):
    """Greedy decoding starts right after '[/INST]', so the lone '▁' must be learned."""
    row = {"id": "x", "messages": [{"role": "user", "content": "2+3="}, *_reply("5")]}
    ids, labels = encode_for_training(metaspace_tokenizer, row)
    trained = [metaspace_tokenizer.convert_ids_to_tokens(t) for t in labels if t != -100]
    assert trained == ["▁", "5", "</s>"]
    assert len(ids) == len(labels)


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> tuple[Path, dict[str, Path], list[str]]:
    work = tmp_path_factory.mktemp("skills")
    lines: list[str] = []
    return work, make_demo_models(work, log=lines.append), lines


def test_demo_models_differ_in_architecture_and_tokenizer(demo_models):
    from transformers import AutoConfig, AutoTokenizer

    _, paths, _ = demo_models
    assert set(paths) == {"pivot", *SKILLS}
    types = {name: AutoConfig.from_pretrained(p).model_type for name, p in paths.items()}
    assert types == {"pivot": "llama", "arithmetic": "qwen2", "reversal": "mistral", "pick": "qwen2"}
    tokenizers = [AutoTokenizer.from_pretrained(p) for p in paths.values()]
    assert len({len(t) for t in tokenizers}) == 4
    assert len({frozenset(t.get_vocab().items()) for t in tokenizers}) == 4


def test_each_source_is_expert_where_the_pivot_is_weak_not_zero(demo_models):
    _, paths, _ = demo_models
    pivot = []
    for skill in SKILLS:
        held = train_heldout(skill, 0, N_HELDOUT, seed=0)[1]
        assert exact_match(paths[skill], held) >= 0.8, skill
        pivot.append(exact_match(paths["pivot"], held))
        assert pivot[-1] <= 0.4, skill
    assert max(pivot) > 0


def test_second_call_reuses_the_models(demo_models):
    work, paths, _ = demo_models
    stamps = {name: (p / "config.json").stat().st_mtime_ns for name, p in paths.items()}
    lines: list[str] = []
    started = time.perf_counter()
    assert make_demo_models(work, log=lines.append) == paths
    assert time.perf_counter() - started < 5
    assert stamps == {name: (p / "config.json").stat().st_mtime_ns for name, p in paths.items()}
    assert all("reusing" in line for line in lines) and len(lines) == len(SPECS)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_pick_rate_counts_any_right_reply_and_the_mass_spreads_over_the_set(demo_models):
    """lm-eval's check of a pick reply is membership: the same replies scored against the
    gold member alone are right far less often. The pick source's first reply token puts
    more probability on the listed letters than a uniform choice of letter would (5-7 of
    26: about 0.23; it measured 0.38, the rest spread over other letters, while its greedy
    reply is right 0.88 of the time), the pivot (never taught pick) almost none."""
    from fusion.evaluate.heldout import load_model, right_answer_mass

    work, paths, _ = demo_models
    held = train_heldout("pick", 0, N_HELDOUT, seed=0)[1]
    rate = exact_match(paths["pick"], held)
    gold_only = exact_match(paths["pick"], [{k: v for k, v in r.items() if k != "answers"} for r in held])
    assert rate >= 0.8 and gold_only < 0.5, (rate, gold_only)
    data = work / "held-pick.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in held))
    masses = {}
    for name in ("pick", "pivot"):
        model, tokenizer = load_model(paths[name])
        masses[name] = right_answer_mass(model, tokenizer, data, max_length=128, cache_dir=work / "cache")
    assert masses["pick"] > 0.3 and masses["pick"] > 5 * masses["pivot"], masses

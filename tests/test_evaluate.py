"""Per-skill evaluation: the loss is transformers' own, exact match tells a trained model from
a random one, malformed rows are skipped, batching changes nothing.

Real tiny models (`fusechat_merge.demo.toy`) and real JSONL files; one model is trained here, with
plain AdamW, to answer a fixed prompt set with a fixed reply under both templates.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from corpus import conversations, write_jsonl

from fusion.data.batching import pad_sequences
from fusion.data.conversations import MalformedRow, Turn, parse_turns, render
from fusion.evaluate.heldout import (
    SkillScore,
    evaluate_model,
    load_model,
)

TEMPLATES = ("own", "shared")
ARCH_TOKENIZERS = {
    "llama": "metaspace_tokenizer",
    "mistral": "metaspace_tokenizer",
    "qwen2": "bytelevel_tokenizer",
}
REPLY = "The capital of France is Paris."
PROMPTS = ("What is the capital of France?", "Where is Paris?", "Name a capital.", "Hello there!")
MALFORMED = [
    {"id": "bad-role", "conversations": [{"from": "robot", "value": "beep"}]},
    {"id": "empty", "conversations": []},
    {"id": "no-reply", "conversations": [{"from": "human", "value": "Anyone?"}]},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def capital_rows() -> list[dict]:
    return [
        {
            "id": f"cap-{i}",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": REPLY}],
        }
        for i, q in enumerate(PROMPTS)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("skills")
    return {
        "chat": write_jsonl(root / "chat.jsonl", conversations(8)),
        "capital": write_jsonl(root / "capital.jsonl", capital_rows()),
        "mixed": write_jsonl(root / "mixed.jsonl", [*MALFORMED[:2], *capital_rows(), MALFORMED[2]]),
        "broken": write_jsonl(root / "broken.jsonl", MALFORMED),
        "empty": write_jsonl(root / "empty.jsonl", []),
    }


@pytest.fixture(scope="module")
def random_models(tmp_path_factory, request) -> dict[str, Path]:
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("random")
    models = {
        arch: make_model(root / arch, arch, tokenizer=request.getfixturevalue(tok), seed=1)
        for arch, tok in ARCH_TOKENIZERS.items()
    }
    no_pad = copy.deepcopy(request.getfixturevalue("bytelevel_tokenizer"))
    no_pad.pad_token = None
    models["qwen2-no-pad"] = make_model(root / "no-pad", "qwen2", tokenizer=no_pad, seed=2)
    return models


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, metaspace_tokenizer) -> Path:
    """A tiny Llama that answers every prompt of PROMPTS with REPLY, under both templates."""
    from fusechat_merge.demo.toy import make_model

    path = make_model(
        tmp_path_factory.mktemp("trained") / "llama", "llama", tokenizer=metaspace_tokenizer, seed=3
    )
    model, _ = load_model(path)
    encoded = [
        render(metaspace_tokenizer, [Turn("user", q), Turn("assistant", REPLY)], template=t)
        for q in PROMPTS
        for t in TEMPLATES
    ]
    ids, mask = pad_sequences([e.input_ids for e in encoded], 0)
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(encoded):
        labels[row, : len(e.input_ids)] = torch.where(
            torch.tensor(e.loss_mask), torch.tensor(e.input_ids), -100
        )
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.save_pretrained(path)
    return path


def evaluate(model: Path, skills: dict[str, Path], tmp_path: Path, **kw) -> list[SkillScore]:
    return evaluate_model(model, skills, cache_dir=tmp_path / "cache", **kw)


def oracle_loss(
    model_dir: Path, path: Path, template: str, max_length: int
) -> tuple[float, int, int, int]:
    """Token-weighted mean of transformers' per-conversation loss; tokens, rows kept, truncated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count, kept, truncated = 0.0, 0, 0, 0
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            enc = render(
                tokenizer,
                parse_turns(json.loads(line), str(i)),
                template=template,
                max_length=max_length,
            )
        except MalformedRow:
            continue
        ids = torch.tensor([enc.input_ids])
        labels = torch.where(torch.tensor([enc.loss_mask]), ids, -100)
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            total += model(ids, labels=labels).loss.item() * n
        count += n
        kept += 1
        truncated += enc.truncated
    return total / count, count, kept, truncated


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("arch", list(ARCH_TOKENIZERS))
def test_loss_equals_transformers_loss(arch, template, random_models, files, tmp_path):
    [score] = evaluate(
        random_models[arch],
        {"chat": files["chat"]},
        tmp_path,
        template=template,
        max_length=64,
        batch_size=3,
    )
    loss, tokens, kept, truncated = oracle_loss(random_models[arch], files["chat"], template, 64)
    assert truncated > 0  # the cut is exercised (and may leave a row nothing to score)
    assert score == SkillScore("chat", pytest.approx(loss, rel=1e-5), kept, tokens, 8 - kept)


@pytest.mark.parametrize("template", TEMPLATES)
def test_loss_is_low_for_the_trained_model(template, trained_model, files, tmp_path):
    [score] = evaluate(trained_model, {"capital": files["capital"]}, tmp_path, template=template)
    assert score.conversations == len(PROMPTS)
    assert score.loss < 0.1


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("arch", list(ARCH_TOKENIZERS))
def test_loss_is_high_for_a_random_model(arch, template, random_models, files, tmp_path):
    [score] = evaluate(
        random_models[arch], {"capital": files["capital"]}, tmp_path, template=template
    )
    assert score.loss > 3.0


def test_malformed_rows_are_skipped(trained_model, files, tmp_path):
    mixed, clean = evaluate(
        trained_model, {"mixed": files["mixed"], "clean": files["capital"]}, tmp_path
    )
    assert (mixed.skill, clean.skill) == ("mixed", "clean")
    assert mixed.skipped == len(MALFORMED)
    assert clean.skipped == 0
    assert (mixed.conversations, mixed.tokens) == (clean.conversations, clean.tokens)
    assert mixed.loss == pytest.approx(clean.loss, rel=1e-5)


@pytest.mark.parametrize("which", ["broken", "empty"])
def test_file_without_usable_conversation_raises(which, trained_model, files, tmp_path):
    with pytest.raises(ValueError, match=f"{which}.jsonl"):
        evaluate(trained_model, {"ok": files["capital"], which: files[which]}, tmp_path)


@pytest.mark.parametrize("model", ["trained", "qwen2-no-pad"])
def test_batch_size_does_not_change_scores(model, trained_model, random_models, files, tmp_path):
    path = trained_model if model == "trained" else random_models[model]
    skills = {"chat": files["chat"], "capital": files["capital"]}
    one, many = (evaluate(path, skills, tmp_path, batch_size=b) for b in (1, 3))
    for a, b in zip(one, many, strict=True):
        assert (a.skill, a.conversations, a.tokens) == (b.skill, b.conversations, b.tokens)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)


# --------------------------------------------------------------------------- right answers


def _pick_row(rid: str, letters: list[str], reply: str) -> dict:
    return {"id": rid, "answers": letters, "messages": [{"role": "user", "content": f"pick one of {' '.join(letters)}"},
                                                         {"role": "assistant", "content": reply}]}


def _path_probability(model, tokenizer, row: dict, answer: str) -> float:
    """Oracle: the probability of emitting ``answer``'s reply tokens up to the one holding
    its first character, from the prompt as the chat template renders it for generation,
    one unpadded forward pass of the whole rendered conversation, in float64."""
    import torch

    messages = [row["messages"][0], {"role": "assistant", "content": answer}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert full.startswith(prompt)
    start = full.index(answer, len(prompt))
    first = next(i for i, (_, end) in enumerate(offsets) if end > start)
    begin = min(first, next(i for i, (s, _) in enumerate(offsets) if s >= len(prompt)))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(torch.exp(sum(logprobs[j - 1, ids[j]] for j in range(begin, first + 1))))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_right_answer_mass_sums_the_right_first_tokens(arch, random_models, tmp_path):
    from fusion.evaluate.heldout import load_model, right_answer_mass

    model, tokenizer = load_model(random_models[arch])
    letters = ["b", "k", "q", "x", "z", "m"]
    rows = [_pick_row("a", letters, "q"), _pick_row("b", letters[:5], "b")]
    write_jsonl(tmp_path / "pick.jsonl", rows)
    mass = right_answer_mass(model, tokenizer, tmp_path / "pick.jsonl", max_length=96, cache_dir=tmp_path / "c")
    expected = [sum(_path_probability(model, tokenizer, row, a) for a in row["answers"]) for row in rows]
    assert mass == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert 0 < mass < 1
    # one right answer per row: that answer's own path; rows without answers: no mass at all
    one = _pick_row("a", ["k"], "k")
    write_jsonl(tmp_path / "one.jsonl", [one])
    assert right_answer_mass(model, tokenizer, tmp_path / "one.jsonl", max_length=96,
                             cache_dir=tmp_path / "c") == pytest.approx(_path_probability(model, tokenizer, one, "k"),
                                                                        rel=1e-4)
    write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in rows[0].items() if k != "answers"}])
    assert right_answer_mass(model, tokenizer, tmp_path / "plain.jsonl", cache_dir=tmp_path / "c") is None


def test_a_reply_outside_its_answers_is_named(random_models, tmp_path):
    from fusion.evaluate.heldout import load_model, right_answer_mass

    model, tokenizer = load_model(random_models["llama"])
    write_jsonl(tmp_path / "bad.jsonl", [_pick_row("r7", ["b", "k"], "q")])
    with pytest.raises(ValueError, match=r"bad.jsonl: row r7: the reply 'q' is not among its 'answers'"):
        right_answer_mass(model, tokenizer, tmp_path / "bad.jsonl", cache_dir=tmp_path / "c")

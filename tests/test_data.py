"""Stage-1 conversation data: parsing, rendering, loss masks, truncation, malformed rows, loading.

Real tokenizers (trained in the session) and real ``datasets`` files; the loss mask is checked
by decoding the trained tokens back to text.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fusion.data.conversations import (
    EncodeReport,
    MalformedRow,
    Turn,
    encode_rows,
    load_conversations,
    parse_turns,
    render,
    row_id,
)

TOKENIZERS = ("metaspace_tokenizer", "bytelevel_tokenizer")
TEMPLATES = ("own", "shared")

# Spaces, digits, punctuation, non-ASCII (some byte-fallback only), emoji; the first reply
# also appears verbatim in the following user turn, so a text search would find it twice.
TURNS = [
    Turn("user", "Hi there! What is 2+2, and 12*3?"),
    Turn("assistant", "2+2 = 4; 12*3 = 36."),
    Turn("user", "You said: 2+2 = 4; 12*3 = 36. Now in French, with ÄÖÜ ß é 中文 ñ 😀?"),
    Turn("assistant", "Bonjour le monde!  Quatre, trente-six: ÄÖÜ ß é 中文 ñ 😀 (fin)."),
    Turn("user", "x"),
    Turn("assistant", "😀 y\tz"),
]
REPLIES = [t.content for t in TURNS if t.role == "assistant"]


def sharegpt(turns: list[Turn], **extra) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {**extra, "conversations": [{"from": names[t.role], "value": t.content} for t in turns]}


def openai(turns: list[Turn], **extra) -> dict:
    return {**extra, "messages": [{"role": t.role, "content": t.content} for t in turns]}


def eos_text(tokenizer) -> str:
    return tokenizer.eos_token


def masked_runs(loss_mask: list[bool]) -> list[list[int]]:
    """Maximal runs of consecutive trained positions."""
    runs: list[list[int]] = []
    for i, on in enumerate(loss_mask):
        if on and runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        elif on:
            runs.append([i])
    return runs


def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte, inverted."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    table: dict[str, int] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def piece_bytes(tokenizer, piece: str, kind: str) -> bytes:
    """The UTF-8 bytes a vocabulary piece stands for."""
    if kind == "bytelevel":
        alphabet = byte_alphabet()
        return bytes(alphabet[c] for c in piece)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode()


# --------------------------------------------------------------------------- parsing


def test_both_row_formats_parse_to_the_same_turns():
    with_system = [Turn("system", "Be brief."), *TURNS]
    assert parse_turns(sharegpt(with_system), "a") == with_system
    assert parse_turns(openai(with_system), "b") == with_system


def test_role_aliases_are_accepted_in_either_format():
    mixed = {
        "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}],
    }
    aliased = {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}
    expected = [Turn("user", "q"), Turn("assistant", "a")]
    assert parse_turns(mixed, "0") == parse_turns(aliased, "1") == expected


@pytest.mark.parametrize("system", [False, True])
def test_an_opening_assistant_turn_is_dropped(system):
    head = [Turn("system", "S")] if system else []
    row = sharegpt([*head, Turn("assistant", "greeting"), *TURNS[:2]])
    assert parse_turns(row, "r") == [*head, *TURNS[:2]]


def test_row_id_prefers_the_rows_own_id():
    assert row_id({"id": 17}, 3) == "17"
    assert row_id({"id": "abc"}, 3) == "abc"
    assert row_id({"conversations": []}, 3) == "3"


@pytest.mark.parametrize(
    "row,reason",
    [
        (sharegpt([]), "empty conversation"),
        ({"messages": []}, "empty conversation"),
        ({"text": "hello"}, "no 'conversations' or 'messages'"),
        ({"conversations": [{"from": "bot", "value": "q"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "not a string"),
        ({"messages": [{"role": "user"}]}, "no 'value' or 'content'"),
        (sharegpt([TURNS[0], TURNS[0], TURNS[1]]), "do not alternate"),
        (sharegpt([TURNS[0], TURNS[1], TURNS[1]]), "do not alternate"),
        (sharegpt([*TURNS[:2], Turn("system", "late")]), "do not alternate"),
        (sharegpt([TURNS[0]]), "no assistant turn"),
        (sharegpt([Turn("assistant", "only a reply")]), "no assistant turn"),
    ],
)
def test_malformed_rows_name_the_reason(row, reason):
    with pytest.raises(MalformedRow) as info:
        parse_turns(row, "row-7")
    assert info.value.row_id == "row-7"
    assert reason in info.value.reason
    assert "row-7" in str(info.value)


# --------------------------------------------------------------------------- rendering


@pytest.fixture(params=TOKENIZERS)
def tok(request):
    return request.param.split("_")[0], request.getfixturevalue(request.param)


@pytest.mark.parametrize("template", TEMPLATES)
def test_reply_spans_slice_back_the_replies(tok, template):
    _, tokenizer = tok
    enc = render(tokenizer, TURNS, template=template)
    assert [enc.text[s:e] for s, e in enc.reply_spans] == REPLIES
    assert not enc.truncated
    assert len(enc.input_ids) == len(enc.loss_mask) == len(enc.token_offsets)


@pytest.mark.parametrize("template", TEMPLATES)
def test_loss_mask_is_exactly_the_replies_and_their_end_of_turn_token(tok, template):
    _, tokenizer = tok
    enc = render(tokenizer, TURNS, template=template)
    runs = masked_runs(enc.loss_mask)
    assert len(runs) == len(REPLIES)
    for run, reply, (start, _) in zip(runs, REPLIES, enc.reply_spans, strict=True):
        decoded = tokenizer.decode(
            [enc.input_ids[i] for i in run], clean_up_tokenization_spaces=False
        )
        # A first token may also cover template whitespace just before the reply
        # ('ĠBonjour' after "Assistant: "); it is still the token that starts the reply.
        glue = enc.text[min(start, enc.token_offsets[run[0]][0]) : start]
        assert glue.strip() == ""
        assert decoded in (reply + eos_text(tokenizer), glue + reply + eos_text(tokenizer))
        assert enc.input_ids[run[-1]] == tokenizer.eos_token_id
        assert enc.token_offsets[run[0]][0] <= start


@pytest.mark.parametrize("template", TEMPLATES)
def test_token_offsets_slice_back_each_token(tok, template):
    kind, tokenizer = tok
    enc = render(tokenizer, TURNS, template=template)
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(enc.input_ids)
    for token_id, piece, (a, b) in zip(enc.input_ids, pieces, enc.token_offsets, strict=True):
        if token_id in special:
            assert enc.text[a:b] == piece
            continue
        want = piece_bytes(tokenizer, piece, kind)
        got = enc.text[a:b].encode()
        # A token holding part of a multi-byte character maps to that whole character.
        assert want == got or (want in got and len(enc.text[a:b]) <= 2), (piece, enc.text[a:b])


def test_shared_template_text(metaspace_tokenizer, bytelevel_tokenizer):
    turns = [Turn("system", "S"), Turn("user", "q"), Turn("assistant", "a")]
    llama = render(metaspace_tokenizer, turns, template="shared")
    chatml = render(bytelevel_tokenizer, turns, template="shared")
    assert llama.text == "<s>S</s>GPT4 Correct User: q</s>GPT4 Correct Assistant: a</s>"
    assert chatml.text == (
        "S<|im_end|>GPT4 Correct User: q<|im_end|>GPT4 Correct Assistant: a<|im_end|>"
    )


def test_own_template_is_the_models_chat_template(bytelevel_tokenizer):
    enc = render(bytelevel_tokenizer, TURNS[:2])
    assert enc.text == bytelevel_tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in TURNS[:2]], tokenize=False
    )
    assert enc.input_ids[0] == bytelevel_tokenizer.convert_tokens_to_ids("<|im_start|>")


def with_template(tokenizer, chat_template: str):
    clone = copy.deepcopy(tokenizer)
    clone.chat_template = chat_template
    return clone


NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def test_system_turn_is_folded_into_the_first_user_turn_when_the_template_refuses_it(
    bytelevel_tokenizer,
):
    tokenizer = with_template(bytelevel_tokenizer, NO_SYSTEM)
    enc = render(tokenizer, [Turn("system", "Be brief."), *TURNS[:2]])
    assert enc.text.startswith("<|im_start|>user\nBe brief.\n\nHi there!")
    assert [enc.text[s:e] for s, e in enc.reply_spans] == [REPLIES[0]]


def test_trimming_template_is_supported(bytelevel_tokenizer):
    trimming = NO_SYSTEM.replace("m['content'] }}", "m['content'] | trim }}")
    tokenizer = with_template(bytelevel_tokenizer, trimming)
    enc = render(tokenizer, [Turn("user", "q"), Turn("assistant", "  the reply \n")])
    assert [enc.text[s:e] for s, e in enc.reply_spans] == ["the reply"]


@pytest.mark.parametrize(
    "chat_template,reason",
    [
        (NO_SYSTEM.replace("{% for m in messages %}", "{% for m in messages[:1] %}"), "0 times"),
        (NO_SYSTEM.replace("m['content'] }}", "m['content'] }}{{ m['content'] }}"), "2 times"),
        (NO_SYSTEM.replace("m['content'] }}", "m['content'] | upper }}"), "rewrites"),
    ],
)
def test_template_that_drops_or_rewrites_replies_is_malformed(
    bytelevel_tokenizer, chat_template, reason
):
    tokenizer = with_template(bytelevel_tokenizer, chat_template)
    with pytest.raises(MalformedRow, match=reason):
        render(tokenizer, TURNS[:2], row_id="r1")


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        render(Slow(), TURNS[:2])


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("template", TEMPLATES)
def test_truncation_keeps_a_prefix_and_clips_spans(tok, template):
    _, tokenizer = tok
    full = render(tokenizer, TURNS, template=template)
    second = masked_runs(full.loss_mask)[1]
    cut = second[len(second) // 2]  # inside the second reply
    short = render(tokenizer, TURNS, template=template, max_length=cut)
    assert short.truncated
    assert short.input_ids == full.input_ids[:cut]
    assert short.loss_mask == full.loss_mask[:cut]
    assert short.token_offsets == full.token_offsets[:cut]
    assert short.text == full.text
    last_char = max(b for _, b in short.token_offsets)
    assert short.reply_spans == [full.reply_spans[0], (full.reply_spans[1][0], last_char)]
    assert full.text[slice(*short.reply_spans[1])] in REPLIES[1]


def test_truncation_before_any_reply_is_malformed(metaspace_tokenizer):
    with pytest.raises(MalformedRow, match="no trained token within the first 3 tokens"):
        render(metaspace_tokenizer, TURNS, max_length=3, row_id="long")


def test_exact_length_is_not_truncated(metaspace_tokenizer):
    full = render(metaspace_tokenizer, TURNS)
    same = render(metaspace_tokenizer, TURNS, max_length=len(full.input_ids))
    assert same == full


# --------------------------------------------------------------------------- batches


BAD_ROWS = {
    "unknown-role": {"conversations": [{"from": "robot", "value": "hi"}]},
    "empty": {"conversations": []},
    "not-alternating": sharegpt([TURNS[0], TURNS[0], TURNS[1]]),
    "empty-reply": sharegpt([TURNS[0], Turn("assistant", "")]),
}
BAD_REASONS = {
    "unknown-role": "unknown role 'robot'",
    "empty": "empty conversation",
    "not-alternating": "do not alternate",
    "empty-reply": "reply 0 tokenizes to nothing",
}


def mixed_rows() -> list[dict]:
    rows = [sharegpt(TURNS, id="good-1")]
    rows += [{**row, "id": rid} for rid, row in BAD_ROWS.items()]
    rows.append(openai(TURNS[:2]))  # no id: its index names it
    return rows


@pytest.mark.parametrize("template", TEMPLATES)
def test_malformed_rows_are_skipped_and_counted(tok, template):
    _, tokenizer = tok
    report = EncodeReport()
    out = list(encode_rows(mixed_rows(), tokenizer, template=template, report=report))
    assert [rid for rid, _ in out] == ["good-1", "5"]
    assert report.kept == 2
    assert set(report.skipped) == set(BAD_ROWS)
    for rid, reason in BAD_REASONS.items():
        assert reason in report.skipped[rid]


@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_strict_mode_raises_on_the_first_malformed_row(metaspace_tokenizer, bad):
    rows = [sharegpt(TURNS, id="good"), {**BAD_ROWS[bad], "id": bad}]
    encoded = encode_rows(rows, metaspace_tokenizer, template="shared", strict=True)
    assert next(encoded)[0] == "good"
    with pytest.raises(MalformedRow) as info:
        next(encoded)
    assert info.value.row_id == bad
    assert BAD_REASONS[bad] in info.value.reason


def test_rows_cut_to_nothing_by_max_length_are_skipped(bytelevel_tokenizer):
    short = [Turn("user", "q"), Turn("assistant", "a")]
    limit = len(render(bytelevel_tokenizer, short).input_ids)
    report = EncodeReport()
    rows = [sharegpt(TURNS, id="long"), sharegpt(short)]
    out = list(encode_rows(rows, bytelevel_tokenizer, max_length=limit, report=report))
    assert [rid for rid, _ in out] == ["1"]
    assert f"no trained token within the first {limit} tokens" in report.skipped["long"]


# --------------------------------------------------------------------------- loading


def rows_for_files() -> list[dict]:
    return [sharegpt(TURNS, id="a"), sharegpt(TURNS[:2], id="b")]


def write_json_list(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    lines = (json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    "name,writer",
    [("data.json", write_json_list), ("data.jsonl", write_jsonl), ("data.parquet", write_parquet)],
)
def test_load_conversations_from_files(tmp_path, metaspace_tokenizer, name, writer):
    path = writer(tmp_path / name, rows_for_files())
    ds = load_conversations(str(path), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2
    assert [parse_turns(r, row_id(r, i)) for i, r in enumerate(ds)] == [TURNS, TURNS[:2]]
    report = EncodeReport()
    ids = [rid for rid, _ in encode_rows(ds, metaspace_tokenizer, report=report)]
    assert ids == ["a", "b"] and report.skipped == {}


def test_load_conversations_from_a_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [sharegpt(TURNS[:2], id="s")])
    write_jsonl(folder / "part-1.jsonl", [sharegpt(TURNS, id="t")])
    (folder / "README.md").write_text("not data", encoding="utf-8")
    ds = load_conversations(str(folder), cache_dir=str(tmp_path / "cache"))
    assert sorted(ds["id"]) == ["s", "t"]


def test_one_file_may_mix_both_row_formats(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [sharegpt(TURNS, id="s"), openai(TURNS, id="o")])
    ds = load_conversations(str(path), cache_dir=str(tmp_path / "cache"))
    assert [parse_turns(r, r["id"]) for r in ds] == [TURNS, TURNS]


@pytest.mark.parametrize("name", ["missing.json", "missing.parquet", "nowhere/data.jsonl"])
def test_missing_local_file_is_named(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="not found") as info:
        load_conversations(path, cache_dir=str(tmp_path / "cache"))
    assert path in str(info.value)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .json"):
        load_conversations(str(tmp_path), cache_dir=str(tmp_path / "cache"))

"""Byte-prefix projection (`fusion.align.projection`): exact against a brute-force reference from the
source model's full softmax, coverage on every tokenizer pair of the tests, both directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpus import unicode_conversations, write_jsonl

from fusion.align.positions import TokenView, offsets_alignment
from fusion.align.projection import (
    BOUNDARY,
    CLOSING,
    FALLBACK,
    PROJECTED,
    TEMPLATE,
    PieceBytes,
    Projector,
    byte_starts,
    categories,
    project_distribution,
    projection_plan,
)
from fusion.align.vocab_map import vocabulary
from fusion.data.conversations import Turn, render


@pytest.fixture(scope="module")
def tokenizers(metaspace_tokenizer, bytelevel_tokenizer, numeral_tokenizers):
    return {"metaspace": metaspace_tokenizer, "bytelevel": bytelevel_tokenizer,
            "digits-1": numeral_tokenizers[0], "digits-3": numeral_tokenizers[1]}


# every pair of different tokenizers in the tests, both directions (pivot first)
PAIRS = [("metaspace", "bytelevel"), ("bytelevel", "metaspace"), ("digits-1", "digits-3"),
         ("digits-3", "digits-1"), ("metaspace", "digits-3"), ("bytelevel", "digits-1")]


def encode(tokenizer, row: dict, template: str):
    turns = [Turn("user" if t["from"] == "human" else "assistant", t["value"]) for t in row["conversations"]]
    return render(tokenizer, turns, template=template, max_length=4096)


def token_view(enc, vocab) -> TokenView:
    return TokenView(np.asarray(enc.input_ids), np.asarray(enc.loss_mask, dtype=bool),
                     np.asarray(enc.token_offsets).reshape(-1, 2), np.asarray(enc.reply_spans).reshape(-1, 2),
                     vocab.texts)


def starts_in_text(enc, pieces) -> dict[int, tuple[int, int]]:
    """Oracle, from the rendered text itself: trained token → (reply, byte start relative to
    the reply's first byte), each piece checked against the text's bytes where it is read."""
    full = enc.text.encode()
    out: dict[int, tuple[int, int]] = {}
    for r, (a, b) in enumerate(enc.reply_spans):
        start = len(enc.text[:a].encode())
        tokens = [t for t, (s, e) in enumerate(enc.token_offsets)
                  if enc.loss_mask[t] and s < e and (s < b and e > a or e == a)]
        ptr = None
        for t in tokens:
            piece = pieces[enc.input_ids[t]]
            if not piece:
                break  # the closing special token
            if ptr is None:  # the first token may begin in the template text before the reply
                ptr = max(x for x in range(start - len(piece), start + 1) if full[x:x + len(piece)] == piece)
            assert full[ptr:ptr + len(piece)] == piece, (enc.text, t)
            out[t] = (r, ptr - start)
            ptr += len(piece)
    return out


@pytest.mark.parametrize("template", ["own", "shared"])
def test_piece_bytes_spell_every_reply(tokenizers, template):
    rows = unicode_conversations(12)
    for name, tok in tokenizers.items():
        vocab = vocabulary(tok)
        text = PieceBytes.build(vocab.pieces, vocab.byte_piece)
        for row in rows:
            enc = encode(tok, row, template)
            view = token_view(enc, vocab)
            tokens = view.positions + 1
            reply, starts, spelled = byte_starts(view, tokens, text)
            oracle = starts_in_text(enc, vocab.pieces)
            for k, t in enumerate(tokens):
                if int(t) in oracle:
                    assert (reply[k], starts[k]) == oracle[int(t)], (name, row["id"], t)
            for r, (lead, body) in spelled.items():
                a, b = enc.reply_spans[r]
                assert body == enc.text[a:b].encode(), (name, row["id"])
                assert enc.text[:a].encode().endswith(lead)


def plans(tokenizers, pivot: str, source: str, template: str, rows: list[dict]):
    """(plan with projection, plan without, pivot categories) per row."""
    p_tok, s_tok = tokenizers[pivot], tokenizers[source]
    p_voc, s_voc = vocabulary(p_tok), vocabulary(s_tok)
    p_text, s_text = PieceBytes.build(p_voc.pieces, p_voc.byte_piece), PieceBytes.build(s_voc.pieces, s_voc.byte_piece)
    for row in rows:
        pv, sv = token_view(encode(p_tok, row, template), p_voc), token_view(encode(s_tok, row, template), s_voc)
        off = offsets_alignment(pv, sv)
        yield projection_plan(pv, sv, off, p_text, s_text), off, categories(pv, pv.positions + 1)


@pytest.mark.parametrize("pair", PAIRS, ids=["->".join(p) for p in PAIRS])
def test_coverage_on_every_tokenizer_pair(tokenizers, pair):
    """Same template: >= 99% of trained pivot positions get a source distribution. Each
    model under its own template: >= 99% of reply-text and closing positions do."""
    rows = unicode_conversations(24)
    for template in ("shared", "own"):
        on = off = 0
        cats, rules = [], []
        for plan, by_chars, cat in plans(tokenizers, *pair, template, rows):
            on += int((plan.rule != FALLBACK).sum())
            off += int((by_chars >= 0).sum())
            cats.append(cat)
            rules.append(plan.rule)
        cat, rule = np.concatenate(cats), np.concatenate(rules)
        n = len(rule)
        print(f"{pair} {template}: {off / n:.1%} without projection, {on / n:.1%} with "
              f"({(rule == PROJECTED).mean():.1%} projected)")
        assert on > off
        if template == "shared":
            assert on / n >= 0.99
        else:
            assert (rule[cat != TEMPLATE] != FALLBACK).mean() >= 0.99
        assert (rule[cat == CLOSING] == BOUNDARY).all()


def test_projected_distribution_hand_checked():
    # source: 'ab', 'abc', 'a', 'abd', 'x', a special; pivot: 'b', 'bc', 'c', 'd', 'e' and a byte piece 'b'
    src = PieceBytes.build([b"ab", b"abc", b"a", b"abd", b"x", None, b"abde"])
    piv = PieceBytes.build([b"b", b"bc", b"c", b"d", b"e", b"b"], np.array([0, 0, 0, 0, 0, 1], dtype=bool))
    lp = np.log(np.array([0.3, 0.2, 0.1, 0.15, 0.05]))
    src2piv = np.array([0, 1, 2, 3, 4, 4, 4])
    ids, out, surviving, residual = project_distribution(
        np.arange(5), lp, (6, np.log(0.05)), b"a", Projector(src, piv, src2piv), k=4)
    # 'ab'→'b', 'abc'→'bc', 'abd'→'b' (no pivot 'bd'), 'abde'→'b'; 'a' ends at the boundary; 'x' is inconsistent
    assert surviving == 4 and residual == pytest.approx(0.1)
    got = {int(i): float(np.exp(x)) for i, x in zip(ids, out.astype(np.float64), strict=True) if np.isfinite(x)}
    assert got[0] == pytest.approx(0.5 / 0.7, rel=1e-6) and got[1] == pytest.approx(0.2 / 0.7, rel=1e-6)
    assert set(got) == {0, 1}
    # nothing consistent with the prefix: no entries, the caller falls back
    assert project_distribution(np.arange(5), lp, (4, lp[4]), b"q", Projector(src, piv, src2piv), k=4)[2] == 0


# ---------------------------------------------------------------- against the full softmax

STORE_PAIRS = [("metaspace", "bytelevel"), ("bytelevel", "metaspace"), ("digits-1", "digits-3"), ("digits-3", "digits-1")]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizers):
    """Tiny real models, one per tokenizer, and their logit stores under one template: with
    K = the vocabulary size, and with K = 6."""
    from fusechat_merge.demo.toy import make_model
    from fusion.capture.logit_job import LogitJob, generate_logits

    root = tmp_path_factory.mktemp("projection")
    rows = unicode_conversations(12)
    data = write_jsonl(root / "chats.jsonl", rows)
    archs = {"metaspace": "llama", "bytelevel": "qwen2", "digits-1": "mistral", "digits-3": "llama"}
    out: dict = {"root": root, "rows": rows, "models": {}, "stores": {}}
    for seed, (name, tok) in enumerate(tokenizers.items()):
        model = make_model(root / name, archs[name], tokenizer=tok, seed=seed)
        out["models"][name] = model
        for k in (len(tok), 6):
            store = root / f"s-{name}-{k}"
            generate_logits(LogitJob(model=str(model), data=str(data), out=str(store), top_k=k, template="shared",
                                     cache_dir=str(root / "c")), progress=False, log=lambda _: None)
            out["stores"][name, k] = store
    return out


def full_logprobs(model: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        logits = net(torch.as_tensor(ids[None].astype(np.int64))).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def reference(logprobs: np.ndarray, allowed, prefix: bytes, s_voc, p_voc, src2piv) -> dict[int, float]:
    """Brute force: every allowed source token whose bytes start with ``prefix`` and are
    longer, grouped by the longest pivot piece its remainder starts with (a non-byte-fallback
    piece, then the lowest id, among equal ones), renormalised."""
    mass: dict[int, float] = {}
    for v in allowed:
        piece = s_voc.pieces[v]
        if not piece or not piece.startswith(prefix) or len(piece) == len(prefix):
            continue
        rest = piece[len(prefix):]
        options = [t for t, q in enumerate(p_voc.pieces) if q and rest.startswith(q)]
        target = (min(options, key=lambda t: (-len(p_voc.pieces[t]), bool(p_voc.byte_piece[t]), t))
                  if options else int(src2piv[v]))
        mass[target] = mass.get(target, 0.0) + float(np.exp(logprobs[v]))
    total = sum(mass.values())
    return {t: m / total for t, m in mass.items()}


@pytest.mark.parametrize("pair", STORE_PAIRS, ids=["->".join(p) for p in STORE_PAIRS])
def test_projection_equals_the_full_softmax_reference(scored, pair, tmp_path):
    from transformers import AutoTokenizer

    from fusion.align.job import StoreAlignment, align_stores
    from fusion.artifacts.aligned_store import AlignedStore
    from fusion.artifacts.logit_store import LogitStore
    from fusion.artifacts.vocab_map_file import VocabMap

    pivot, source = pair
    # as the stages load them (a qwen2 model's tokenizer loads as Qwen2's, which splits digits)
    p_tok, s_tok = (AutoTokenizer.from_pretrained(scored["models"][name]) for name in pair)
    p_voc, s_voc = vocabulary(p_tok), vocabulary(s_tok)
    p_text, s_text = PieceBytes.build(p_voc.pieces, p_voc.byte_piece), PieceBytes.build(s_voc.pieces, s_voc.byte_piece)
    checked = {"exact": 0, "top-k": 0}
    for k in (len(s_tok), 6):
        out = tmp_path / f"a-{k}"
        manifest = align_stores(StoreAlignment(pivot=str(scored["stores"][pivot, len(p_tok) if k > 6 else 6]),
                                         source=str(scored["stores"][source, k]), out=str(out)),
                                progress=False, log=lambda _: None)
        stats = manifest.alignment["statistics"]
        assert stats["aligned_fraction"] >= 0.99, stats  # one template for both: coverage
        assert stats["rules"]["projected"] > 0
        aligned, src_store = AlignedStore(out), LogitStore(scored["stores"][source, k])
        src2piv = VocabMap.load(out / "vocab_map.json", source_fingerprint=src_store.options.tokenizer_fingerprint,
                                pivot_fingerprint=aligned.options.tokenizer_fingerprint).src2piv
        for n, row in enumerate(scored["rows"]):
            seq, s_seq = aligned.aligned(n), src_store[n]
            p_enc, s_enc = encode(p_tok, row, "shared"), encode(s_tok, row, "shared")
            assert list(seq.pivot.input_ids) == p_enc.input_ids
            p_at, s_at = starts_in_text(p_enc, p_voc.pieces), starts_in_text(s_enc, s_voc.pieces)
            by_start = {v: t for t, v in s_at.items()}
            logprobs = full_logprobs(scored["models"][source], s_seq.input_ids)
            for j, t in enumerate(seq.pivot.positions + 1):
                if int(t) not in p_at:
                    continue  # the closing token: the character-span rule
                r, start = p_at[int(t)]
                covering = [u for (rr, b), u in by_start.items()
                            if rr == r and b < start < b + len(s_voc.pieces[s_enc.input_ids[u]])]
                if (r, start) in by_start:
                    assert seq.src_rule[j] == BOUNDARY
                    continue
                assert len(covering) == 1 and seq.src_rule[j] == PROJECTED, (row["id"], t)
                u = covering[0]
                emitted = s_enc.input_ids[u]
                prefix = s_voc.pieces[emitted][: start - s_at[u][1]]
                lp = logprobs[u - 1]
                got = {int(i): float(np.exp(x)) for i, x in zip(seq.src_topk_ids[j], seq.src_topk_logprobs[j].astype(np.float64), strict=True) if np.isfinite(x)}
                if k > 6:
                    want = reference(lp, range(len(s_tok)), prefix, s_voc, p_voc, src2piv)
                    # the pure function on the full softmax: exact
                    ids, out_lp, _, _ = project_distribution(np.arange(len(s_tok)), lp, (emitted, lp[emitted]), prefix,
                                                             Projector(s_text, p_text, src2piv), len(p_tok))
                    exact = {int(i): float(np.exp(x)) for i, x in zip(ids, out_lp.astype(np.float64), strict=True) if np.isfinite(x)}
                    assert exact.keys() == want.keys()
                    assert max(abs(exact[i] - want[i]) for i in want) < 1e-5
                    checked["exact"] += 1
                else:  # the reference restricted to what the store kept: top-K plus the emitted token
                    row_index = list(s_seq.positions).index(u - 1)
                    want = reference(lp, {*s_seq.topk_ids[row_index].tolist(), emitted}, prefix, s_voc, p_voc, src2piv)
                    checked["top-k"] += 1
                # the stored distribution (float16 log-probabilities)
                assert got.keys() == want.keys(), (row["id"], t)
                assert max(abs(got[i] - want[i]) for i in want) < 2e-3
    print(pair, checked)
    assert checked["exact"] > 5 and checked["top-k"] > 5


def synthetic_row(tokenizer, row: dict, k: int, seed: int):
    """A logit-store row of ``row`` under the tokenizer's own template, with top-K lists of
    the actual next token (probability 0.6) and random other ids (what alignment reads)."""
    from fusion.artifacts.logit_store import SequenceLogits

    enc = encode(tokenizer, row, "own")
    ids, mask = np.asarray(enc.input_ids), np.asarray(enc.loss_mask, dtype=bool)
    pos = np.flatnonzero(mask[1:])
    rng = np.random.default_rng(seed)
    top = np.stack([rng.choice(len(tokenizer), k, replace=False) for _ in pos])
    for r, t in enumerate(pos):  # the actual next token first, once
        top[r] = [ids[t + 1], *[v for v in top[r] if v != ids[t + 1]][: k - 1]]
    lps = np.log(np.r_[0.6, np.full(k - 1, 0.4 / (k - 1))])[None].repeat(len(pos), 0)
    return SequenceLogits(row["id"], ids, mask, np.asarray(enc.token_offsets, dtype=np.int32).reshape(-1, 2),
                          np.asarray(enc.reply_spans, dtype=np.int32).reshape(-1, 2), top,
                          lps.astype(np.float16), lps[:, 0].astype(np.float32), 1.0)


def test_the_closing_token_pairs_with_the_sources_own_end_of_turn(metaspace_tokenizer):
    """A ChatML source whose eos is not its closing '<|im_end|>' (as Llama-3's '<|eot_id|>'):
    its closing distribution still predicts the pivot's '</s>', although the vocabulary map
    sends '<|im_end|>' elsewhere."""
    from fusechat_merge.demo.toy import byte_level_tokenizer
    from fusion.align.job import Tokenizers, align_sequence
    from fusion.align.projection import boundary_plan
    from fusion.align.vocab_map import build_vocab_map

    source = byte_level_tokenizer()
    source.eos_token = "<|endoftext|>"
    source.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    closing = source.convert_tokens_to_ids("<|im_end|>")
    p_voc, s_voc = vocabulary(metaspace_tokenizer), vocabulary(source)
    src2piv = build_vocab_map(s_voc, p_voc, mode="em").src2piv
    assert src2piv[closing] != metaspace_tokenizer.eos_token_id
    row = unicode_conversations(1)[0]
    p_seq, s_seq = synthetic_row(metaspace_tokenizer, row, 6, 0), synthetic_row(source, row, 6, 1)
    projector = Projector(PieceBytes.build(s_voc.pieces, s_voc.byte_piece),
                          PieceBytes.build(p_voc.pieces, p_voc.byte_piece), src2piv)
    columns, stats = align_sequence(
        p_seq, s_seq, src2piv, 6, lambda p, s: projection_plan(p, s, offsets_alignment(p, s), projector.pivot,
                                                               projector.source),
        Tokenizers((p_voc.texts, s_voc.texts), projector))
    cat = categories(token_view(encode(metaspace_tokenizer, row, "own"), p_voc), p_seq.positions + 1)
    ids = columns["src_topk_ids"].reshape(-1, 6)
    lps = columns["src_topk_logprobs"].reshape(-1, 6).astype(np.float64)
    assert (cat == CLOSING).sum() == 2 and (columns["src_rule"][cat == CLOSING] == BOUNDARY).all()
    for j in np.flatnonzero(cat == CLOSING):
        assert ids[j, 0] == metaspace_tokenizer.eos_token_id and np.exp(lps[j, 0]) == pytest.approx(0.6, abs=1e-3)
    assert stats.counts[CLOSING].sum() == 2
    assert boundary_plan(np.array([-1, 3])).rule.tolist() == [FALLBACK, BOUNDARY]

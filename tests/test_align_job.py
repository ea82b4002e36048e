"""`fusechat-merge align` end to end on stores of two models with different tokenizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import conversations, write_jsonl

from fusion.align.job import StoreAlignment, align_stores
from fusion.artifacts.aligned_store import AlignedStore
from fusion.artifacts.logit_store import LogitStore
from fusion.artifacts.records import StoreError
from fusion.capture.logit_job import LogitJob, generate_logits


def make_store(model: Path, data: Path, out: Path, **kw) -> LogitStore:
    job = LogitJob(model=str(model), data=str(data), out=str(out), top_k=6, cache_dir=str(out.parent / "c"), **kw)
    generate_logits(job, progress=False, log=lambda _: None)
    return LogitStore(out)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer):
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("align")
    data = write_jsonl(root / "chats.jsonl", conversations(10))
    pivot = make_model(root / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    source = make_model(root / "source", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    twin = make_model(root / "twin", "mistral", tokenizer=metaspace_tokenizer, seed=3)
    return {
        "root": root,
        "data": data,
        "pivot": make_store(pivot, data, root / "s-pivot", rows_per_shard=4),
        "source": make_store(source, data, root / "s-source"),
        "twin": make_store(twin, data, root / "s-twin"),
    }


def test_offsets_alignment_end_to_end(stores, tmp_path):
    manifest = align_stores(
        StoreAlignment(pivot=str(stores["pivot"].path), source=str(stores["source"].path), out=str(tmp_path / "a")),
        progress=False, log=lambda _: None,
    )
    stats = manifest.alignment["statistics"]
    assert 0.3 < stats["aligned_fraction"] <= 1.0
    assert stats["fallback_fraction"] == pytest.approx(1 - stats["aligned_fraction"])
    assert 1 <= stats["mean_entries_kept"] <= 6
    aligned = AlignedStore(tmp_path / "a")
    pivot = stores["pivot"]
    assert len(aligned) == len(pivot) and aligned.manifest.shards[0]["sequences"] == 4
    for i in range(len(aligned)):
        seq = aligned.aligned(i)
        p = pivot[i]
        assert np.array_equal(seq.pivot.topk_ids, p.topk_ids) and seq.pivot.seq_ce == p.seq_ce
        assert seq.src_seq_ce == pytest.approx(stores["source"][i].seq_ce)
        probs = np.exp(seq.src_topk_logprobs.astype(np.float64))
        sums = probs.sum(axis=1)
        assert np.allclose(sums[seq.src_aligned], 1.0, atol=5e-3)  # float16 storage
        assert (sums[~seq.src_aligned] == 0).all()
        assert np.isnan(seq.src_target_logprobs[~seq.src_aligned]).all()
    assert (tmp_path / "a" / "vocab_map.json").exists()


def test_same_tokenizer_source_is_copied_through(stores, tmp_path):
    manifest = align_stores(
        StoreAlignment(pivot=str(stores["pivot"].path), source=str(stores["twin"].path), out=str(tmp_path / "a")),
        progress=False, log=lambda _: None,
    )
    assert manifest.alignment["same_vocabulary"] and manifest.alignment["statistics"]["aligned_fraction"] == 1.0
    aligned, twin = AlignedStore(tmp_path / "a"), stores["twin"]
    for i in range(len(aligned)):
        seq = aligned.aligned(i)
        src = twin[i]
        assert np.array_equal(seq.src_topk_ids, src.topk_ids)
        raw = src.topk_logprobs.astype(np.float64)
        renormalised = raw - np.logaddexp.reduce(raw, axis=1, keepdims=True)
        np.testing.assert_allclose(seq.src_topk_logprobs.astype(np.float64), renormalised, atol=5e-3)


def test_mismatched_stores_name_the_first_difference(stores, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", conversations(12)[2:])
    shifted = make_store(Path(stores["source"].options.model), other, tmp_path / "shifted")
    with pytest.raises(StoreError, match="sequence 0: pivot has id 'conv-0', source has 'conv-2'"):
        align_stores(StoreAlignment(pivot=str(stores["pivot"].path), source=str(shifted.path), out=str(tmp_path / "x")),
                     progress=False, log=lambda _: None)


def test_align_cli_and_vocab_map_reuse(stores, tmp_path):
    from fusechat_merge.cli import main

    args = ["align", "--pivot", str(stores["pivot"].path), "--source", str(stores["source"].path)]
    first = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "positions aligned" in first.output
    vmap = tmp_path / "a" / "vocab_map.json"
    second = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--vocab-map", str(vmap)])
    assert second.exit_code == 0, second.output
    a, b = AlignedStore(tmp_path / "a"), AlignedStore(tmp_path / "b")
    assert all(np.array_equal(a.aligned(i).src_topk_ids, b.aligned(i).src_topk_ids) for i in range(len(a)))
    assert "projected" in first.output and a.manifest.alignment["projection"] == "on"
    off = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "d"), "--projection", "off"])
    assert off.exit_code == 0, off.output
    assert AlignedStore(tmp_path / "d").manifest.alignment["projection"] == "off"
    # a map made for other tokenizers is refused
    swapped = CliRunner().invoke(main, ["align", "--pivot", str(stores["source"].path), "--source",
                                        str(stores["pivot"].path), "--out", str(tmp_path / "c"),
                                        "--vocab-map", str(vmap)])
    assert swapped.exit_code != 0 and "vocab_map.json" in swapped.output


def test_dtw_method_end_to_end_and_agreement_with_offsets(stores, tmp_path):
    from fusion.align.job import load_tokenizer
    from fusion.align.positions import TokenView, dtw_alignment, offsets_alignment
    from fusion.align.vocab_map import piece_texts

    for method in ("offsets", "dtw"):
        align_stores(StoreAlignment(pivot=str(stores["pivot"].path), source=str(stores["source"].path),
                              out=str(tmp_path / method), method=method), progress=False, log=lambda _: None)
    by_dtw = AlignedStore(tmp_path / "dtw")
    assert by_dtw.manifest.alignment["method"] == "dtw"
    assert by_dtw.manifest.alignment["statistics"]["aligned_fraction"] > 0.3

    piv_tok, src_tok = load_tokenizer(stores["pivot"]), load_tokenizer(stores["source"])
    piv_texts, src_texts = piece_texts(piv_tok), piece_texts(src_tok)
    agree = total = 0
    for p, s in zip(stores["pivot"], stores["source"], strict=True):
        pv = TokenView(p.input_ids, p.loss_mask, p.token_offsets, p.reply_spans)
        sv = TokenView(s.input_ids, s.loss_mask, s.token_offsets, s.reply_spans)
        a = offsets_alignment(pv, sv)
        b = dtw_alignment(pv, sv, piv_texts, src_texts, pivot_marker=" ", source_marker=" ")
        # DTW never invents a pair that the exact offsets reject as starting elsewhere
        both = (a >= 0) & (b >= 0)
        assert (a[both] == b[both]).mean() > 0.9
        agree += int((a == b).sum())
        total += len(a)
    print(f"offsets and dtw agree on {agree / total:.1%} of {total} pivot positions")
    assert agree / total > 0.7


def test_projection_off_keeps_the_character_rule(stores, tmp_path):
    from fusion.align.projection import BOUNDARY, FALLBACK

    def run(out: Path, **kw):
        return align_stores(StoreAlignment(pivot=str(stores["pivot"].path), source=str(stores["source"].path),
                                     out=str(out), **kw), progress=False, log=lambda _: None)

    on, off = run(tmp_path / "on"), run(tmp_path / "off", projection="off")
    s_on, s_off = on.alignment["statistics"], off.alignment["statistics"]
    assert off.alignment["projection"] == "off" and s_off["rules"]["projected"] == 0
    assert s_on["rules"]["projected"] > 0 and s_on["aligned_fraction"] > s_off["aligned_fraction"]
    by_on, by_off = AlignedStore(tmp_path / "on"), AlignedStore(tmp_path / "off")
    for i in range(len(by_off)):
        a, b = by_on.aligned(i), by_off.aligned(i)
        assert set(np.unique(b.src_rule)) <= {FALLBACK, BOUNDARY}
        assert np.array_equal(b.src_aligned, b.src_rule == BOUNDARY)
        both = (a.src_rule == BOUNDARY) & (b.src_rule == BOUNDARY)  # the same pairs give the same targets
        assert np.array_equal(a.src_topk_ids[both], b.src_topk_ids[both])


def test_resume_reads_the_statistics_kept_with_each_shard(stores, tmp_path, monkeypatch):
    """A resumed run aligns only the missing shards (statistics come from the finished ones)
    and reads each tokenizer's vocabulary once per run."""
    import fusion.align.job as align_job
    import fusion.align.vocab_map as vocab_map

    calls = {"aligned": 0, "vocabulary": 0}

    def counted(name: str, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(align_job, "align_sequence", counted("aligned", align_job.align_sequence))
    monkeypatch.setattr(vocab_map, "vocabulary", counted("vocabulary", vocab_map.vocabulary))
    job = StoreAlignment(pivot=str(stores["pivot"].path), source=str(stores["source"].path), out=str(tmp_path / "a"))
    first = align_stores(job, progress=False, log=lambda _: None)
    assert calls == {"aligned": len(stores["pivot"]), "vocabulary": 2}
    shards = sorted((tmp_path / "a").glob("shard-*.arrow"))
    kept = {p.name: p.read_bytes() for p in shards[:-1]}
    (tmp_path / "a" / "manifest.json").unlink()  # as if killed after all but the last shard
    shards[-1].unlink()
    calls.update(aligned=0, vocabulary=0)
    second = align_stores(job, progress=False, log=lambda _: None)
    assert calls == {"aligned": second.shards[-1]["sequences"], "vocabulary": 2}
    assert second.alignment["statistics"] == first.alignment["statistics"]
    assert all((tmp_path / "a" / name).read_bytes() == data for name, data in kept.items())


def test_a_store_without_rules_reads_its_aligned_flags_as_rules():
    from fusion.align.projection import BOUNDARY, FALLBACK
    from fusion.artifacts.aligned_store import rules_of

    assert rules_of({"src_aligned": np.array([True, False])}).tolist() == [BOUNDARY, FALLBACK]
    assert rules_of({"src_rule": np.array([2, 0]), "src_aligned": np.array([True, False])}).tolist() == [2, 0]


def test_a_batch_read_equals_reading_each_row(stores, tmp_path):
    """`AlignedStore.aligned_many` and `FusionDataset.__getitems__` (what torch's DataLoader
    calls for a batch) give exactly what reading each row does: same arrays, dtypes, values,
    across a shard boundary (the pivot store has 4 rows a shard) and in any order."""
    import dataclasses

    import torch

    from fusion.train.data import FusionCollator, FusionDataset

    out = tmp_path / "a"
    align_stores(StoreAlignment(pivot=str(stores["pivot"].path), source=str(stores["source"].path), out=str(out)),
                 progress=False, log=lambda _: None)
    store = AlignedStore(out)
    indices = [7, 0, 3, 4, 9, 4]
    for one, many in zip([store.aligned(i) for i in indices], store.aligned_many(indices), strict=True):
        for field in dataclasses.fields(one):
            a, b = getattr(one, field.name), getattr(many, field.name)
            if field.name == "pivot":
                for pf in dataclasses.fields(a):
                    x, y = getattr(a, pf.name), getattr(b, pf.name)
                    assert type(x) is type(y) and np.array_equal(np.asarray(x), np.asarray(y)), pf.name
                    assert np.asarray(x).dtype == np.asarray(y).dtype, pf.name
            else:
                assert type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype, field.name
                assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f"), field.name
    assert store.aligned_many([]) == []

    dataset = FusionDataset([out, out])
    for one, many in zip([dataset[i] for i in indices], dataset.__getitems__(indices), strict=True):
        assert one.keys() == many.keys()
        for key in one:
            assert one[key].dtype == many[key].dtype and np.array_equal(one[key], many[key], equal_nan=True), key
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=FusionCollator())
    by_rows = FusionCollator()([dataset[i] for i in range(4)])
    first = next(iter(loader))
    for key, value in by_rows.items():
        assert torch.equal(value.nan_to_num(), first[key].nan_to_num()), key

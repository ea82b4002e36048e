"""The logit store format: a round trip is exact, ids take the smallest exact type, and an
unfinished or foreign store is refused with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion.artifacts.lifecycle import writing
from fusion.artifacts.logit_store import (
    MANIFEST,
    LogitStore,
    SequenceLogits,
    StoreOptions,
    finish_run,
    id_type_for,
    store_output,
    write_shard,
)
from fusion.artifacts.records import StoreError
from fusion.data.conversations import trained_positions


def begin_run(out, options: StoreOptions, overwrite: bool = False) -> None:
    """What a scoring run does before its first shard: the store's lifecycle up to its record."""
    from dataclasses import asdict

    with writing(store_output(out, asdict(options)), overwrite=overwrite):
        pass


def test_ids_use_uint16_exactly_while_they_fit():
    assert id_type_for(65_536) == "uint16" and id_type_for(65_537) == "uint32"


def test_trained_positions_predict_the_trained_tokens():
    assert trained_positions([False, False, True, True, False, True]).tolist() == [1, 2, 4]


def test_an_unfinished_store_says_how_to_resume(tmp_path):
    options = StoreOptions("m", "fp", 100, "own", 4, 16, "hf", "float32", "d")
    begin_run(tmp_path / "s", options)
    with pytest.raises(StoreError, match="unfinished run: run the same command again"):
        LogitStore(tmp_path / "s")


def test_a_newer_format_is_refused(tmp_path):
    options = StoreOptions("m", "fp", 100, "own", 4, 16, "hf", "float32", "d")
    out = tmp_path / "s"
    begin_run(out, options)
    finish_run(out, options, {})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="not readable by this version"):
        LogitStore(out)


def one_record() -> SequenceLogits:
    mask = np.array([False, True, True])
    return SequenceLogits("r0", np.array([1, 2, 3]), mask, np.zeros((3, 2), np.int32), np.array([[0, 3]]),
                          np.zeros((2, 4), np.int64), np.zeros((2, 4), np.float16), np.zeros(2, np.float32),
                          0.5, text_sha1="abc")


def test_a_resumed_run_with_other_options_names_them(tmp_path):
    out = tmp_path / "s"
    options = StoreOptions("m", "fp", 100, "own", 4, 16, "hf", "float32", "d", model_fingerprint="w1")
    begin_run(out, options)
    write_shard(out / "shard-00000.arrow", [one_record()], options.id_type)
    changed = StoreOptions("m", "fp", 100, "own", 8, 16, "hf", "float32", "d", model_fingerprint="w2")
    with pytest.raises(StoreError, match="top_k: 4 then, 8 now") as err:
        begin_run(out, changed)
    assert "model weights or config changed since this store was started" in str(err.value)
    assert "--overwrite" in str(err.value)
    begin_run(out, changed, overwrite=True)  # our own run: replaced
    assert not list(out.glob("shard-*")) and json.loads((out / "run.json").read_text())["top_k"] == 8


def test_a_run_that_wrote_no_shard_does_not_lock_its_options(tmp_path):
    out = tmp_path / "s"
    begin_run(out, StoreOptions("m", "fp", 100, "own", 4, 16, "hf", "float32", "d"))
    begin_run(out, StoreOptions("m", "fp", 100, "own", 8, 16, "hf", "float32", "d"))
    assert json.loads((out / "run.json").read_text())["top_k"] == 8


def test_overwrite_never_deletes_a_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not an output of this tool"):
        begin_run(out, StoreOptions("m", "fp", 100, "own", 4, 16, "hf", "float32", "d"), overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_row_fingerprints_round_trip_and_a_v1_store_still_reads(tmp_path):
    import pyarrow as pa

    options = StoreOptions("m", "fp", 100, "own", 4, 16, "hf", "float32", "d")
    out = tmp_path / "s"
    begin_run(out, options)
    write_shard(out / "shard-00000.arrow", [one_record()], options.id_type)
    finish_run(out, options, {})
    assert LogitStore(out).row_fingerprints() == ["abc"] and LogitStore(out).has_row_fingerprints
    # a version-1 store: no text_sha1 column
    shard = out / "shard-00000.arrow"
    with pa.memory_map(str(shard)) as source:
        table = pa.ipc.open_stream(source).read_all().drop_columns(["text_sha1"])
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    finish_run(out, options, {})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    old = LogitStore(out)
    assert old[0].text_sha1 == "" and not old.has_row_fingerprints and old.row_fingerprints() == [""]


def test_round_trip_of_the_store(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        t = 7 + i
        mask = np.array([False] * 3 + [True] * (t - 3))
        p = int(mask[1:].sum())
        records.append(
            SequenceLogits(
                id=f"r{i}",
                input_ids=rng.integers(0, 70_000, t),
                loss_mask=mask,
                token_offsets=rng.integers(0, 100, (t, 2)).astype(np.int32),
                reply_spans=np.array([[3, 40]], dtype=np.int32),
                topk_ids=rng.integers(0, 70_000, (p, 4)),
                topk_logprobs=-rng.random((p, 4)).astype(np.float16),
                target_logprobs=-rng.random(p).astype(np.float32),
                seq_ce=1.5 + i,
            )
        )

    options = StoreOptions("m", "fp", 70_000, "own", 4, 16, "hf", "float32", "d")
    out = tmp_path / "store"
    begin_run(out, options)
    write_shard(out / "shard-00000.arrow", records, options.id_type)
    finish_run(out, options, {"x": "why"})
    store = LogitStore(out)
    assert options.id_type == "uint32" and len(store) == 3 and store.manifest.skipped == {"x": "why"}
    for a, b in zip(records, store, strict=True):
        assert a.id == b.id and a.seq_ce == b.seq_ce
        for name in ("input_ids", "loss_mask", "token_offsets", "reply_spans", "topk_ids",
                     "topk_logprobs", "target_logprobs"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name

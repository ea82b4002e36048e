"""Fusion training end to end on tiny models: it learns from the source, resumes, merges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import TrainerCallback

from fusion.align.job import StoreAlignment, align_stores
from fusion.artifacts.aligned_store import AlignedStore
from fusion.capture.logit_job import LogitJob, generate_logits
from fusion.train.config import fusion_config
from fusion.train.trainer import train_fusion


def reverse_task(n: int, seed: int) -> list[dict]:
    """A skill the random pivot lacks: reverse a short word."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefgh")
    rows = []
    for i in range(n):
        word = "".join(rng.choice(letters, size=int(rng.integers(3, 6))))
        rows.append({"id": f"r{seed}-{i}", "messages": [
            {"role": "user", "content": f"reverse {word}"},
            {"role": "assistant", "content": " ".join(word[::-1])},
        ]})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def score(model: Path, data: Path, out: Path) -> Path:
    generate_logits(LogitJob(model=str(model), data=str(data), out=str(out), cache_dir=str(out.parent / "cache")),
                    progress=False, log=lambda _: None)
    return out


def align(pivot: Path, source: Path, out: Path) -> Path:
    align_stores(StoreAlignment(pivot=str(pivot), source=str(source), out=str(out)), progress=False, log=lambda _: None)
    return out


def train(pivot: Path, aligned: list[Path], out: Path, **kw) -> Path:
    defaults = {"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "seed": 0,
                "save_strategy": "no", "lr_scheduler_type": "constant", "disable_tqdm": True}
    config = fusion_config(out, **{**defaults, **kw})
    return train_fusion(str(pivot), [str(a) for a in aligned], out, config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer):
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("fuse")
    train_data = write(root / "train.jsonl", reverse_task(48, 0))
    held_out = write(root / "held.jsonl", reverse_task(16, 1))
    pivot = make_model(root / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    source0 = make_model(root / "source0", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    # teach the source the skill: plain CLM (λ = 1) on its own store, through our trainer
    own = score(source0, train_data, root / "s-source0")
    self_aligned = align(own, own, root / "a-source0")
    source = train(source0, [self_aligned], root / "source", lm_weight=1.0, max_steps=80, learning_rate=5e-3)
    return {"root": root, "train": train_data, "held": held_out, "pivot": pivot, "source": source,
            "s-pivot": score(pivot, train_data, root / "s-pivot"),
            "s-source": score(source, train_data, root / "s-source")}


def kl_to_source(model_dir: Path, aligned: Path) -> tuple[float, float]:
    """Mean KL(source top-K ‖ model) over aligned positions, and the model's CLM loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    store = AlignedStore(aligned)
    kls, nll = [], []
    for i in range(len(store)):
        seq = store.aligned(i)
        ids = torch.from_numpy(seq.pivot.input_ids.astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        pos = torch.from_numpy(seq.pivot.positions)
        nll.append(-logp[pos, ids[0, pos + 1]].mean().item())
        ok = seq.src_aligned
        q_lp = torch.from_numpy(seq.src_topk_logprobs[ok].astype(np.float32))
        q = torch.exp(q_lp)
        p = logp[pos[torch.from_numpy(ok)]].gather(1, torch.from_numpy(seq.src_topk_ids[ok].astype(np.int64)))
        kls.append(torch.where(q > 0, q * (q_lp - p), torch.zeros_like(q)).sum(-1).mean().item())
    return float(np.mean(kls)), float(np.mean(nll))


def test_target_moves_towards_the_source_on_held_out_text(setup):
    root = setup["root"]
    aligned = align(setup["s-pivot"], setup["s-source"], root / "aligned")
    target = train(setup["pivot"], [aligned], root / "target", max_steps=40)
    held_piv = score(setup["pivot"], setup["held"], root / "h-pivot")
    held_src = score(setup["source"], setup["held"], root / "h-source")
    held = align(held_piv, held_src, root / "h-aligned")
    kl_before, nll_before = kl_to_source(setup["pivot"], held)
    kl_after, nll_after = kl_to_source(target, held)
    print(f"held-out KL(source ‖ model): pivot {kl_before:.3f} → target {kl_after:.3f}; "
          f"CLM {nll_before:.3f} → {nll_after:.3f}")
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert nll_after < nll_before  # the CLM loss stays in bounds (here it also improves)


def test_loss_falls_and_parts_are_logged(setup, tmp_path):
    aligned = align(setup["s-pivot"], setup["s-source"], tmp_path / "aligned")
    history: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            history.append(dict(logs or {}))

    config = fusion_config(tmp_path / "t", max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3,
                           save_strategy="no", disable_tqdm=True)
    train_fusion(str(setup["pivot"]), [str(aligned)], tmp_path / "t", config, callbacks=[Keep()])
    losses = [h["loss"] for h in history if "loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all("clm_loss" in h and "fuse_loss" in h for h in history if "loss" in h)
    logged = [h for h in history if "fuse_grad_share" in h]
    assert logged and all(0 < h["fuse_grad_share"] < 1 and -1 <= h["grad_cosine"] <= 1 for h in logged)
    assert len(logged) == len(losses)  # measured on every step that is logged


def test_gradients_are_measured_only_on_the_steps_that_are_logged():
    from fusion.train.trainer import logs_after_step

    # logging_steps 5: the Trainer logs after steps 5, 10, …, i.e. during global_step 4, 9, …
    assert [s for s in range(12) if logs_after_step(s, 5, "steps")] == [4, 9]
    assert all(logs_after_step(s, 5, "epoch") for s in range(3))  # not by steps: every step
    assert all(logs_after_step(s, 1, "steps") for s in range(3))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def test_resume_from_a_checkpoint_continues_the_same_run(setup, tmp_path):
    aligned = align(setup["s-pivot"], setup["s-source"], tmp_path / "aligned")
    kw = {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "seed": 0,
          "save_strategy": "steps", "save_steps": 3, "disable_tqdm": True}
    whole = train_fusion(str(setup["pivot"]), [str(aligned)], tmp_path / "whole", fusion_config(tmp_path / "whole", **kw))
    cut = tmp_path / "cut"
    train_fusion(str(setup["pivot"]), [str(aligned)], cut, fusion_config(cut, **kw), callbacks=[StopAt(3)])
    assert (cut / "checkpoints" / "checkpoint-3").is_dir()
    train_fusion(str(setup["pivot"]), [str(aligned)], cut, fusion_config(cut, **kw), resume=True)
    state = json.loads((cut / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_targets_load_and_merge_with_fusechat_sce(setup, tmp_path):
    from helpers import assert_loads_and_runs, sce_recipe, write_recipe

    from fusechat_merge.cli import main

    aligned = align(setup["s-pivot"], setup["s-source"], tmp_path / "aligned")
    targets = [train(setup["pivot"], [aligned], tmp_path / f"t{i}", max_steps=5, seed=i, learning_rate=1e-3 * (i + 1))
               for i in range(2)]
    for t in targets:
        assert_loads_and_runs(t)
    recipe = write_recipe(tmp_path / "merge.yaml", sce_recipe([setup["pivot"], *targets], select_topk=0.5))
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "merged"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert_loads_and_runs(tmp_path / "merged")


def test_stores_for_another_pivot_are_refused_before_training(setup, tmp_path):
    from fusechat_merge.cli import main

    aligned = align(setup["s-pivot"], setup["s-source"], tmp_path / "aligned")
    result = CliRunner().invoke(main, ["fuse", "--pivot", str(setup["source"]), "--aligned", str(aligned),
                                       "--out", str(tmp_path / "x"), "--max-steps", "2"])
    assert result.exit_code != 0 and "another pivot tokenizer" in result.output
    assert not (tmp_path / "x" / "config.json").exists()


def test_fuse_cli_takes_training_arguments(setup, tmp_path):
    from fusechat_merge.cli import main

    aligned = align(setup["s-pivot"], setup["s-source"], tmp_path / "aligned")
    result = CliRunner().invoke(main, ["fuse", "--pivot", str(setup["pivot"]), "--aligned", str(aligned),
                                       "--out", str(tmp_path / "t"), "--max-steps", "2", "--learning-rate", "1e-3",
                                       "--per-device-train-batch-size", "4", "--lambda", "0.5",
                                       "--fusion", "token-mince", "--loss-type", "kl", "--disable-tqdm", "true"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    args = torch.load(tmp_path / "t" / "training_args.bin", weights_only=False)
    assert (args.max_steps, args.learning_rate, args.lm_weight, args.fusion, args.fuse_loss_type) == \
        (2, 1e-3, 0.5, "token-mince", "kl")
    bad = CliRunner().invoke(main, ["fuse", "--pivot", str(setup["pivot"]), "--aligned", str(aligned),
                                    "--out", str(tmp_path / "u"), "--no-such-option", "1"])
    assert bad.exit_code != 0 and "--no-such-option" in bad.output


def test_padded_model_vocabulary_trains(setup, tmp_path, metaspace_tokenizer):
    """config.vocab_size larger than the tokenizer (as Qwen pads to 151936)."""
    from fusechat_merge.demo.toy import make_model

    pivot = make_model(tmp_path / "padded", "llama", tokenizer=metaspace_tokenizer, seed=4)
    cfg = json.loads((pivot / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pivot)
    model.resize_token_embeddings(cfg["vocab_size"] + 13)
    model.save_pretrained(pivot)
    store = score(pivot, setup["train"], tmp_path / "s")
    aligned = align(store, setup["s-source"], tmp_path / "a")
    out = train(pivot, [aligned], tmp_path / "t", max_steps=3)
    assert (out / "config.json").exists()


def test_fusechat_7b_training_recipe_parses(tmp_path):
    import yaml
    from transformers import HfArgumentParser

    from fusion.train.config import FusionConfig

    recipe = Path(__file__).parent.parent / "recipes" / "fusechat-7b-fuse.yaml"
    values = yaml.safe_load(recipe.read_text())
    # bf16/tf32 need a GPU; everything else must be a valid FusionConfig field and value
    values.update(bf16=False, tf32=False)
    (config,) = HfArgumentParser(FusionConfig).parse_dict({"output_dir": str(tmp_path), **values})
    assert (config.lm_weight, config.learning_rate, config.num_train_epochs, config.warmup_steps) == \
        (0.9, 5e-6, 3, 0.03)
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 8 == 128

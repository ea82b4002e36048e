"""The memory estimate of a fuse stage (`fusechat_merge.pipeline.memory.training_estimate`)
against the peak measured on CPU, for Llama-style models of about 10M parameters and more.

Each case runs in a fresh process: the torch, transformers and accelerate imports, then the
model in float32, AdamW and a few training steps on ``batch × seq`` tokens (causal-LM loss,
the logits in float32), with or without gradient checkpointing; the measured figure is the
peak RSS (``ru_maxrss``) minus the RSS before the model was built. Prints, per case, the
estimate, the measurement and their ratio.

    .venv/bin/python benchmarks/bench_memory_estimate.py            # 10M, 40M, 110M
    .venv/bin/python benchmarks/bench_memory_estimate.py --case 10M --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# name: (hidden, layers, intermediate, vocab, batch, seq)
CASES = {
    "10M": (256, 4, 768, 16000, 4, 256),
    "40M": (512, 6, 1536, 32000, 4, 256),
    "110M": (768, 12, 2304, 32000, 4, 256),
}


def measure(case: str, checkpointing: bool) -> dict:
    """Run in this process (a fresh one): the measured peak and the estimate of one case."""
    import resource
    import tempfile
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusechat_merge.pipeline.memory import Sharding, model_shape, training_estimate

    torch.set_num_threads(1)
    hidden, layers, intermediate, vocab, batch, seq = CASES[case]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    # A folder of this run's own: a fixed /tmp path collides with other runs and other users'.
    with tempfile.TemporaryDirectory(prefix=f"bench-memory-{case}-") as folder:
        config.save_pretrained(folder)
        shape = model_shape(folder)
    settings = {"per_device_train_batch_size": batch, "gradient_checkpointing": checkpointing, "bf16": False}
    estimate = training_estimate(shape, settings, Sharding(1), seq)

    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    before = rss()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured = peak - before
    return {"case": case, "params_m": round(shape.fp32_bytes / 4 / 1e6, 1), "checkpointing": checkpointing,
            "estimate_mib": round(estimate.per_device / 2**20, 1), "measured_mib": round(measured / 2**20, 1),
            "ratio": round(estimate.per_device / measured, 2),
            "parts_mib": {k: round(v / 2**20, 1) for k, v in estimate.parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both")
    parser.add_argument("--json", action="store_true", help="One JSON line per case.")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "on")))
        return
    modes = ["off", "on"] if args.checkpointing == "both" else [args.checkpointing]
    for case in args.case or list(CASES):
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--child", case, mode], capture_output=True,
                                 text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{row['case']:>5} ({row['params_m']}M params) checkpointing {mode:<3}: estimate "
                      f"{row['estimate_mib']:8.1f} MiB, measured peak {row['measured_mib']:8.1f} MiB, "
                      f"estimate/measured {row['ratio']:.2f}")


if __name__ == "__main__":
    main()

"""The transformers backend: batched forward passes, top-K of ``log_softmax`` in float32.

Only the scored positions go through the output layer: the decoder's hidden states are
gathered at those positions and projected in chunks, so a 150k vocabulary never needs a
dense (batch, length, vocab) tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusion.backends.base import PositionScores
from fusion.data.batching import pad_sequences
from fusion.errors import InputError
from fusion.options import LogitOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROJECT_ROWS = 2048


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but CUDA is not available here", key="device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}", key="dtype")
    return DTYPES[dtype]


class HFBackend:
    name = "hf"
    schedules_batches = False  # score() takes the batches `fusion.data.batching` forms

    def __init__(self, model: str, options: LogitOptions):
        """Reads ``top_k``, ``dtype``, ``device``, ``device_map`` and ``trust_remote_code`` of
        ``options``. ``device_map`` (auto, balanced, ...) loads the model with accelerate over
        every visible GPU (then CPU): its layers run where they were placed, one after another."""
        from transformers import AutoModelForCausalLM

        device_map = options.device_map
        place = resolve_device("auto" if device_map else options.device)
        self.dtype = resolve_dtype(options.dtype, place)
        self.top_k = options.top_k
        trust = {"trust_remote_code": options.trust_remote_code}
        if device_map:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype, device_map=device_map, **trust)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype, **trust).to(place)
        self.model.eval()
        embedding = self.model.get_input_embeddings().weight.device  # where the input ids go
        self.device = embedding if embedding.type != "meta" else torch.device("cpu")  # offloaded: hooks move
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        cfg = self.model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)

    @torch.inference_mode()
    def score(
        self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray]
    ) -> list[PositionScores]:
        ids, mask = pad_sequences(sequences, 0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)

        rows = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)])
        cols = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in positions])
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)  # the last layer's device
        gold = ids.to(hidden.device)[rows, cols + 1]
        top_ids, top_lp, gold_lp = [], [], []
        for start in range(0, len(rows), _PROJECT_ROWS):
            sl = slice(start, start + _PROJECT_ROWS)
            logits = self._logits(hidden[rows[sl], cols[sl]])  # (n, V) float32, on the head's device
            # log_softmax = logits - logsumexp: only the K + 1 kept entries are shifted, so the
            # (n, V) log-probabilities are never written (one pass over the logits fewer)
            norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            values, indices = torch.topk(logits, self.top_k, dim=-1)
            top_ids.append(indices)
            top_lp.append(values - norm)
            gold_lp.append((logits.gather(1, gold[sl, None].to(logits.device)) - norm).squeeze(1))
        all_ids = torch.cat(top_ids).cpu().numpy() if top_ids else np.zeros((0, self.top_k), np.int64)
        all_lp = torch.cat(top_lp).cpu().numpy() if top_lp else np.zeros((0, self.top_k), np.float32)
        all_gold = torch.cat(gold_lp).cpu().numpy() if gold_lp else np.zeros((0,), np.float32)
        out, start = [], 0
        for p in positions:
            stop = start + len(p)
            out.append(PositionScores(all_ids[start:stop], all_lp[start:stop], all_gold[start:stop]))
            start = stop
        return out

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output logits in float32 (its logit scale and soft-cap applied)."""
        logits = self.head(hidden).float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def close(self) -> None:
        del self.model, self.decoder, self.head
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

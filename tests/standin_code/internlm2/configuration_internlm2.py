"""A tiny InternLM2-like model's own configuration class (test stand-in code, shipped in the
model folder and loaded only with trust_remote_code, as internlm/internlm2-chat-20b's is)."""

from transformers import LlamaConfig


class InternLM2Config(LlamaConfig):
    """InternLM2's decoder is Llama-shaped (RMSNorm, rotary, grouped-query attention)."""

    model_type = "internlm2"

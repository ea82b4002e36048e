"""A tiny InternLM2-like model's own modelling code (test stand-in, loaded via auto_map)."""

from transformers import LlamaForCausalLM, LlamaModel

from .configuration_internlm2 import InternLM2Config


class InternLM2Model(LlamaModel):
    config_class = InternLM2Config


class InternLM2ForCausalLM(LlamaForCausalLM):
    config_class = InternLM2Config

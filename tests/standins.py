"""Stand-ins for the six models of recipes/fusechat-7b.yaml: the same architecture class and
tokenizer family as each, scaled down, random weights, made here (nothing downloaded).

| recipe model                          | stand-in                                                        |
|---------------------------------------|-----------------------------------------------------------------|
| openchat/openchat_3.5 (pivot)         | Mistral; '▁' byte-fallback BPE + <|end_of_turn|>; GPT4 Correct   |
| berkeley-nest/Starling-LM-7B-alpha    | the OpenChat stand-in plus noise (a fine-tune of it, same vocab) |
| NousResearch/Nous-Hermes-2-SOLAR-10.7B| Llama; '▁' BPE + ChatML's added special tokens; ChatML template  |
| internlm/internlm2-chat-20b           | own code (auto_map: config, model, tokenizer class); ChatML     |
| mistralai/Mixtral-8x7B-Instruct-v0.1  | Mixtral MoE (4 experts, 2 per token); '▁' BPE; [INST] template  |
| Qwen/Qwen1.5-72B-Chat                 | Qwen2; byte-level BPE; ChatML; embedding rows padded past vocab |

`lay_out_standins` puts each under its hub id in a Hugging Face cache (``HF_HOME/hub``), so a
recipe keeps its hub ids and runs offline.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from helpers import lay_out_in_hub_cache

from fusechat_merge.demo.toy import CHATML_TEMPLATE, LLAMA_TEMPLATE, make_model

CODE = Path(__file__).parent / "standin_code" / "internlm2"

OPENCHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ 'GPT4 Correct ' + m['role'] | title + ': ' + m['content'] "
    "+ '<|end_of_turn|>' }}{% endfor %}{% if add_generation_prompt %}GPT4 Correct Assistant:{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

HUB_IDS = {
    "openchat": "openchat/openchat_3.5",
    "starling": "berkeley-nest/Starling-LM-7B-alpha",
    "solar": "NousResearch/Nous-Hermes-2-SOLAR-10.7B",
    "internlm": "internlm/internlm2-chat-20b",
    "mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "qwen": "Qwen/Qwen1.5-72B-Chat",
}


def _with_tokens(tokenizer, tokens: list[str], template: str, eos: str | None = None):
    """A copy of ``tokenizer`` with ``tokens`` added as special tokens (one id each, never
    split) and its own chat template, as the chat fine-tunes ship theirs."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": tokens})
    tok.chat_template = template
    if eos is not None:
        tok.eos_token = eos
    return tok


def make_internlm2(path: Path, metaspace_tokenizer, *, seed: int = 4, **config) -> Path:
    """A model folder that loads only with trust_remote_code: its config, model and tokenizer
    classes are its own Python files (`standin_code/internlm2`), named in ``auto_map``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _with_tokens(metaspace_tokenizer, CHATML_TOKENS, CHATML_TEMPLATE, eos="<|im_end|>")
    llama = LlamaConfig(vocab_size=len(tok), hidden_size=config.get("hidden_size", 64),
                        intermediate_size=2 * config.get("hidden_size", 64),
                        num_hidden_layers=config.get("layers", 2), num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(seed)
    LlamaForCausalLM(llama).save_pretrained(path)
    tok.save_pretrained(path)
    for file in CODE.glob("*.py"):
        shutil.copy(file, path / file.name)
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cfg.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"], auto_map={
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2Model",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    tcfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg.update(tokenizer_class="InternLM2TokenizerFast",
                auto_map={"AutoTokenizer": [None, "tokenization_internlm2.InternLM2TokenizerFast"]})
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
    return path


def make_standins(root: Path, metaspace_tokenizer, bytelevel_tokenizer, *, hidden_size: int = 64,
                  layers: int = 2) -> dict[str, Path]:
    """The six stand-ins under ``root`` (name → folder), made with random weights."""
    size = {"hidden_size": hidden_size, "layers": layers}
    openchat_tok = _with_tokens(metaspace_tokenizer, ["<|end_of_turn|>", "<|pad_0|>"], OPENCHAT_TEMPLATE,
                                eos="<|end_of_turn|>")
    solar_tok = _with_tokens(metaspace_tokenizer, CHATML_TOKENS, CHATML_TEMPLATE, eos="<|im_end|>")
    mixtral_tok = _with_tokens(metaspace_tokenizer, [], LLAMA_TEMPLATE)
    qwen_tok = _with_tokens(bytelevel_tokenizer, [], CHATML_TEMPLATE)
    models = {}
    models["openchat"] = make_model(root / "openchat", "mistral", tokenizer=openchat_tok, seed=1, **size)
    models["starling"] = make_model(root / "starling", base=models["openchat"], seed=2, delta_scale=0.02)
    models["solar"] = make_model(root / "solar", "llama", tokenizer=solar_tok, seed=3, **size)
    models["internlm"] = make_internlm2(root / "internlm", metaspace_tokenizer, seed=4, **size)
    models["mixtral"] = _make_mixtral(root / "mixtral", mixtral_tok, seed=5, **size)
    # Qwen1.5 pads its embedding rows past the tokenizer (151646 tokens, 152064 rows): so here
    models["qwen"] = make_model(root / "qwen", "qwen2", tokenizer=qwen_tok, seed=6,
                                vocab_size=(len(qwen_tok) + 63) // 64 * 64 + 64, **size)
    return models


def _make_mixtral(path: Path, tokenizer, *, seed: int, hidden_size: int, layers: int) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lay_out_standins(hf_home: Path, models: dict[str, Path]) -> dict[str, str]:
    """Each stand-in in the hub cache under its recipe's hub id; name → hub id."""
    for name, folder in models.items():
        lay_out_in_hub_cache(hf_home, HUB_IDS[name], folder)
    return dict(HUB_IDS)

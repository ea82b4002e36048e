"""Chat templates as real models ship them: ChatML with a system turn, Llama-3-style header
tokens, a template that rejects the system role, and a tokenizer with none. Every stage that
renders conversations (data, logits, evaluate, lm-eval tasks) honours the model's template."""

from __future__ import annotations

import copy
import json

import pytest
from corpus import write_jsonl

from fusion.data.conversations import Turn, parse_turns, render

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
NO_SYSTEM = (  # Gemma-style: refuses a system turn
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
STYLES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "no-system": (NO_SYSTEM, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
}
TURNS = [Turn("system", "Answer briefly."), Turn("user", "Capital of France?"), Turn("assistant", "Paris."),
         Turn("user", "And of Italy?"), Turn("assistant", "Rome.")]
ROW = {"id": "c0", "messages": [{"role": t.role, "content": t.content} for t in TURNS]}


def styled(tokenizer, style: str):
    template, specials, _ = STYLES[style]
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("style", list(STYLES))
def test_replies_and_their_closing_token_are_trained(bytelevel_tokenizer, style):
    tok = styled(bytelevel_tokenizer, style)
    enc = render(tok, parse_turns(ROW, "c0"), template="own")
    assert [enc.text[a:b] for a, b in enc.reply_spans] == ["Paris.", "Rome."]
    closing = tok.convert_tokens_to_ids(STYLES[style][2])
    trained = [i for i, m in enumerate(enc.loss_mask) if m]
    text = tok.decode([enc.input_ids[i] for i in trained], clean_up_tokenization_spaces=False)
    # a first token may also cover template whitespace just before the reply
    assert "".join(text.split()) == f"Paris.{STYLES[style][2]}Rome.{STYLES[style][2]}"
    assert sum(enc.input_ids[i] == closing for i in trained) == 2
    if style == "no-system":  # the system text went into the first user turn
        assert "Answer briefly.\n\nCapital of France?" in enc.text


def test_a_tokenizer_without_a_template_needs_the_shared_one(bytelevel_tokenizer):
    tok = copy.deepcopy(bytelevel_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template; use template='shared'"):
        render(tok, TURNS, template="own")
    assert render(tok, TURNS, template="shared").reply_spans


@pytest.mark.parametrize("style", list(STYLES))
def test_logits_evaluate_and_lm_eval_tasks_use_the_models_template(tmp_path, bytelevel_tokenizer, style):
    from fusechat_merge.demo.toy import make_model
    from fusion.capture.logit_job import LogitJob, generate_logits
    from fusion.evaluate.heldout import evaluate_model
    from fusion.evaluate.lm_eval_options import LmEvalOptions
    from fusion.evaluate.lm_eval_results import metrics_by_task
    from fusion.evaluate.lm_eval_runner import run_lm_eval
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    model = make_model(tmp_path / style, "qwen2", tokenizer=styled(bytelevel_tokenizer, style), seed=3)
    data = write_jsonl(tmp_path / "chats.jsonl", [ROW, {**ROW, "id": "c1"}])
    manifest = generate_logits(LogitJob(model=str(model), data=str(data), out=str(tmp_path / "store"), top_k=3,
                                        cache_dir=str(tmp_path / "c")), progress=False, log=lambda _: None)
    assert manifest.sequences == 2 and not manifest.skipped
    (score,) = evaluate_model(model, {"chat": data}, cache_dir=tmp_path / "c")
    assert score.conversations == 2 and score.skipped == 0
    single = write_jsonl(tmp_path / "single.jsonl", [{"id": "s", "messages": ROW["messages"][:3]}])
    tasks = write_skill_tasks({"chat": single}, tmp_path / "tasks", max_gen_toks=4, cache_dir=tmp_path / "c")
    results = run_lm_eval(str(model), LmEvalOptions(tasks=(tasks.by_skill()["chat"].generate,),
                                                    include_path=str(tasks.include_path),
                                                    apply_chat_template=True, bootstrap_iters=0, device="cpu"))
    assert "exact_match" in metrics_by_task(results)[tasks.by_skill()["chat"].generate]
    assert json.loads((model / "tokenizer_config.json").read_text()).get("chat_template") or (
        model / "chat_template.jinja").exists()

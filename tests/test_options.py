"""Options declared once: the dataclass check, the click option and the recipe key agree."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fusechat_merge.option_forms import recipe_section
from fusion.options import AlignOptions, EvalOptions, LogitOptions, bounds, option_fields


@pytest.mark.parametrize("cls", [LogitOptions, AlignOptions, EvalOptions])
def test_recipe_section_has_the_dataclass_defaults(cls):
    section = recipe_section(cls)()
    assert section.model_dump() == {f.name: f.default for f in option_fields(cls)}
    assert cls(**section.model_dump()) == cls()


@pytest.mark.parametrize(("field", "value"), [("top_k", 0), ("top_k", 1001), ("batch_size", 0),
                                              ("backend", "tgi"), ("gpu_memory_utilization", 1.5)])
def test_an_out_of_range_value_is_refused_by_both_forms_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        LogitOptions(**{field: value})
    with pytest.raises(ValidationError, match=field):
        recipe_section(LogitOptions)(**{field: value})


def test_an_unquoted_yaml_switch_reads_as_the_word():
    import yaml

    section = recipe_section(AlignOptions)
    assert section(**yaml.safe_load("projection: off")).projection == "off"  # YAML 1.1: False
    assert section(**yaml.safe_load("projection: on")).projection == "on"
    with pytest.raises(ValidationError, match="projection"):
        section(projection="maybe")


def test_unknown_recipe_keys_are_refused():
    with pytest.raises(ValidationError, match="topk"):
        recipe_section(AlignOptions)(topk=3)


def test_exclusions_and_bounds():
    section = recipe_section(LogitOptions, exclude=("shard",))
    assert "shard" not in section.model_fields
    top_k = next(f for f in option_fields(LogitOptions) if f.name == "top_k")
    assert bounds(top_k) == {"min": 1, "max": 1000, "min_open": False, "metavar": None, "required": False}


def test_a_bad_shard_spec_names_the_form():
    with pytest.raises(ValueError, match="i/N"):
        LogitOptions(shard="3")


@pytest.mark.parametrize(("cls", "field", "value", "words"), [
    (LogitOptions, "top_k", "5", "an integer"), (LogitOptions, "top_k", True, "an integer"),
    (LogitOptions, "top_k", 2.5, "an integer"), (LogitOptions, "strict", "yes", "true or false"),
    (LogitOptions, "gpu_memory_utilization", "0.5", "a number"), (EvalOptions, "batch_size", None, "an integer"),
])
def test_a_value_of_another_kind_is_refused_with_the_field_name(cls, field, value, words):
    """Python and YAML callers can pass anything: the declared kind is checked with the range."""
    with pytest.raises(ValueError, match=f"{field} must be {words}, got"):
        cls(**{field: value})


def test_optional_fields_take_none_and_floats_take_ints():
    assert LogitOptions(cache_dir=None, backend="vllm", gpu_memory_utilization=1).gpu_memory_utilization == 1


def test_engine_args_from_the_command_line_and_the_recipe():
    import click
    from click.testing import CliRunner

    from fusechat_merge.option_forms import click_options

    @click.command()
    @click_options(LogitOptions)
    def show(**kwargs):
        click.echo(repr(LogitOptions(**kwargs).engine_args))

    ok = CliRunner().invoke(show, ["--backend", "vllm", "--engine-args",
                                   "max_num_seqs=64, enforce_eager=true,kv_cache_dtype=fp8"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == "{'max_num_seqs': 64, 'enforce_eager': True, 'kv_cache_dtype': 'fp8'}"
    assert CliRunner().invoke(show, []).output.strip() == "None"
    bad = CliRunner().invoke(show, ["--backend", "vllm", "--engine-args", "max_num_seqs"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    section = recipe_section(LogitOptions)(backend="vllm", engine_args={"enforce_eager": True}, device_map=None)
    assert section.engine_args == {"enforce_eager": True}


@pytest.mark.parametrize(("given", "words"), [
    ({"backend": "vllm", "device_map": "auto"}, "device_map is for the hf backend"),
    ({"backend": "hf", "engine_args": {"enforce_eager": True}}, "engine_args are vllm.EngineArgs"),
    ({"tensor_parallel_size": 4}, "tensor_parallel_size is for the vllm backend"),  # dropped before
    ({"gpu_memory_utilization": 0.5}, "gpu_memory_utilization is for the vllm backend"),
    ({"device": "cpu", "device_map": "auto"}, "device cpu and device_map auto"),
    ({"device_map": "everywhere"}, "device_map must be one of auto"),
    ({"batch_tokens": -1}, "batch_tokens must be >= 0"),
])
def test_options_of_the_other_backend_are_refused(given, words):
    with pytest.raises(ValueError, match=words):
        LogitOptions(**given)


def test_engine_args_are_checked_by_name_with_the_nearest_one():
    from fusion.backends.vllm import check_engine_args

    known = {"max_num_batched_tokens", "max_num_seqs", "enforce_eager", "kv_cache_dtype"}
    check_engine_args({"max_num_seqs": 8, "enforce_eager": True}, known)
    with pytest.raises(ValueError, match="'max_num_seq' is not .*did you mean 'max_num_seqs'"):
        check_engine_args({"max_num_seq": 8}, known)
    with pytest.raises(ValueError, match="'foo' is not an engine option of the installed vLLM$"):
        check_engine_args({"foo": 1}, known)
    with pytest.raises(ValueError, match="tensor_parallel_size is set from tensor_parallel_size"):
        check_engine_args({"tensor_parallel_size": 2}, known | {"tensor_parallel_size"})


def test_the_scoring_path_takes_its_defaults_from_logit_options():
    """Every function along the scoring path defaults as `LogitOptions` declares (nothing
    restated), and the backends are built from the options themselves."""
    import dataclasses
    import inspect

    from fusechat_merge.pipeline_recipe import DataSpec, ModelSpec
    from fusion.artifacts.logit_store import StoreOptions
    from fusion.backends import make_backend
    from fusion.backends.hf import HFBackend
    from fusion.backends.vllm import VLLMBackend
    from fusion.data import conversations
    from fusion.options import default_of

    declared = {f.name: f.default for f in dataclasses.fields(LogitOptions)}
    for func, params in ((conversations.render, ("template", "max_length")),
                         (conversations.encode_rows, ("template", "max_length", "strict")),
                         (conversations.usable_rows, ("strict",)),
                         (conversations.load_conversations, ("split",))):
        for name in params:
            assert inspect.signature(func).parameters[name].default == declared[name], (func.__name__, name)
    store = {f.name: f.default for f in dataclasses.fields(StoreOptions)}
    assert (store["shard"], store["rows_per_shard"]) == (declared["shard"], declared["rows_per_shard"])
    assert ModelSpec.model_fields["template"].default == default_of(LogitOptions, "template")
    assert DataSpec.model_fields["split"].default == default_of(LogitOptions, "split")
    for backend in (make_backend, HFBackend.__init__, VLLMBackend.__init__):
        params = [p for p in inspect.signature(backend).parameters.values() if p.name != "self"]
        assert [p.name for p in params] == ["model", "options"], backend
        assert all(p.default is inspect.Parameter.empty for p in params), backend
    unknown = LogitOptions()
    object.__setattr__(unknown, "backend", "onnx")  # past the options' own check: make_backend's
    with pytest.raises(ValueError, match="unknown backend 'onnx'; use one of hf, vllm"):
        make_backend("m", unknown)

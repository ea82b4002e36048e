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

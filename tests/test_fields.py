"""Strict field types (dorakit.fields), one check for every way a config arrives: the Python API
(DoraConfig, TrainConfig), YAML/JSON --config files and adapter_config.json. Nothing is coerced: a
wrong type is a ValueError naming the field (and the file), never a silent reinterpretation and never
a TypeError from deeper down."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dorakit import DoraConfig
from dorakit.formats.peft_config import from_peft_dict, to_peft_dict
from dorakit.train.options import TrainConfig, read_config_file

# Every JSON value a file can hold (and what a careless Python caller passes).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_reported_coercions_are_refused():
    # issue 19: "use_rslora": "false" applied rsLoRA scaling, "use_dora": "false" loaded DoRA.
    lora = to_peft_dict(DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=False))
    for field, value in (("use_rslora", "false"), ("use_dora", "false"), ("use_dora", 1), ("r", 8.0),
                         ("lora_alpha", math.inf), ("lora_alpha", True), ("init_lora_weights", 0),
                         ("fan_in_fan_out", "no"), ("rank_pattern", {"q_proj": "4"})):
        with pytest.raises(ValueError, match=rf"^adapter_config.json: {field} must be .*got {value!r:.6}"):
            from_peft_dict({**lora, field: value}, source="adapter_config.json")


def test_a_vera_file_is_checked_too():
    vera = to_peft_dict(DoraConfig(r=4, direction="vera", target_modules=["q_proj"], use_dora=False))
    with pytest.raises(ValueError, match="x.json: use_dora must be true or false, got 'false'"):
        from_peft_dict({**vera, "use_dora": "false"}, source="x.json")  # bool("false") made it DVoRA
    with pytest.raises(ValueError, match="x.json: vera_dropout must be a finite number, got 'high'"):
        from_peft_dict({**vera, "vera_dropout": "high"}, source="x.json")  # named as the file names it
    assert from_peft_dict({**vera, "use_dora": True}, source="x.json").method == "dvora"


def test_config_file_values_are_checked_and_name_the_file(tmp_path):
    cases = {"lr: fast\n": "lr must be a finite number, got 'fast'",
             "batch_size: '16'\n": "batch_size must be an integer, got '16'",
             "gradient_checkpointing: 'false'\n": "gradient_checkpointing must be true or false",
             "target_modules: q_proj\n": "target_modules must be a list of strings or null",
             "lr: .nan\n": "lr must be a finite number, got nan",
             "method: DoRA\n": "method must be one of 'dora', 'lora'"}
    for text, message in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ValueError, match=f"c.yaml: {message}"):
            read_config_file(tmp_path / "c.yaml", None)
    (tmp_path / "named.yaml").write_text("small:\n  r: 4.5\n")
    with pytest.raises(ValueError, match=r"named.yaml \[small\]: r must be an integer or null"):
        read_config_file(tmp_path / "named.yaml", "small")
    (tmp_path / "c.json").write_text('{"lr": Infinity}')
    with pytest.raises(ValueError, match="c.json: lr must be a finite number, got inf"):
        read_config_file(tmp_path / "c.json", None)


def test_yaml_reads_exponent_numbers_as_json_does(tmp_path):
    # PyYAML follows YAML 1.1, where 1e-4 is text; a strict check would then refuse the most common lr.
    (tmp_path / "c.yaml").write_text("lr: 1e-4\nweight_decay: 5E-2\nprompt_template: 'v1e5 {text}'\n")
    assert read_config_file(tmp_path / "c.yaml", None) == {"lr": 1e-4, "weight_decay": 0.05,
                                                           "prompt_template": "v1e5 {text}"}


@pytest.mark.parametrize("cls", [DoraConfig, TrainConfig])
def test_the_python_api_refuses_wrong_types(cls):
    with pytest.raises(ValueError, match="use_rslora must be true or false, got 'false'"):
        cls(use_rslora="false")
    with pytest.raises(ValueError, match="lora_dropout must be a finite number, got '0.1'"):
        cls(lora_dropout="0.1")


@pytest.mark.parametrize("cls", [DoraConfig, TrainConfig])
@SETTINGS
@given(data=st.data())
def test_any_value_of_any_field_is_accepted_as_typed_or_refused_by_name(cls, data):
    """Property: for every field and any JSON-like value, construction either succeeds with the value
    kept as given (no coercion) or raises ValueError naming the field; never TypeError or another error."""
    from dorakit.fields import field_types, matches

    name = data.draw(st.sampled_from(sorted(field_types(cls))))
    value = data.draw(JSON)
    try:
        made = cls(**{name: value})  # every other field has a working default
    except ValueError as err:
        if not matches(value, field_types(cls)[name]):
            assert str(err).startswith(f"{name} must be "), err
        return
    assert matches(value, field_types(cls)[name]), (name, value)
    kept = getattr(made, name)
    assert type(kept) is type(value) or isinstance(value, (list, tuple)), (name, value, kept)


@SETTINGS
@given(data=st.data())
def test_any_value_in_an_adapter_config_is_read_as_typed_or_refused_by_name(data):
    from dorakit.fields import field_types

    base = to_peft_dict(DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    name = data.draw(st.sampled_from(sorted(base)))
    value = data.draw(JSON)
    try:
        config = from_peft_dict({**base, name: value}, source="a/adapter_config.json")
    except ValueError as err:
        assert str(err).startswith("a/adapter_config.json"), err
        return
    if name in field_types(DoraConfig) and value is not None and name != "init_lora_weights":
        assert getattr(config, name) == value or name in ("target_modules", "modules_to_save", "exclude_modules")


@SETTINGS
@given(data=st.data())
def test_any_value_in_a_config_file_is_read_as_typed_or_refused_by_name(tmp_path_factory, data):
    from dorakit.fields import field_types, matches

    path = tmp_path_factory.mktemp("cfg") / "run.json"
    name = data.draw(st.sampled_from(sorted(field_types(TrainConfig))))
    value = data.draw(JSON)
    try:
        text = json.dumps({name: value})
    except ValueError:
        return
    path.write_text(text)
    try:
        options = read_config_file(path, None)
    except ValueError as err:
        assert str(err).startswith(f"{path}: {name} must be ") or "named configurations" in str(err), err
        return
    assert matches(options[name], field_types(TrainConfig)[name])

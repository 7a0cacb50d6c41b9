"""Fuzzing: malformed safetensors headers and recipes end in one clear MergeError, never a crash."""

import json
import struct

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmerge.errors import MergeError
from distmerge.io.header import read_header
from distmerge.recipe import parse_recipe

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "BOOL", "F99", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 300), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.text(min_size=1, max_size=8), entries | json_values, max_size=4)


def _write(tmp_path_factory, header_bytes: bytes, length: int | None, data: bytes):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)
    return path


def _read_header_cleanly(path) -> None:
    """Either a valid header or MergeError; anything else is a bug."""
    try:
        entries, _ = read_header(path)
    except MergeError as e:
        assert str(path) in str(e)
        return
    size = path.stat().st_size
    for e in entries.values():  # what is accepted is consistent
        assert 0 <= e.begin <= e.end <= size


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data=st.binary(max_size=64), length=st.none() | st.integers(0, 2**64 - 1))
def test_malformed_headers_end_in_a_clear_error(tmp_path_factory, header, data, length):
    _read_header_cleanly(_write(tmp_path_factory, json.dumps(header).encode(), length, data))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=80), length=st.none() | st.integers(0, 200))
def test_garbage_bytes_end_in_a_clear_error(tmp_path_factory, raw, length):
    _read_header_cleanly(_write(tmp_path_factory, raw, length, b""))


recipe_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=False, width=32) | st.sampled_from(["a", "b", "linear", "ties", "passthrough", "float32", "*", "mlp"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["model", "layer_range", "parameters", "weight", "density", "filter", "value", "sources", "t", 1]), inner, max_size=3),
    max_leaves=15,
)
recipes = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(["linear", "ties", "slerp", "passthrough", "dare_ties", "della", "nope"]) | recipe_values},
    optional={
        "models": recipe_values,
        "slices": recipe_values,
        "base_model": recipe_values,
        "parameters": recipe_values,
        "dtype": recipe_values,
        "out_dtype": recipe_values,
        "tokenizer_source": recipe_values,
        "chat_template": recipe_values,
        7: recipe_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(recipe=recipes)
def test_malformed_recipes_end_in_a_clear_error(recipe):
    try:
        parse_recipe(yaml.safe_dump(recipe), source="fuzz.yml")
    except MergeError as e:
        assert str(e).startswith("fuzz.yml")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=120))
def test_arbitrary_text_ends_in_a_clear_error(text):
    try:
        parse_recipe(text, source="fuzz.yml")
    except MergeError as e:
        assert str(e).startswith("fuzz.yml")

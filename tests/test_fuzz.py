"""Fuzzing: malformed safetensors headers and recipes end in one clear MergeError, never a crash."""

import json
import shutil
import struct

import pytest
import yaml
try:  # the test extra
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    pytest.skip("hypothesis is not installed (property-based tests); pip install -e '.[test]'", allow_module_level=True)

from distmerge.errors import MergeError
from distmerge.io.header import read_header
from distmerge.recipe import parse_recipe
from distmerge.sources import load_checkpoint

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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- hostile structure: deep nesting, aliases, files of the wrong JSON type (issue 13) ---


def _one_clear_line(e: MergeError, *names: str) -> str:
    message = str(e)
    assert "\n" not in message and len(message) < 1000, message
    assert any(name in message for name in names), message
    return message


def _nest(openers: list[str], leaf: str = "0.5") -> str:
    closers = {"[": "]", "{a: ": "}", "{filter: mlp, value: ": "}"}
    return "".join(openers) + leaf + "".join(closers[o] for o in reversed(openers))


@settings(max_examples=60, deadline=None)
@given(openers=st.lists(st.sampled_from(["[", "{a: ", "{filter: mlp, value: "]), min_size=1, max_size=3000))
def test_deeply_nested_recipes_are_refused_at_64_levels(openers):
    # weight's value sits at level 3 (the document, parameters, the value) and the number at
    # the bottom adds one: refused exactly when 3 + len(openers) > 64.
    text = f"merge_method: linear\nmodels: [a, b]\nparameters:\n  weight: {_nest(openers)}\n"
    try:
        parse_recipe(text, source="fuzz.yml")
    except MergeError as e:
        message = _one_clear_line(e, "fuzz.yml")
        assert ("nested more than 64 levels deep (at line 4)" in message) == (3 + len(openers) > 64), message
    else:
        assert 3 + len(openers) <= 64


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 120))
def test_deeply_nested_block_style_recipes_are_refused(depth):
    text = "merge_method: linear\nmodels: [a, b]\nparameters:\n  weight:\n    " + "- " * depth + "0.5\n"
    try:
        parse_recipe(text, source="fuzz.yml")
    except MergeError as e:
        assert ("nested more than 64 levels" in _one_clear_line(e, "fuzz.yml")) == (3 + depth > 64)


@st.composite
def alias_documents(draw):
    """A recipe whose parameters hold a chain of anchors, each re-using earlier ones (up to 9
    times each, up to 12 deep: up to 9**12 values once expanded), and the expanded size."""
    levels = draw(st.integers(1, 12))
    sizes, defs = [], []
    for i in range(levels):
        if i == 0 or draw(st.booleans()) and i < 2:
            values = draw(st.lists(st.sampled_from(["0.5", "1", "true", "mlp"]), min_size=1, max_size=9))
            defs.append(f"&a{i} [{', '.join(values)}]")
            sizes.append(1 + len(values))
            continue
        refs = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=9))
        if draw(st.booleans()):
            defs.append(f"&a{i} [{', '.join(f'*a{r}' for r in refs)}]")
            sizes.append(1 + sum(sizes[r] for r in refs))
        else:
            defs.append(f"&a{i} [{', '.join(f'{{filter: mlp, value: *a{r}}}' for r in refs)}]")
            sizes.append(1 + sum(5 + sizes[r] for r in refs))  # each entry: mapping, 2 keys, 'mlp'
    use = draw(st.integers(0, levels - 1))
    text = (
        "merge_method: linear\nbase_model: b\n"
        f"models:\n  - model: a\n    parameters: {{weight: [{', '.join(defs)}]}}\n  - model: b\n    parameters: {{weight: *a{use}}}\n"
    )
    # expanded: the document's own scalars and collections (about 20) + the definitions + the use
    return text, sum(sizes) + sizes[use]


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(doc=alias_documents())
def test_alias_bombs_are_refused_before_any_work(doc):
    text, expanded = doc
    try:
        parse_recipe(text, source="fuzz.yml")
    except MergeError as e:
        message = _one_clear_line(e, "fuzz.yml")
        if expanded > 100_000:
            assert "YAML aliases (*name) that expand to more than 100,000 values" in message, message
    else:
        assert expanded <= 100_000


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(gradient=st.lists(st.integers(0, 1000).map(lambda k: k / 1000), min_size=1, max_size=8), uses=st.integers(1, 20))
def test_a_few_aliases_are_read_as_mergekit_reads_them(gradient, uses):
    models = "".join(f"  - model: m{i}\n    parameters: {{weight: *w}}\n" for i in range(1, uses + 1))
    text = f"merge_method: linear\nmodels:\n  - model: m0\n    parameters: {{weight: &w {json.dumps(gradient)}}}\n{models}"
    recipe = parse_recipe(text, source="fuzz.yml")
    assert [m.parameters["weight"] for m in recipe.models] == [gradient] * (uses + 1)
    assert recipe.models == tuple(parse_recipe(yaml.safe_dump(yaml.safe_load(text)), source="x").models)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(depth=st.integers(1, 200_000), inner=st.sampled_from([b"", b"1", b'"x"']), wrap=st.booleans())
def test_deeply_nested_headers_end_in_a_clear_error(tmp_path_factory, depth, inner, wrap):
    nest = b"[" * depth + inner + b"]" * depth
    header = b'{"w": {"dtype": "F32", "shape": ' + nest + b', "data_offsets": [0, 0]}}' if wrap else nest
    _read_header_cleanly(_write(tmp_path_factory, header, None, b""))


@settings(max_examples=50, deadline=None)
@given(digits=st.integers(4000, 20000))
def test_headers_with_huge_integers_end_in_a_clear_error(tmp_path_factory, digits):
    header = b'{"w": {"dtype": "F32", "shape": [' + b"9" * digits + b'], "data_offsets": [0, 4]}}'
    _read_header_cleanly(_write(tmp_path_factory, header, None, b"\0" * 4))


nested_json = st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n)
"""JSON text nested n deep (json.loads raises RecursionError beyond about 1,000)."""
json_files = (
    json_values.map(json.dumps)
    | nested_json
    | st.builds(lambda v: json.dumps({"num_hidden_layers": v, "vocab_size": 128}), json_values)
    | st.builds(lambda v: json.dumps({"weight_map": v}), json_values)
    | st.builds(lambda m: json.dumps({"weight_map": m}), st.dictionaries(st.text(max_size=30), json_values | st.text(max_size=40), max_size=4))
)
json_bytes = json_files.map(str.encode) | st.binary(max_size=40) | st.just(b'{"x": "caf\xe9"}')


@pytest.fixture(scope="module")
def bad_models(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_models")
    return {name: shutil.copytree(llama_family[name], root / name) for name in ("base", "ft1")}


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=json_bytes, target=st.sampled_from([("ft1", "config.json"), ("base", "config.json"), ("base", "model.safetensors.index.json")]))
def test_model_json_files_of_any_shape_end_in_a_clear_error(bad_models, content, target):
    """config.json and the shard index holding lists, strings, numbers, nesting, wrong field
    types or non-UTF-8 bytes: a Checkpoint, or one MergeError naming the model or file."""
    model, name = target
    path = bad_models[model] / name
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        ck = load_checkpoint(str(bad_models[model]))
    except MergeError as e:
        _one_clear_line(e, str(bad_models[model]))
    else:
        assert ck.num_layers is None or 0 <= ck.num_layers <= len(ck.tensors)
        assert all(type(ck.config.get(k)) is int for k in ("vocab_size",) if ck.config.get(k) is not None)
    finally:
        path.write_bytes(original)

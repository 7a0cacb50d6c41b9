"""Recipes: mergekit's YAML is read unchanged; parameter settings resolve as mergekit resolves them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distmerge.errors import MergeError
from distmerge.methods import Param
from distmerge.recipe import evaluate, parse_recipe

FLOAT = Param("weight", float, scope="input")
BOOL = Param("normalize", bool, True)

GOLIATH = """
slices:
  - sources:
      - model: xwin
        layer_range: [0, 16]
  - sources:
      - model: euryale
        layer_range: [8, 24]
merge_method: passthrough
dtype: float16
"""


def test_mergekit_slices_recipe_parses_unchanged():
    r = parse_recipe(GOLIATH)
    assert r.merge_method == "passthrough"
    assert [s.sources[0].model for s in r.slices] == ["xwin", "euryale"]
    assert r.slices[1].sources[0].layer_range == (8, 24)
    assert r.dtype == "float16" and r.models is None


def test_models_recipe_with_string_models_and_parameters():
    r = parse_recipe(
        "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: -1.0}\n"
        "parameters: {normalize: true}\n"
    )
    assert r.models[0].parameters == {"weight": -1.0}
    assert r.parameters == {"normalize": True}
    assert r.model_refs() == ["b", "a"]
    assert r.donor == "b"


def test_donor_without_base_is_the_first_model():
    r = parse_recipe("merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: 1}\n  - model: y\n    parameters: {weight: 1}\n")
    assert r.donor == "x"


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: linear\nmodels: [\n", "invalid YAML at line"),
        ("merge_method: lienar\nmodels: [a]\n", "unknown merge_method 'lienar'; valid methods are"),
        ("merge_method: linear\nmodels: [a]\nmodel: b\n", "unknown key 'model'"),
        ("merge_method: linear\n", "exactly one of 'models' or 'slices'"),
        ("merge_method: linear\nmodels: [a]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n", "exactly one of"),
        ("merge_method: task_arithmetic\nmodels: [a, b]\n", "needs a base_model"),
        ("merge_method: linear\nmodels: [a]\nparameters: {wieght: 1}\n", "linear has no parameter 'wieght'; its parameters are: weight, normalize"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: heavy}\n", "expected float, got 'heavy'"),
        ("merge_method: linear\nmodels: [a]\nparameters: {normalize: 3}\n", "expected bool, got 3"),
        ("merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters: {t: [0, -0.5]}\n", "t must be in [0, 1]"),
        ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, density: 1.5}}]\n", "density must be in (0, 1]"),
        ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]\n", "empty or reversed"),
        ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0]}]}]\n", "layer_range must be [start, end]"),
        ("merge_method: slerp\nbase_model: a\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]\n", "same number of layers"),
        ("merge_method: linear\nmodels: [a]\ndtype: float8\n", "dtype 'float8' is not one of"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: {value: 1, filtr: mlp}}\n", "each entry is {filter"),
    ],
)
def test_bad_recipes_get_one_clear_error(text, message):
    with pytest.raises(MergeError) as e:
        parse_recipe(text, source="r.yml")
    assert message in str(e.value)
    assert str(e.value).startswith("r.yml")


def test_yaml_error_names_the_line():
    with pytest.raises(MergeError, match="line 2, column 14"):
        parse_recipe("merge_method: linear\nmodels: [a, b}\ndtype: float32\n")


def test_scalar_and_scientific_strings():
    assert evaluate(0.5, "x", 0.0, FLOAT, "w") == 0.5
    assert evaluate("1e-3", "x", 0.0, FLOAT, "w") == 0.001  # YAML 1.1 reads 1e-3 as a string


def test_gradient_is_piecewise_linear_over_depth():
    assert evaluate([0.0, 1.0], "x", 0.25, FLOAT, "w") == 0.25
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75, FLOAT, "w") == pytest.approx(0.5)
    assert evaluate([0.0, 1.0, 0.0], "x", 1.0, FLOAT, "w") == 0.0


def test_boolean_gradient_picks_by_index():
    assert evaluate([True, False], "x", 0.99, BOOL, "n") is True
    assert evaluate([True, False], "x", 1.0, BOOL, "n") is False


def test_filters_first_match_wins_and_default_entry():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"value": 0.9}]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0, FLOAT, "w") == 0.1
    assert evaluate(setting, "model.layers.0.cross_attn.q_proj.weight", 0, FLOAT, "w") == 0.2
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0, FLOAT, "w") == 0.9


def test_no_matching_filter_gives_none_so_outer_scopes_apply():
    assert evaluate([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0, FLOAT, "w") is None


def test_filter_value_may_itself_be_a_gradient():
    assert evaluate({"filter": "mlp", "value": [0.0, 1.0]}, "a.mlp.b", 0.5, FLOAT, "w") == 0.5


# --- the same answers as mergekit's own resolver, for any setting ---

scalars = st.floats(min_value=-10, max_value=10, allow_nan=False)
gradients = st.lists(scalars, min_size=1, max_size=6)
names = st.sampled_from(["model.layers.3.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])
filters = st.sampled_from(["mlp", "self_attn", "q_proj", "lm_head", "*", None, "nothing"])
conds = st.lists(st.fixed_dictionaries({"filter": filters, "value": st.one_of(scalars, gradients)}), min_size=1, max_size=4)
settings_ = st.one_of(scalars, gradients, conds)


@settings(max_examples=300, deadline=None)
@given(setting=settings_, name=names, t=st.floats(min_value=0, max_value=1))
def test_evaluate_matches_mergekit(setting, name, t):
    from mergekit.config import ConditionalParameter, evaluate_setting

    def to_mergekit(s):
        if isinstance(s, list) and s and isinstance(s[0], dict):
            return [ConditionalParameter(**{k: v for k, v in c.items() if v is not None or k == "value"}) for c in s]
        return s

    theirs = evaluate_setting(name, to_mergekit(setting), t, validate=float)
    ours = evaluate(setting, name, t, FLOAT, "w")
    assert ours == theirs

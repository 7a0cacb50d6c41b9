"""Recipes: mergekit's YAML is read unchanged; parameter settings resolve as mergekit resolves them."""

import pytest
import yaml
try:  # the test extra
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    pytest.skip("hypothesis is not installed (property-based tests); pip install -e '.[test]'", allow_module_level=True)

from distmerge.errors import MergeError
from distmerge.methods import Param
from distmerge.recipe import convert, evaluate, load_recipe, parse_recipe

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
        ("merge_method: lienar\nmodels: [a]\n", "unknown merge_method 'lienar'; did you mean 'linear'? valid methods are"),
        ("merge_method: linear\nmodels: [a]\nmodel: b\n", "r.yml: unknown key 'model'; did you mean 'models'? valid keys are"),
        ("merge_method: linear\n", "exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: linear\nmodels: [a]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n", "exactly one of"),
        ("merge_method: task_arithmetic\nmodels: [a, b]\n", "needs a base_model"),
        ("merge_method: linear\nmodels: [a]\nparameters: {wieght: 1}\n", "linear has no parameter 'wieght'; did you mean 'weight'? its parameters are: weight, normalize"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: heavy}\n", "expected float, got 'heavy'"),
        ("merge_method: linear\nmodels: [a]\nparameters: {normalize: 3}\n", "parameters.normalize: expected a boolean (true or false, 1 or 0, yes or no, on or off), got 3"),
        ("merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters: {t: [0, -0.5]}\n", "t must be in [0, 1]"),
        ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, density: 1.5}}]\n", "density must be in (0, 1]"),
        ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]\n", "empty or reversed"),
        ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0]}]}]\n", "layer_range must be [start, end]"),
        ("merge_method: slerp\nbase_model: a\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]\n", "same number of layers"),
        ("merge_method: linear\nmodels: [a]\ndtype: float8\n", "dtype 'float8' is not one of"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: {value: 1, filtr: mlp}}\n", "each entry is {filter"),
        # non-finite and overflowing numbers, at parse time, naming the parameter and its place
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: .nan}\n", "r.yml: parameters.weight: nan is not a finite number"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: [0, .inf]}\n", "parameters.weight: inf is not a finite number"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: '-inf'}\n", "parameters.weight: '-inf' is not a finite number"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1e999}}]\n", "models[0].parameters.weight: '1e999' is not a finite"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: [{filter: mlp, value: NaN}]}\n", "weight: 'NaN' is not a finite"),
        ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, density: .NaN}}]\n", "density: nan is not a finite"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: 123456789012345678901234567890}\n", "line 3, column 22: integer too large"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: " + "9" * 5000 + "}\n", "integer too large"),
        # hostile YAML: bounded work, one line with the place
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: " + "[" * 100 + "1" + "]" * 100 + "}\n", "nested more than 64 levels deep (at line 3)"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: &w [1, *w]}\n", "alias at line 3 is used inside the value it names"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: &w {filter: x, value: *w}}\n", "used inside the value it names"),
        ("merge_method: linear\nmodels: [a]\nname: !!python/object/apply:os.system [echo]\n", "could not determine a constructor for the tag"),
        ("merge_method: linear\nmodels: [a]\nname: 2001-13-01\n", "line 3, column 7: cannot read this value (month must be in 1..12)"),
        ("merge_method: linear\nmodels: [a]\nname: a\x00b\n", "character #x0000 at position 40 is not allowed in YAML"),
        ("merge_method: linear\nmodels: [a]\n---\nmerge_method: ties\n", "r.yml (document 2): a recipe needs exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: linear\nmodels: [a]\n---\nmerge_method: linear\nmodels: [b]\n", "r.yml: 2 documents have no name; in a multi-stage recipe only the final one may be unnamed"),
        ("name: x\nmerge_method: linear\nmodels: [a]\n---\nname: x\nmerge_method: linear\nmodels: [b]\n", "r.yml: two documents are named 'x'"),
        ("merge_method: ties\nbase_model: a\nmodels: [b]\nsweep: {densty: [0.5]}\n", "sweep: ties has no parameter 'densty'; did you mean 'density'?"),
        ("merge_method: ties\nbase_model: a\nmodels: [b]\nsweep: {density: [0.5, x]}\n", "sweep.density: expected float, got 'x'"),
        ("merge_method: ties\nbase_model: a\nmodels: [b]\nsweep: {density: 0.5}\n", "sweep.density must be a non-empty list of values"),
        ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {density: 0.3}}]\nsweep: {density: [0.5]}\n", "sweep.density: models[0].parameters sets density too"),
        # did you mean: close names at every level, ignoring case
        ("merge_method: TIES\nmodels: [a]\n", "unknown merge_method 'TIES'; did you mean 'ties'?"),
        ("merge_method: linear\nslices: [{source: [{model: a, layer_range: [0, 1]}]}]\n", "r.yml: slices[0] must be a mapping with a non-empty 'sources'"),
        ("merge_method: linear\nslices: [{sources: [{model: a, layer_rang: [0, 1]}]}]\n", "slices[0].sources[0]: unknown key 'layer_rang'; did you mean 'layer_range'? valid keys are layer_range, model, parameters"),
        ("merge_method: linear\nmodels: [a]\ntokenizer: {sauce: base}\n", "tokenizer: unknown key 'sauce'; did you mean 'source'?"),
        ("merge_method: linear\nmodels: [a]\nxyzzy: 1\n", "r.yml: unknown key 'xyzzy'; valid keys are"),
        # modules: named modules (a multimodal model's), each with models or slices and parameters
        ("merge_method: linear\nmodules: {text_decoder: {models: [a], merge_method: ties}}\n", "modules.text_decoder.merge_method: mergekit has one merge_method per recipe"),
        ("merge_method: linear\nmodules: {vision_tower: {models: [a], base_model: a}}\n", "modules.vision_tower.base_model: mergekit has no base_model per module"),
        ("merge_method: linear\nmodules: {text_decoder: {models: [a]}, vision_tower: {}}\n", "modules.vision_tower needs exactly one of 'models' or 'slices'"),
        ("merge_method: linear\nmodules: {text_decoder: {models: [a]}, vision_tower: {modles: [a]}}\n", "modules.vision_tower: unknown key 'modles'; did you mean 'models'?"),
        ("merge_method: linear\nmodules: {text_decoder: {models: [a], parameters: {weigth: 1}}}\n", "modules.text_decoder.parameters: linear has no parameter 'weigth'"),
        ("merge_method: linear\nmodules: {vision_tower: {slices: [{sources: [{model: a, layer_range: [0, 1]}]}], parameters: {weight: x}}}\n", "modules.vision_tower.parameters.weight: expected float, got 'x'"),
        ("merge_method: ties\nmodules: {text_decoder: {models: [a]}, vision_tower: {models: [a]}}\n", "merge_method ties needs a base_model"),
        ("merge_method: linear\nmodules: [text_decoder]\n", "modules must be a mapping of module names"),
        ("merge_method: linear\nmodels: [a]\nmodules: {default: {models: [a]}}\n", "exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: linear\nmodules: {default: {models: [a], slices: [{sources: [{model: a, layer_range: [0, 1]}]}]}}\n", "modules.default needs exactly one of 'models' or 'slices'"),
        ("merge_method: linear\nmodules: {default: {modles: [a]}}\n", "modules.default: unknown key 'modles'; did you mean 'models'?"),
        ("merge_method: linear\nmodules: {default: {models: [a], parameters: {weigth: 1}}}\n", "modules.default.parameters: linear has no parameter 'weigth'; did you mean 'weight'?"),
        ("merge_method: linear\nmodules: {default: {models: [{model: a, parameters: {weight: x}}]}}\n", "modules.default.models[0].parameters.weight: expected float, got 'x'"),
        # mergekit's long form of a model reference
        ("merge_method: linear\nmodels: [{model: {model: a, override_architecture: X}}]\n", "models[0].model.override_architecture is not supported yet"),
        ("merge_method: linear\nmodels: [{model: {model: {path: a, revison: x}}}]\n", "models[0].model.model: unknown key 'revison'; did you mean 'revision'?"),
        ("42\n", "a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_get_one_clear_error(text, message):
    with pytest.raises(MergeError) as e:
        parse_recipe(text, source="r.yml")
    assert message in str(e.value)
    assert str(e.value).startswith("r.yml")


def test_every_document_of_a_multi_stage_recipe_is_read_with_the_bounds():
    bomb = "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "\n".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10))
    with pytest.raises(MergeError, match="expand to more than 100,000 values"):
        parse_recipe("name: a\nmerge_method: linear\nmodels: [x]\n---\n" + bomb + "\n", source="r.yml")


def test_empty_documents_around_a_recipe_are_ignored():
    assert parse_recipe("---\nmerge_method: linear\nmodels: [a]\n---\n").models[0].model == "a"


MODULE_FORM = """
merge_method: ties
base_model: base
modules:
  default:
    slices:
    - sources:
      - {layer_range: [0, 4], model: ft1, parameters: {density: 0.5, weight: 0.5}}
      - {layer_range: [0, 4], model: base}
    parameters: {weight: [{filter: mlp, value: 0.25}], density: 0.9}
parameters: {weight: 0.75, normalize: 1.0}
"""


def test_module_default_is_the_recipe_with_its_models_or_slices_at_the_top_level():
    r = parse_recipe(MODULE_FORM.replace("    parameters: {weight: [{filter: mlp, value: 0.25}], density: 0.9}\n", ""))
    top = parse_recipe(
        "merge_method: ties\nbase_model: base\nslices:\n- sources:\n  - {layer_range: [0, 4], model: ft1, parameters: {density: 0.5, weight: 0.5}}\n"
        "  - {layer_range: [0, 4], model: base}\nparameters: {weight: 0.75, normalize: 1.0}\n"
    )
    assert r == top
    models = parse_recipe("merge_method: linear\nmodules:\n  default:\n    models: [a, {model: b, parameters: {weight: 2}}]\n")
    assert models.models == parse_recipe("merge_method: linear\nmodels: [a, {model: b, parameters: {weight: 2}}]\n").models


def test_named_modules_keep_their_own_models_slices_and_parameters():
    r = parse_recipe(
        "merge_method: linear\nparameters: {weight: 1.0}\nmodules:\n"
        "  text_decoder:\n    slices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]}]\n"
        "    parameters: {weight: [{filter: mlp, value: 0.25}]}\n"
        "  vision_tower: {models: [a]}\n  multi_modal_projector: {models: [b, c]}\n"
    )
    assert r.models is None and r.slices is None and r.model_refs() == ["a", "b", "c"] and r.donor == "a"
    assert [m.name for m in r.modules] == ["text_decoder", "vision_tower", "multi_modal_projector"]
    text = r.module_recipe(r.modules[0])
    assert text.slices == r.modules[0].slices and text.models is None and not text.modules
    assert evaluate(text.parameters["weight"], "model.layers.0.mlp.up_proj.weight", 0, FLOAT, "w") == 0.25  # the module's filter first
    assert evaluate(text.parameters["weight"], "model.layers.0.self_attn.o_proj.weight", 0, FLOAT, "w") == 1.0  # then the top level
    vision = r.module_recipe(r.modules[1])
    assert [m.model for m in vision.models] == ["a"] and vision.parameters == {"weight": 1.0}


@pytest.mark.needs("mergekit")
def test_module_parameters_rank_between_the_slices_and_the_top_level_as_in_mergekit():
    from mergekit.config import ConfigReader, MergeConfiguration, evaluate_setting

    r = parse_recipe(MODULE_FORM)
    config = MergeConfiguration.model_validate(yaml.safe_load(MODULE_FORM))
    module = config.modules["default"]
    reader = ConfigReader(config=config, t=0, module=module).for_out_slice(module.slices[0])
    for key in ("weight", "density", "normalize"):
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
            theirs = next(v for s in reader.parameter_sources() if s and key in s if (v := evaluate_setting(name, s[key], 0, validate=float)) is not None)
            ours = next(v for s in (r.slices[0].parameters, r.parameters) if key in s if (v := evaluate(s[key], name, 0, FLOAT, "w")) is not None)
            assert ours == theirs
    assert evaluate(r.parameters["weight"], "model.layers.0.mlp.up_proj.weight", 0, FLOAT, "w") == 0.25  # the module's filter
    assert evaluate(r.parameters["weight"], "model.layers.0.self_attn.o_proj.weight", 0, FLOAT, "w") == 0.75  # falls through


def test_settings_that_have_no_effect_are_accepted_with_a_warning():
    r = parse_recipe(
        "model_name: my-merge\nmerge_method: passthrough\nslices:\n"
        "- {sources: [{model: a, layer_range: [0, 2], model_name: A}], residual_weight: 0.5}\n",
        source="r.yml",
    )
    assert r.warnings == (
        "r.yml: model_name has no effect (mergekit ignores it too); remove it to silence this warning",
        "r.yml: slices[0].residual_weight has no effect (mergekit reads it and never uses it); remove it to silence this warning",
        "r.yml: slices[0].sources[0].model_name has no effect (mergekit ignores it too); remove it to silence this warning",
    )
    assert r.slices[0].sources[0].model == "a" and r.name is None
    assert parse_recipe("merge_method: linear\nmodels: [a]\n").warnings == ()


def test_mergekit_long_model_references_and_torch_dtype_names():
    r = parse_recipe(
        "merge_method: linear\nbase_model: {model: {path: org/base, revision: v2}}\ndtype: torch.bfloat16\n"
        "models: [{model: {model: org/a, lora: {path: org/adapter}}}, {model: {model: org/b}}]\n"
    )
    assert r.model_refs() == ["org/base@v2", "org/a+org/adapter", "org/b"]
    assert r.dtype == "bfloat16"


# what mergekit 0.1.5's validation (pydantic's lax bool) makes of each value, measured: None = refused
MERGEKIT_BOOLS = [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), (0.0, False), (-0.0, False),
    ("true", True), ("TRUE", True), ("yes", True), ("Yes", True), ("on", True), ("y", True), ("t", True), ("1", True),
    ("false", False), ("no", False), ("OFF", False), ("n", False), ("f", False), ("0", False),
    (2, None), (-1, None), (0.5, None), (float("nan"), None), ("1.0", None), (" true", None), ("true ", None),
    ("", None), ("none", None), ("01", None), (None, None), ([1], None),
]  # fmt: skip


@pytest.mark.needs("mergekit")
@pytest.mark.parametrize("value, expected", MERGEKIT_BOOLS)
def test_booleans_are_read_as_mergekit_reads_them(value, expected):
    from mergekit.merge_methods.base import ParameterScope, ParameterSpec

    spec = ParameterSpec("normalize", bool, ParameterScope.SHARED, default=True)
    try:
        theirs = spec.validate(value)
    except Exception:
        theirs = None
    assert theirs == expected  # the table above is mergekit's behaviour
    if expected is None:
        with pytest.raises(MergeError, match="n: expected a boolean"):
            convert(BOOL, value, "n")
    else:
        assert convert(BOOL, value, "n") is expected


def test_numbers_for_booleans_in_recipes_and_gradients():
    r = parse_recipe(
        "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 1}}]\n"
        "parameters: {normalize: 1.0, int8_mask: 0, rescale: 'off'}\n"
    )
    method = r.method
    assert [evaluate(r.parameters[k], "x", 0, method.param_index[k], k) for k in ("normalize", "int8_mask")] == [True, False]
    assert evaluate([1, 0.0], "x", 1.0, BOOL, "n") is False


def test_alias_bomb_is_refused_before_anything_walks_it():
    levels = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = "\n".join(levels) + "\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: *l9}}]\n"
    with pytest.raises(MergeError) as e:
        parse_recipe(text, source="r.yml")
    assert str(e.value) == (
        "r.yml: the recipe uses YAML aliases (*name) that expand to more than 100,000 values (under 'models'); "
        "write the values out instead of nesting aliases"
    )


def test_ordinary_aliases_and_merge_keys_still_work():
    r = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: &p {weight: [0.2, 0.8], normalize: false}\n"
        "  - model: b\n    parameters: *p\n  - model: c\n    parameters: {<<: *p, weight: 0.5}\n"
    )
    assert [m.parameters for m in r.models] == [
        {"weight": [0.2, 0.8], "normalize": False}, {"weight": [0.2, 0.8], "normalize": False}, {"weight": 0.5, "normalize": False},
    ]  # fmt: skip


def test_nesting_up_to_the_limit_is_read():
    # filters holding gradients (5 levels), and filter values nested 30 deep (33 levels), stay readable
    r = parse_recipe("merge_method: linear\nmodels: [a]\nparameters: {weight: [{filter: mlp, value: [0.5, 1]}]}\n")
    assert evaluate(r.parameters["weight"], "x.mlp.y", 1.0, FLOAT, "w") == 1.0
    deep = "{filter: mlp, value: " * 30 + "0.5" + "}" * 30
    assert evaluate(parse_recipe(f"merge_method: linear\nmodels: [a]\nparameters: {{weight: {deep}}}\n").parameters["weight"], "mlp", 0, FLOAT, "w") == 0.5


def test_recipe_files_with_a_utf8_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "r.yml"
    path.write_bytes("merge_method: linear\nmodels: [a]\n".encode("utf-8-sig"))
    assert load_recipe(str(path)).models[0].model == "a"


def test_convert_refuses_non_finite_floats():
    for value in (float("nan"), float("inf"), "-inf", "nan", 10**400):
        with pytest.raises(MergeError, match="w: "):
            convert(FLOAT, value, "w")
    assert convert(FLOAT, "1e-3", "w") == 0.001


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


@pytest.mark.slow
@pytest.mark.needs("mergekit")
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

"""Recipes that mergekit accepts (issue 14), through the CLI and against mergekit 0.1.5: the
``modules: {default: ...}`` form mergekit writes into model cards, numbers and words for
booleans, keys that have no effect, multi-stage recipes, and "did you mean" for close names."""

import json
from pathlib import Path

import pytest

from tests.helpers import assert_same_tensors, run_cli, run_main, run_mergekit, safetensors_files


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def plan_content(recipe: Path) -> dict:
    """``distmerge plan --json`` without what depends on the recipe's text rather than on what
    it asks for (the text itself, kept for the model card, and the fingerprint of it all)."""
    r = run_main("plan", recipe, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("recipe_text", "fingerprint"):
        d.pop(key)
    return d


def run(recipe: Path, out: Path):
    r = run_cli("run", recipe, out, "--quiet")
    assert r.returncode == 0, r.stderr
    return r


def tensor_bytes(out: Path) -> dict[str, bytes]:
    files = safetensors_files(out)
    return {f.name: f.read_bytes() for f in files} | {"config.json": (out / "config.json").read_bytes()}


def card_form(f, parameters: str = "") -> str:
    """A ties recipe as mergekit writes it into a model card (mergekit_config.yml, written from
    the parsed configuration): models turned into one slice of whole layer ranges, the base
    among the sources, under the module ``default``."""
    return f"""base_model: {f['base']}
dtype: float32
merge_method: ties
modules:
  default:
    slices:
    - sources:
      - layer_range: [0, 4]
        model: {f['ft1']}
        parameters:
          density: 0.5
          weight: 0.5
      - layer_range: [0, 4]
        model: {f['ft2']}
        parameters:
          density: 0.5
          weight: 0.5
      - layer_range: [0, 4]
        model: {f['base']}
{parameters}"""


@pytest.mark.slow
def test_module_default_runs_as_the_same_recipe_with_top_level_slices_and_as_mergekit(llama_family_f32, tmp_path):
    text = card_form(llama_family_f32)
    modules = write(tmp_path / "modules.yml", text)
    top = write(tmp_path / "top.yml", text.replace("modules:\n  default:\n    slices:\n", "slices:\n").replace("\n    ", "\n"))
    assert "modules" not in top.read_text() and "\nslices:\n- sources:\n  - layer_range" in top.read_text()
    assert plan_content(modules) == plan_content(top)
    run(modules, tmp_path / "ours-modules")
    run(top, tmp_path / "ours-top")
    assert tensor_bytes(tmp_path / "ours-modules") == tensor_bytes(tmp_path / "ours-top")
    theirs = run_mergekit(text, tmp_path / "mergekit")  # mergekit accepts the same text
    assert_same_tensors(tmp_path / "ours-modules", theirs)


@pytest.mark.slow
def test_module_parameters_rank_between_slices_and_top_level_as_in_mergekit(llama_family_f32, tmp_path):
    f = llama_family_f32
    text = f"""merge_method: linear
dtype: float32
modules:
  default:
    models:
      - model: {f['ft1']}
        parameters: {{weight: 1.0}}
      - model: {f['ft2']}
    parameters:
      weight: [{{filter: mlp, value: 3.0}}]
parameters:
  weight: 0.5
  normalize: true
"""
    run(write(tmp_path / "r.yml", text), tmp_path / "ours")
    assert_same_tensors(tmp_path / "ours", run_mergekit(text, tmp_path / "mergekit"))


@pytest.mark.slow
def test_numbers_for_booleans_run_as_in_mergekit(llama_family_f32, tmp_path):
    f = llama_family_f32
    text = f"""merge_method: ties
base_model: {f['base']}
models:
  - model: {f['ft1']}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {f['ft2']}
    parameters: {{weight: 0.6, density: 0.5}}
parameters: {{normalize: 1.0, int8_mask: 0}}
dtype: float32
"""
    numbers = write(tmp_path / "numbers.yml", text)
    words = write(tmp_path / "words.yml", text.replace("{normalize: 1.0, int8_mask: 0}", "{normalize: true, int8_mask: false}"))
    assert plan_content(numbers) == plan_content(words)
    run(numbers, tmp_path / "ours")
    assert_same_tensors(tmp_path / "ours", run_mergekit(text, tmp_path / "mergekit"))


@pytest.mark.slow
def test_a_boolean_mergekit_refuses_is_refused_at_plan_time(llama_family_f32, tmp_path):
    f = llama_family_f32
    text = f"merge_method: linear\nmodels: [{{model: {f['ft1']}}}, {{model: {f['ft2']}}}]\nparameters: {{normalize: 2}}\n"
    recipe = write(tmp_path / "r.yml", text)
    r = run_main("plan", recipe)
    assert r.returncode == 2
    assert r.stderr == (
        f"error: {recipe}: parameters.normalize: expected a boolean (true or false, 1 or 0, yes or no, on or off), got 2\n"
    )
    with pytest.raises(Exception, match="valid boolean, unable to interpret input .* input_value=2"):
        run_mergekit(text, tmp_path / "mergekit")


@pytest.mark.slow
def test_keys_with_no_effect_are_warned_about_and_run_as_mergekit_runs_them(llama_family, tmp_path):
    f = llama_family
    text = f"""model_name: stacked
merge_method: passthrough
slices:
  - sources: [{{model: {f['ft1']}, layer_range: [0, 3]}}]
    residual_weight: 0.5
  - sources: [{{model: {f['ft2']}, layer_range: [2, 4], model_name: second}}]
dtype: bfloat16
"""
    recipe = write(tmp_path / "r.yml", text)
    warnings = (
        f"warning: {recipe}: model_name has no effect (mergekit ignores it too); remove it to silence this warning\n"
        f"warning: {recipe}: slices[0].residual_weight has no effect (mergekit reads it and never uses it); remove it to silence this warning\n"
        f"warning: {recipe}: slices[1].sources[0].model_name has no effect (mergekit ignores it too); remove it to silence this warning\n"
    )
    r = run_main("plan", recipe)
    assert r.returncode == 0 and r.stderr == warnings
    assert run(recipe, tmp_path / "ours").stderr == warnings  # one rank: printed once
    plain = write(tmp_path / "plain.yml", text.replace("model_name: stacked\n", "").replace("    residual_weight: 0.5\n", "").replace(", model_name: second", ""))
    r = run(plain, tmp_path / "plain")
    assert r.stderr == ""
    assert tensor_bytes(tmp_path / "ours") == tensor_bytes(tmp_path / "plain")
    assert_same_tensors(tmp_path / "ours", run_mergekit(text, tmp_path / "mergekit"))


@pytest.mark.needs("mergekit")
@pytest.mark.slow
def test_multi_stage_recipe_runs_unchanged_its_stages_fused(llama_family, tmp_path):
    """The multi-document recipe mergekit-multi reads plans with its stages in run order and runs
    in one pass: the final output only, no intermediate written (tests/test_stages.py checks
    the bytes against staged runs and against mergekit-multi)."""
    from mergekit.scripts.multimerge import load_config

    f = llama_family
    text = f"""name: first-merge
merge_method: linear
models: [{{model: {f['ft1']}, parameters: {{weight: 1}}}}, {{model: {f['ft2']}, parameters: {{weight: 1}}}}]
---
name: second-merge
merge_method: slerp
base_model: first-merge
models: [{{model: first-merge}}, {{model: {f['ft3']}}}]
parameters: {{t: 0.5}}
---
merge_method: task_arithmetic
base_model: {f['base']}
models: [{{model: second-merge, parameters: {{weight: 0.5}}}}]
"""
    configs, needs = load_config(text, str(tmp_path / "intermediates"))  # a recipe mergekit-multi reads
    assert needs == {"first-merge": set(), "second-merge": {"first-merge"}, None: {"second-merge"}}
    recipe = write(tmp_path / "multi.yml", text)
    r = run_cli("plan", recipe)
    assert r.returncode == 0, r.stderr
    stages = [line.split(":")[0].strip() for line in r.stdout.splitlines() if line.startswith("  ") and "(not written)" in line]
    assert stages == ["first-merge", "second-merge"]
    r = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert run_cli("verify", tmp_path / "out").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml", "out"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: tie\nmodels: [a]\n", "unknown merge_method 'tie'; did you mean 'ties'? valid methods are arcee_fusion, breadcrumbs,"),
        ("merge_method: linear\nmodels: [a]\nparamters: {weight: 1}\n", "unknown key 'paramters'; did you mean 'parameters'? valid keys are base_model,"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, densty: 0.5}}]\n",
         "models[0].parameters: ties has no parameter 'densty'; did you mean 'density'? its parameters are: "),
    ],
)
def test_close_names_get_a_did_you_mean_through_the_cli(tmp_path, text, message):
    recipe = write(tmp_path / "r.yml", text)
    r = run_main("plan", recipe)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {recipe}: {message}") and r.stderr.count("\n") == 1

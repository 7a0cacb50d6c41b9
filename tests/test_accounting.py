"""Every input tensor is merged or deliberately left out with a reason; nothing is dropped,
cast or ignored silently."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distmerge.architecture import layer_index
from distmerge.demo import make_family
from distmerge.errors import MergeError
from distmerge.plan import build_plan
from distmerge.recipe import parse_recipe
from tests.helpers import load_state, run_cli, run_main


@pytest.fixture
def family(tmp_path) -> dict[str, Path]:
    """A float32 family of its own (the tests change its files): base, ft1, ft2; 4 layers."""
    return make_family(tmp_path / "fam", n_finetunes=2, seed=3, dtype=torch.float32, num_layers=4, shards={"ft2": 2})


def add_tensors(model: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add tensors to a checkpoint's last shard (and its index)."""
    index = model / "model.safetensors.index.json"
    file = sorted(model.glob("*.safetensors"))[-1]
    state = load_file(str(file))
    state.update(tensors)
    save_file(state, str(file), metadata={"format": "pt"})
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"].update({name: file.name for name in tensors})
        index.write_text(json.dumps(d))


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear(*models: Path, **extra) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], **extra}


def refused(tmp_path: Path, recipe: dict, *fragments: str) -> str:
    """`plan` and `run` both exit 2 with one line naming the problem; `run` creates nothing."""
    path = write_recipe(tmp_path / "r.yml", recipe)
    out = tmp_path / "out"
    for args in (("plan", path), ("run", path, out)):
        r = run_main(*args) if args[0] == "plan" else run_cli(*args, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


# ---------------------------------------------------------------- nothing dropped


@pytest.mark.slow
def test_weights_for_layers_past_the_config_are_refused(family, tmp_path):
    """config.json says 4 layers while the weights hold 0-5: layers 4 and 5 would be dropped."""
    for name in ("ft1", "ft2"):
        state = load_state(family[name])
        add_tensors(family[name], {n.replace("layers.3.", f"layers.{k}."): state[n].clone() for k in (4, 5) for n in state if ".layers.3." in n})
    refused(tmp_path, linear(family["ft1"], family["ft2"]), str(family["ft1"]), "config.json says 4 layers", "layer(s) 4-5")


@pytest.mark.slow
def test_a_tensor_only_one_model_has_is_refused(family, tmp_path):
    """ft2 holds a tensor that ft1 (the first model, which decides the output's tensors) lacks."""
    add_tensors(family["ft2"], {"model.layers.1.mlp.extra.weight": torch.ones(3)})
    refused(tmp_path, linear(family["ft1"], family["ft2"]), "model.layers.1.mlp.extra.weight", "don't line up")
    add_tensors(family["ft2"], {"model.extra_norm.weight": torch.ones(3)})  # outside the layers, too
    refused(tmp_path, linear(family["ft1"], family["ft2"]), "would not be merged")


def tiny_vision_language(kind: str, out: Path) -> Path:
    """A tiny multimodal checkpoint written by transformers' own class."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration)  # fmt: skip

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    if kind == "qwen2_vl":
        rope = {"type": "mrope", "mrope_section": [1, 1, 2]}
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2, spatial_merge_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=dict(**text, rope_scaling=rope), vision_config=vision))
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=8, patch_size=4)
        model = LlavaForConditionalGeneration(LlavaConfig(text_config=LlamaConfig(**text), vision_config=vision, image_token_index=100))
    model.save_pretrained(out)
    return out


@pytest.mark.needs("transformers")
@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, stacks",
    [("qwen2_vl", ["model.layers.", "visual.blocks."]), ("llava", ["language_model.model.layers.", "vision_tower.encoder.layers."])],
)
def test_a_checkpoint_with_a_vision_stack_merges_every_stack(tmp_path, kind, stacks):
    """Issue 18: the vision encoder's layers beside the text decoder's are merged, none dropped
    (tests/test_multimodal.py loads and runs the outputs)."""
    a = tiny_vision_language(kind, tmp_path / "a")
    b = tiny_vision_language(kind, tmp_path / "b")
    path = write_recipe(tmp_path / "r.yml", linear(a, b))
    plan = build_plan(parse_recipe(path.read_text(), str(tmp_path)))
    assert {t.name for t in plan.tensors} == set(load_file(a / "model.safetensors")) and not plan.left_out
    assert all(any(t.name.startswith(s) for t in plan.tensors) for s in stacks)


@pytest.mark.slow
def test_the_same_model_twice_is_refused(family, tmp_path):
    """mergekit refuses it ("Duplicate merge inputs"); one entry's weight would be ignored."""
    recipe = linear(family["ft1"], family["ft1"])
    recipe["models"][1]["parameters"]["weight"] = 0.3
    refused(tmp_path, recipe, f"model {str(family['ft1'])!r} is listed 2 times")
    sliced = {
        "merge_method": "linear", "dtype": "float32",
        "slices": [{"sources": [{"model": str(family["ft1"]), "layer_range": [0, 2]}, {"model": str(family["ft1"]), "layer_range": [2, 4]}]}],
    }  # fmt: skip
    refused(tmp_path, sliced, "slices[0].sources", "listed 2 times")


# ---------------------------------------------------------------- integer and bool tensors


@pytest.mark.slow
def test_integer_and_bool_tensors_are_copied_bit_for_bit(family, tmp_path):
    index = torch.tensor([2**40 + 1, -7, 2**62], dtype=torch.int64)
    mask = torch.tensor([True, False, True, True])
    for name in ("base", "ft1", "ft2"):
        add_tensors(family[name], {"model.layers.0.self_attn.index": index, "model.layers.2.mask": mask})
    recipe = {
        "merge_method": "task_arithmetic", "base_model": str(family["base"]), "dtype": "bfloat16",
        "models": [{"model": str(family[m]), "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")],
    }  # fmt: skip
    out = tmp_path / "out"
    r = run_cli("run", write_recipe(tmp_path / "r.yml", recipe), out, "--quiet")
    assert r.returncode == 0, r.stderr
    merged = load_state(out)
    assert merged["model.layers.0.self_attn.index"].dtype == torch.int64
    assert torch.equal(merged["model.layers.0.self_attn.index"], index)  # 2**40 + 1, not 1099511627776.0
    assert merged["model.layers.2.mask"].dtype == torch.bool and torch.equal(merged["model.layers.2.mask"], mask)
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # float tensors still follow dtype
    assert run_cli("verify", out, "--full").returncode == 0


@pytest.mark.slow
def test_integer_tensors_that_differ_between_models_are_refused(family, tmp_path):
    add_tensors(family["ft1"], {"model.layers.0.self_attn.index": torch.tensor([1, 2, 3])})
    add_tensors(family["ft2"], {"model.layers.0.self_attn.index": torch.tensor([1, 2, 4])})
    out = tmp_path / "out"
    r = run_cli("run", write_recipe(tmp_path / "r.yml", linear(family["ft1"], family["ft2"])), out)
    assert r.returncode == 2, r.stderr
    assert "'model.layers.0.self_attn.index' (I64) holds different values" in r.stderr
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("model-*.safetensors"))


@pytest.mark.slow
def test_integer_and_float_versions_of_one_tensor_are_refused(family, tmp_path):
    add_tensors(family["ft1"], {"model.layers.0.self_attn.index": torch.tensor([1, 2, 3])})
    add_tensors(family["ft2"], {"model.layers.0.self_attn.index": torch.tensor([1.0, 2.0, 3.0])})
    refused(tmp_path, linear(family["ft1"], family["ft2"]), "different dtypes", "I64", "F32")


# ---------------------------------------------------------------- weights refused before any work


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, weights, extra",
    [("linear", [1.0, -1.0], {}), ("linear", [0.5, -0.25, -0.25], {}), ("multislerp", [2.0, -2.0], {})],
)
def test_weights_summing_to_zero_are_refused_at_plan_time(family, tmp_path, method, weights, extra):
    models = [family["ft1"], family["ft2"], family["base"]][: len(weights)]
    recipe = {"merge_method": method, "dtype": "float32", "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)], **extra}
    refused(tmp_path, recipe, "sum to zero", "divides by their sum")


@pytest.mark.slow
def test_weights_summing_to_zero_without_normalize_are_merged(family, tmp_path):
    recipe = linear(family["ft1"], family["ft2"], parameters={"normalize": False})
    recipe["models"][1]["parameters"]["weight"] = -1.0
    out = tmp_path / "out"
    assert run_cli("run", write_recipe(tmp_path / "r.yml", recipe), out, "--quiet").returncode == 0
    a, b, merged = load_state(family["ft1"]), load_state(family["ft2"]), load_state(out)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged[name], a[name] - b[name])


# ---------------------------------------------------------------- the left-out list


def frankenmerge(family) -> dict:
    """ft1's layers 0-2 then ft2's layers 1-3: ft1's layer 3, ft2's layer 0, ft1's final norm
    and lm_head and ft2's embeddings are not read."""
    return {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(family["ft1"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(family["ft2"]), "layer_range": [1, 4]}]},
        ],
    }  # fmt: skip


def read_names(plan) -> dict[int, set[str]]:
    read: dict[int, set[str]] = {}
    for t in plan.tensors:
        for r in t.all_inputs:
            read.setdefault(r.model, set()).add(r.name)
    return read


def accounted(plan) -> None:
    """Every tensor of every input is read by the plan or in its left-out list, not both."""
    read = read_names(plan)
    for i, m in enumerate(plan.models):
        left = [n for g in plan.left_out if g.model == i for n in g.tensors]
        assert len(left) == len(set(left))
        assert not set(left) & read.get(i, set())
        names = set(load_state(m.path))
        assert read.get(i, set()) | set(left) == names, m.ref


def test_a_frankenmerge_lists_what_it_leaves_out_with_reasons(family, tmp_path):
    plan = build_plan(parse_recipe(yaml.safe_dump(frankenmerge(family))))
    accounted(plan)
    left = {(plan.models[g.model].ref, g.reason): sorted(g.tensors) for g in plan.left_out}
    ft1, ft2 = str(family["ft1"]), str(family["ft2"])
    layer3 = left[ft1, "its layer is in no slice's layer_range"]
    assert layer3 and all(layer_index(n) == 3 for n in layer3)
    assert all(layer_index(n) == 0 for n in left[ft2, "its layer is in no slice's layer_range"])
    assert left[ft2, "embeddings come from the first slice's models"] == ["model.embed_tokens.weight"]
    assert left[ft1, "tensors after the layers (final norm, lm_head) come from the last slice's models"] == ["lm_head.weight", "model.norm.weight"]
    assert len(left) == 4


def test_plan_prints_the_left_out_list(family, tmp_path):
    r = run_main("plan", write_recipe(tmp_path / "r.yml", frankenmerge(family)))
    assert r.returncode == 0, r.stderr
    assert "left out (not merged): 21 input tensors" in r.stdout  # 9 per Llama layer, + norm, lm_head, embeddings
    assert f"{family['ft1']}: 9 tensors (layers 3): its layer is in no slice's layer_range" in r.stdout
    assert f"{family['ft2']}: 1 tensors (model.embed_tokens.weight): embeddings come from the first slice's models" in r.stdout
    j = json.loads(run_main("plan", tmp_path / "r.yml", "--json").stdout)
    assert sum(len(g["tensors"]) for g in j["left_out"]) == 21
    r = run_main("plan", write_recipe(tmp_path / "r2.yml", linear(family["ft1"], family["ft2"])))
    assert "left out: nothing (every input tensor is read)" in r.stdout


@pytest.mark.parametrize(
    "recipe",
    [
        lambda f: {**linear(f["ft1"], f["ft2"]), "base_model": str(f["base"]), "parameters": {"weight": 0.5}},
        lambda f: {"merge_method": "ties", "base_model": str(f["base"]), "parameters": {"density": 0.5, "weight": 0.5},
                   "models": [{"model": str(f["ft1"])}, {"model": str(f["ft2"])}]},
        lambda f: {"merge_method": "slerp", "base_model": str(f["base"]), "parameters": {"t": [0, 0.5, 1]},
                   "slices": [{"sources": [{"model": str(f["base"]), "layer_range": [0, 4]}, {"model": str(f["ft1"]), "layer_range": [0, 4]}]}]},
        lambda f: {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(f["ft1"]), "layer_range": [0, 4]}]},
                                                             {"sources": [{"model": str(f["ft1"]), "layer_range": [2, 4]}]}]},
        lambda f: {"merge_method": "linear", "base_model": str(f["base"]), "parameters": {"weight": 1.0},
                   "slices": [{"sources": [{"model": str(f["ft1"]), "layer_range": [0, 2]}, {"model": str(f["ft2"]), "layer_range": [2, 4]}]}]},
    ],
    ids=["linear", "ties", "slerp-gradient", "passthrough-repeat", "base-in-no-slice"],
)
def test_every_input_tensor_is_read_or_left_out_with_a_reason(family, recipe):
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe(family))))
    accounted(plan)


def test_a_base_model_in_no_slice_is_listed_as_left_out(family):
    recipe = {
        "merge_method": "linear", "base_model": str(family["base"]), "parameters": {"weight": 1.0},
        "slices": [{"sources": [{"model": str(family["ft1"]), "layer_range": [0, 4]}, {"model": str(family["ft2"]), "layer_range": [0, 4]}]}],
    }  # fmt: skip
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe)))
    groups = [g for g in plan.left_out if plan.models[g.model].ref == str(family["base"])]
    assert len(groups) == 1 and "in no slice's sources" in groups[0].reason
    assert len(groups[0].tensors) == len(load_state(family["base"]))


def test_build_plan_raises_for_a_dropped_tensor(family):
    """The invariant lives in build_plan itself, not only in the CLI."""
    add_tensors(family["ft2"], {"model.layers.2.self_attn.k_norm.weight": torch.ones(4)})
    with pytest.raises(MergeError, match="model.layers.2.self_attn.k_norm.weight"):
        build_plan(parse_recipe(yaml.safe_dump(linear(family["ft1"], family["ft2"]))))

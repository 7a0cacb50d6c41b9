"""Multimodal checkpoints (issue #18): every layer stack is recognised with its own count
(distmerge.architecture.layer_stacks); ``models:`` recipes merge every stack, a passthrough
slice remaps the text decoder's layers and takes the encoders from its first slice's models;
the outputs load in transformers' own classes with no missing or unexpected weights."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distmerge.architecture import comes_before_layers, layer_count, layer_stacks, set_layer_count, split_layer_name
from distmerge.plan import build_plan
from distmerge.recipe import parse_recipe
from tests.helpers import load_state, run_cli

LLAVA_NAMES = [
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.1.self_attn.q_proj.weight",
    "vision_tower.encoder.layers.0.mlp.fc1.weight",
    "multi_modal_projector.linear_1.weight",
    "language_model.lm_head.weight",
]
QWEN2VL_NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight", "visual.blocks.1.attn.qkv.weight", "visual.merger.mlp.0.weight", "lm_head.weight"]


def test_layer_stacks_of_a_llava_config():
    config = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 3}}
    assert layer_stacks(config, LLAVA_NAMES) == [
        ("language_model.model.layers", "text", "text_config.num_hidden_layers", 2),
        ("vision_tower.encoder.layers", "vision", "vision_config.num_hidden_layers", 3),
    ]
    assert layer_count(config) == 2


def test_layer_stacks_of_a_qwen2_vl_config():
    """Qwen2-VL counts its text layers at the top level (older configs) and its vision blocks at vision_config.depth."""
    config = {"num_hidden_layers": 4, "vision_config": {"depth": 2}}
    assert layer_stacks(config, QWEN2VL_NAMES) == [("model.layers", "text", "num_hidden_layers", 4), ("visual.blocks", "vision", "vision_config.depth", 2)]


def test_encoder_tensors_are_not_text_layers_and_come_first():
    for name in ["vision_tower.encoder.layers.0.mlp.fc1.weight", "visual.blocks.1.attn.qkv.weight", "multi_modal_projector.linear_1.weight", "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]:
        assert split_layer_name(name) is None and comes_before_layers(name), name
    assert split_layer_name("language_model.model.layers.1.self_attn.q_proj.weight").index == 1
    assert not comes_before_layers("language_model.model.norm.weight")


def test_set_layer_count_writes_the_nested_key_only():
    config = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 2}}
    set_layer_count(config, 5)
    assert config == {"text_config": {"num_hidden_layers": 5}, "vision_config": {"num_hidden_layers": 2}}
    gpt2 = {"n_layer": 2}
    set_layer_count(gpt2, 4)
    assert gpt2 == {"n_layer": 4}


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=128)


def _llava(transformers, path, seed):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8)
    config = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**TEXT), vision_config=vision, image_token_index=127, image_seq_length=4)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path


def _qwen2vl(transformers, path, seed):
    torch.manual_seed(seed)
    config = transformers.Qwen2VLConfig(
        text_config=dict(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2),
    )
    transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path


def _gemma3(transformers, path, seed):
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=300, sliding_window=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("vlm")
    return {
        "llava": [_llava(transformers, d / f"llava{i}", i) for i in range(2)],
        "qwen2vl": [_qwen2vl(transformers, d / f"qwen2vl{i}", 10 + i) for i in range(2)],
        "gemma3": [_gemma3(transformers, d / f"gemma3{i}", 20 + i) for i in range(2)],
    }


def _plan(tmp_path, recipe):
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    return build_plan(parse_recipe(path.read_text(), str(tmp_path)), path.read_text()), path


def _accounted(plan, paths):
    """Every input tensor is read by the plan or left out with a reason: nothing vanishes."""
    read = {(r.model, r.name) for t in plan.tensors for r in t.all_inputs}
    left = {(g.model, n) for g in plan.left_out for n in g.tensors}
    assert all(g.reason for g in plan.left_out)
    every = {(i, n) for i, p in enumerate(paths) for n in load_file(p / "model.safetensors")}
    assert read | left == every
    return read


def _run(recipe_path, out):
    proc = run_cli("run", recipe_path, out, "--quiet", "--device", "cpu", timeout=600)
    assert proc.returncode == 0, proc.stderr


def _loads(cls, out):
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.slow
@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llava", "qwen2vl", "gemma3"])
@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_models_recipes_merge_every_stack(tmp_path, vlms, family, method):
    a, b = vlms[family]
    if method == "linear":
        recipe = {"models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    elif method == "ties":
        recipe = {"base_model": str(a), "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}]}
    else:
        recipe = {"base_model": str(a), "parameters": {"t": 0.5}, "models": [{"model": str(a)}, {"model": str(b)}]}
    recipe.update(merge_method=method, dtype="float32")
    plan, _ = _plan(tmp_path, recipe)
    read = _accounted(plan, [a, b] if plan.models[0].path == str(a) else [b, a])
    assert not plan.left_out
    names = {t.name for t in plan.tensors}
    assert names == set(load_file(a / "model.safetensors"))
    vision = [n for n in names if n.startswith(("vision_tower.", "visual."))]
    assert vision and all((0, n) in read and (1, n) in read for n in vision)  # the encoder is merged, from both models


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_llava_linear_loads_and_runs(tmp_path, vlms):
    transformers = pytest.importorskip("transformers")
    a, b = vlms["llava"]
    recipe = {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    _, path = _plan(tmp_path, recipe)
    _run(path, tmp_path / "out")
    cls = transformers.LlavaForConditionalGeneration
    merged, ma, mb = _loads(cls, tmp_path / "out"), _loads(cls, a), _loads(cls, b)
    for name, p in merged.state_dict().items():  # the mean of the two, every stack
        torch.testing.assert_close(p, (ma.state_dict()[name] + mb.state_dict()[name]) / 2)
    ids = torch.tensor([[1, 127, 127, 127, 127, 5, 6]])
    with torch.no_grad():
        out = merged(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16))
    assert out.logits.shape == (1, 7, 128) and torch.isfinite(out.logits).all()


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_llava_text_decoder_passthrough(tmp_path, vlms):
    """Layers [0, 2) of a then [1, 2) of b: 3 text layers at text_config.num_hidden_layers; the vision
    tower and projector come from the first slice's model (a), b's are left out with a reason."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms["llava"]
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]}
    plan, path = _plan(tmp_path, recipe)
    _accounted(plan, [a, b])
    assert plan.config["text_config"]["num_hidden_layers"] == 3 and plan.config["vision_config"]["num_hidden_layers"] == 2
    assert "num_hidden_layers" not in plan.config
    _run(path, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["text_config"]["num_hidden_layers"] == 3 and "num_hidden_layers" not in written
    cls = transformers.LlavaForConditionalGeneration
    merged, ma, mb = _loads(cls, tmp_path / "out"), _loads(cls, a), _loads(cls, b)
    sd, sa, sb = merged.state_dict(), ma.state_dict(), mb.state_dict()
    text = next(n for n in sd if ".layers.2.self_attn.q_proj.weight" in n and "vision" not in n)
    torch.testing.assert_close(sd[text], sb[text.replace(".layers.2.", ".layers.1.")], rtol=0, atol=0)
    for name in sd:
        if "vision_tower" in name or "multi_modal_projector" in name or "embed_tokens" in name:
            torch.testing.assert_close(sd[name], sa[name], rtol=0, atol=0)
    with torch.no_grad():
        out = merged(input_ids=torch.tensor([[1, 127, 127, 127, 127, 5]]), pixel_values=torch.randn(1, 3, 16, 16))
    assert out.logits.shape == (1, 6, 128) and torch.isfinite(out.logits).all()
    verified = run_cli("verify", tmp_path / "out", timeout=600)  # checks text_config.num_hidden_layers against the text layers
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_qwen2vl_passthrough_keeps_the_vision_encoder(tmp_path, vlms):
    transformers = pytest.importorskip("transformers")
    a, b = vlms["qwen2vl"]
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [0, 2]}]}]}
    plan, path = _plan(tmp_path, recipe)
    _accounted(plan, [a, b])
    assert sum(n.startswith("visual.blocks.") for n in (t.name for t in plan.tensors)) == sum(n.startswith("visual.blocks.") for n in load_file(a / "model.safetensors"))
    _run(path, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert layer_count(written) == 4 and written["vision_config"]["depth"] == 2
    merged = _loads(transformers.Qwen2VLForConditionalGeneration, tmp_path / "out")
    assert merged.config.text_config.num_hidden_layers == 4
    _forward(merged, "qwen2vl")  # on text and on an image


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_vision_layers_past_their_config_count_are_refused(tmp_path, vlms):
    import shutil

    from distmerge.errors import MergeError

    src = tmp_path / "short"
    shutil.copytree(vlms["qwen2vl"][0], src)
    config = json.loads((src / "config.json").read_text())
    config["vision_config"]["depth"] = 1
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"vision_config\.depth says 1 layers, but .* visual\.blocks layer\(s\) 1,"):
        _plan(tmp_path, {"merge_method": "linear", "models": [{"model": str(src), "parameters": {"weight": 1.0}}]})


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_gemma3_text_decoder_passthrough_loads_and_runs(tmp_path, vlms):
    """Gemma 3 (SigLIP tower, per-layer layer_types in text_config): 3 text layers, layer_types follows the layer map."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms["gemma3"]
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]}
    plan, path = _plan(tmp_path, recipe)
    _accounted(plan, [a, b])
    _run(path, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["text_config"]["num_hidden_layers"] == 3 and len(written["text_config"]["layer_types"]) == 3
    assert "num_hidden_layers" not in written
    merged = _loads(transformers.Gemma3ForConditionalGeneration, tmp_path / "out")
    _forward(merged, "gemma3")  # on text and on an image


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_a_nested_layer_count_that_is_not_a_number_is_refused(tmp_path, vlms):
    import shutil

    from distmerge.errors import MergeError

    src = tmp_path / "bad"
    shutil.copytree(vlms["llava"][0], src)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = "2"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"text_config\.num_hidden_layers is '2', not a whole number"):
        _plan(tmp_path, {"merge_method": "linear", "models": [{"model": str(src), "parameters": {"weight": 1.0}}]})


@pytest.mark.needs("transformers")
def test_plan_shows_each_layer_stack(tmp_path, vlms):
    """``distmerge plan``: a line per stack of the output with its count and the key it is written at."""
    from distmerge.cli import describe

    a, b = vlms["llava"]
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]}
    text = describe(_plan(tmp_path, recipe)[0])
    assert "\nlayer stacks (2):\n  language_model.model.layers.N (text): 3 layers, config text_config.num_hidden_layers\n" \
        "  vision_tower.encoder.layers.N (vision): 2 layers, config vision_config.num_hidden_layers\n" in text
    assert "\noutput: " in text and ", 3 layers, " in text.split("\noutput: ")[1].split("\n")[0]
    a, _ = vlms["qwen2vl"]
    text = describe(_plan(tmp_path, {"merge_method": "passthrough", "models": [{"model": str(a)}]})[0])
    assert "\nlayer stacks (2):\n  model.layers.N (text): 2 layers, config text_config.num_hidden_layers\n  visual.blocks.N (vision): 2 layers, config vision_config.depth\n" in text


# --- mergekit's modules: syntax (text_decoder, vision_tower, multi_modal_projector) ----------

MODULES = ("text_decoder", "vision_tower", "multi_modal_projector")


def _by_name(plan):
    """name -> what decides its bytes: inputs (model, tensor), base, parameters, dtype, shape."""
    ref = lambda r: (plan.models[r.model].ref, r.name)  # noqa: E731
    return {t.name: ([ref(r) for r in t.inputs], t.base and ref(t.base), t.params, t.input_params, t.dtype, t.shape, t.layer) for t in plan.tensors}


def _modules(**modules):
    return {name: ({"models": spec} if isinstance(spec, list) else spec) for name, spec in modules.items()}


@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llava", "qwen2vl", "gemma3"])
def test_modules_with_the_same_models_plan_as_a_models_recipe(tmp_path, vlms, family):
    """Every module merging the same models with the same weights: the tensors of the models:
    recipe, each from the same inputs with the same parameters (only their order differs)."""
    a, b = vlms[family]
    models = [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]
    flat, _ = _plan(tmp_path, {"merge_method": "linear", "dtype": "float32", "models": models})
    mods, _ = _plan(tmp_path, {"merge_method": "linear", "dtype": "float32", "modules": _modules(**{m: models for m in MODULES})})
    assert _by_name(mods) == _by_name(flat) and mods.config == flat.config and not mods.left_out
    _accounted(mods, [a, b])


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_llava_modules_recipe_writes_the_models_recipe_bytes(tmp_path, vlms):
    """The two recipes run: the same tensors, bit for bit; the output loads with no missing or unexpected weights."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms["llava"]
    models = [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]
    for name, recipe in (("flat", {"models": models}), ("mods", {"modules": _modules(**{m: models for m in MODULES})})):
        _, path = _plan(tmp_path, {"merge_method": "linear", "dtype": "float32", **recipe})
        _run(path, tmp_path / name)
    flat, mods = load_state(tmp_path / "flat"), load_state(tmp_path / "mods")
    assert set(flat) == set(mods)
    for name in flat:
        assert torch.equal(flat[name], mods[name]), name
    _loads(transformers.LlavaForConditionalGeneration, tmp_path / "mods")


@pytest.mark.needs("transformers")
def test_module_parameters_apply_to_their_module_only(tmp_path, vlms):
    """modules.vision_tower.parameters ranks over the top level's for the vision tower's
    tensors only; a gradient over the vision tower's layers runs over its own layer count (t per
    vision layer, as mergekit plans each module's slices)."""
    a, b = vlms["qwen2vl"]
    models = [{"model": str(a)}, {"model": str(b)}]
    plan, _ = _plan(tmp_path, {"merge_method": "linear", "parameters": {"weight": 0.5, "normalize": False}, "modules": _modules(
        text_decoder=models, multi_modal_projector=models,
        vision_tower={"models": models, "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}]}})})
    weights = {t.name: t.input_params["weight"][0] for t in plan.tensors}
    assert weights["visual.blocks.0.mlp.fc1.weight"] == 0.0 and weights["visual.blocks.1.mlp.fc1.weight"] == 1.0
    assert weights["visual.blocks.1.attn.qkv.weight"] == 0.5  # the module's filter does not match: the top level's
    assert weights["model.layers.1.mlp.up_proj.weight"] == 0.5 and weights["visual.merger.mlp.0.weight"] == 0.5


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_modules_passthrough_of_the_text_decoder(tmp_path, vlms):
    """A text-decoder frankenmerge in modules: form: with the encoders from the first slice's
    model it is the slices: recipe; with the vision tower and projector from b, those are b's."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms["llava"]
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]
    flat, _ = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "slices": slices})
    same, _ = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "modules": _modules(
        text_decoder={"slices": slices}, vision_tower=[{"model": str(a)}], multi_modal_projector=[{"model": str(a)}])})
    assert _by_name(same) == _by_name(flat) and same.config == flat.config and same.layer_map == flat.layer_map
    plan, path = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "modules": _modules(
        text_decoder={"slices": slices}, vision_tower=[{"model": str(b)}], multi_modal_projector=[{"model": str(b)}])})
    _accounted(plan, [a, b])
    left = {g.reason: g for g in plan.left_out}
    assert {len(g.tensors) for r, g in left.items() if r.startswith("not among modules.vision_tower")} == {sum(n.startswith("vision_tower.") for n in load_file(a / "model.safetensors"))}
    assert plan.config["text_config"]["num_hidden_layers"] == 3 and plan.config["vision_config"]["num_hidden_layers"] == 2
    _run(path, tmp_path / "out")
    merged = _loads(transformers.LlavaForConditionalGeneration, tmp_path / "out")
    sd, sb = merged.state_dict(), _loads(transformers.LlavaForConditionalGeneration, b).state_dict()
    for name in sd:
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert torch.equal(sd[name], sb[name]), name
    with torch.no_grad():
        out = merged(input_ids=torch.tensor([[1, 127, 127, 127, 127, 5]]), pixel_values=torch.randn(1, 3, 16, 16))
    assert out.logits.shape == (1, 6, 128) and torch.isfinite(out.logits).all()


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_modules_slices_of_the_vision_tower(tmp_path, vlms):
    """A vision-tower frankenmerge: its layers from a then b, counted at vision_config.num_hidden_layers
    (and only there); its tensors before the layers from a, after them (post_layernorm) from b."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms["llava"]
    plan, path = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "modules": _modules(
        text_decoder=[{"model": str(a)}], multi_modal_projector=[{"model": str(a)}],
        vision_tower={"slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]})})
    _accounted(plan, [a, b])
    inputs = {t.name: (plan.models[t.inputs[0].model].ref, t.inputs[0].name) for t in plan.tensors}
    assert inputs["vision_tower.encoder.layers.2.mlp.fc1.weight"] == (str(b), "vision_tower.encoder.layers.1.mlp.fc1.weight")
    assert inputs["vision_tower.embeddings.patch_embedding.weight"][0] == str(a) and inputs["vision_tower.post_layernorm.weight"][0] == str(b)
    assert plan.config["vision_config"]["num_hidden_layers"] == 3 and plan.config["text_config"]["num_hidden_layers"] == 2
    assert plan.layer_map == [[(str(a), 0)], [(str(a), 1)]]  # the text decoder's
    _run(path, tmp_path / "out")
    merged = _loads(transformers.LlavaForConditionalGeneration, tmp_path / "out")
    assert merged.config.vision_config.num_hidden_layers == 3
    with torch.no_grad():
        out = merged(input_ids=torch.tensor([[1, 127, 127, 127, 127, 5]]), pixel_values=torch.randn(1, 3, 16, 16))
    assert torch.isfinite(out.logits).all()


@pytest.mark.needs("transformers")
def test_modules_recipes_that_cannot_be_merged_are_one_error(tmp_path, vlms):
    from distmerge.errors import MergeError

    a, b = vlms["llava"]
    q, _ = vlms["qwen2vl"]
    one = [{"model": str(a)}]
    cases = [
        (_modules(text_decoder=one), r"modules: the recipe names text_decoder, but .* also has multi_modal_projector, vision_tower, which the output needs to load .*; add multi_modal_projector: \{models: \[\.\.\.\]\} to modules"),
        (_modules(text_decoder=one, vision_model=one, multi_modal_projector=one), r"modules\.vision_model: model .* has no module 'vision_model'; mergekit's module names for it are text_decoder, multi_modal_projector, vision_tower"),
        (_modules(text_decoder=one, vision_tower=one, multi_modal_projector={"slices": [{"sources": [{"model": str(a), "layer_range": [0, 1]}]}]}),
         r"modules\.multi_modal_projector: this module has no numbered layers to slice; give it models: instead of slices:"),
        (_modules(text_decoder=one, vision_tower={"slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]}]}, multi_modal_projector=one),
         r"modules\.vision_tower\.slices\[0\]: layer_range \[0, 3\] of .* is out of bounds: the model has 2 layers"),
        (_modules(text_decoder=[{"model": str(q)}], vision_tower=one, multi_modal_projector=one), r"modules: model .*qwen2vl0' is \['Qwen2VLForConditionalGeneration'\], but the output takes .*llava0'.s config, \['LlavaForConditionalGeneration'\]; each module must come from models of the donor's architecture"),
    ]
    for modules, message in cases:
        with pytest.raises(MergeError, match=message):
            _plan(tmp_path, {"merge_method": "passthrough", "modules": modules})


def test_modules_of_a_language_model_is_default(tmp_path, llama_family):
    from distmerge.errors import MergeError

    with pytest.raises(MergeError, match=r"modules\.text_decoder: model .* has no module 'text_decoder'; it is a language model: merge it with models or slices, or modules: \{default: \.\.\.\}"):
        _plan(tmp_path, {"merge_method": "passthrough", "modules": _modules(text_decoder=[{"model": str(llama_family["base"])}])})


@pytest.mark.slow
@pytest.mark.needs("transformers", "mergekit")
@pytest.mark.parametrize("family, error, message", [
    ("llava", KeyError, "text_decoder"),  # no LLaVA definition: mergekit infers one module, 'default'
    ("qwen2vl", RuntimeError, "has no attribute num_hidden_layers"),  # qwen2_vl.json reads it at the top level; transformers 5 nests it
    ("gemma3", RuntimeError, r"Tensor vision_tower\.vision_model\.embeddings\.patch_embedding\.bias required but not present"),  # its names predate transformers 5
])
def test_mergekit_cannot_merge_these_modules_recipes(tmp_path, vlms, family, error, message):
    """mergekit 0.1.5 is no reference here: on checkpoints saved by the installed transformers its
    modules: recipe fails for each family (README, "Differences from mergekit"); distmerge's
    result is checked against its models:/slices: recipes above instead."""
    from tests.helpers import run_mergekit

    a, b = vlms[family]
    models = [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]
    with pytest.raises(error, match=message):
        run_mergekit({"merge_method": "linear", "dtype": "float32", "modules": _modules(**{m: models for m in MODULES})}, tmp_path / "mergekit")


@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["qwen2vl", "gemma3"])
def test_modules_passthrough_equals_the_slices_recipe(tmp_path, vlms, family):
    """Qwen2-VL (projector inside the vision tower) and Gemma 3: a text-decoder frankenmerge in
    modules: form, encoders from the first slice's model, plans as the slices: recipe."""
    a, b = vlms[family]
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]
    flat, _ = _plan(tmp_path, {"merge_method": "passthrough", "slices": slices})
    mods, path = _plan(tmp_path, {"merge_method": "passthrough", "modules": _modules(
        text_decoder={"slices": slices}, vision_tower=[{"model": str(a)}], multi_modal_projector=[{"model": str(a)}])})
    assert _by_name(mods) == _by_name(flat) and mods.config == flat.config and mods.layer_map == flat.layer_map
    assert layer_count(mods.config) == 3
    _accounted(mods, [a, b])


# --- TIES and SLERP from one run, loaded and run on text and on an image -------------------------


def _ties_and_slerp(tmp_path, a, b):
    """One ``distmerge run`` of a two-document recipe: TIES (named, kept with --keep-intermediates)
    and SLERP, both of a and b. Returns {method: output directory}."""
    ties = {"name": "ties", "merge_method": "ties", "dtype": "float32", "base_model": str(a),
            "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}]}
    slerp = {"merge_method": "slerp", "dtype": "float32", "base_model": str(a), "parameters": {"t": 0.5}, "models": [{"model": str(a)}, {"model": str(b)}]}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump_all([ties, slerp], sort_keys=False))
    proc = run_cli("run", path, tmp_path / "out", "--quiet", "--device", "cpu", "--keep-intermediates", tmp_path / "keep", timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {"ties": tmp_path / "keep" / "ties", "slerp": tmp_path / "out"}


def _image_inputs(model, family):
    """Processor-free inputs for one small image: input_ids with the family's image tokens and
    the pixel tensors its vision tower takes, built from the config."""
    c = model.config
    if family == "llava":  # CLIP 16x16, patch 8: image_seq_length 4 tokens
        ids = torch.tensor([[1] + [c.image_token_index] * c.image_seq_length + [5, 6]])
        return ids, dict(pixel_values=torch.randn(1, 3, 16, 16))
    if family == "gemma3":  # 16x16 pixels pooled to mm_tokens_per_image tokens between boi and eoi
        ids = torch.tensor([[2, c.boi_token_index] + [c.image_token_index] * c.mm_tokens_per_image + [c.eoi_token_index, 5]])
        size = c.vision_config.image_size
        return ids, dict(pixel_values=torch.randn(1, 3, size, size))
    # Qwen2-VL: flattened patches (channels x temporal x patch x patch each) of a 1x4x4 patch grid,
    # merged 2x2 into 4 image tokens. Its default image token id (151655) is past this vocabulary
    # of 128, so the loaded model is told to read 120 as the image token.
    v = c.vision_config
    c.image_token_id = 120
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([[1] + [120] * (int(grid.prod()) // v.spatial_merge_size ** 2) + [5, 6]])
    pixels = torch.randn(int(grid.prod()), v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
    return ids, dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == 120).int())


def _forward(model, family):
    """Finite logits of the right shape for text alone and for text with one image."""
    vocab = model.config.text_config.vocab_size
    ids, image = _image_inputs(model, family)
    with torch.no_grad():
        text = model(input_ids=torch.tensor([[1, 5, 6]])).logits
        out = model(input_ids=ids, **image).logits
    assert text.shape == (1, 3, vocab) and torch.isfinite(text).all()
    assert out.shape == (1, ids.shape[1], vocab) and torch.isfinite(out).all()


VLM_CLASSES = {"llava": "LlavaForConditionalGeneration", "qwen2vl": "Qwen2VLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


@pytest.mark.slow
@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llava", "qwen2vl", "gemma3"])
def test_ties_and_slerp_from_one_run_load_and_run(tmp_path, vlms, family):
    """Both outputs load in the family's class with no missing or unexpected weights, differ
    from each other, and run on text and on an image."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms[family]
    outs = _ties_and_slerp(tmp_path, a, b)
    cls = getattr(transformers, VLM_CLASSES[family])
    models = {method: _loads(cls, out) for method, out in outs.items()}
    ties, slerp = models["ties"].state_dict(), models["slerp"].state_dict()
    assert any(not torch.equal(ties[n], slerp[n]) for n in ties if "vision" in n or "visual" in n)
    for model in models.values():
        _forward(model, family)


@pytest.mark.slow
@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["qwen2vl", "gemma3"])
def test_linear_merge_runs_on_an_image(tmp_path, vlms, family):
    """Qwen2-VL and Gemma 3: the linear merge is the mean of the two, every stack, and runs on text and on an image."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms[family]
    recipe = {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    _, path = _plan(tmp_path, recipe)
    _run(path, tmp_path / "out")
    cls = getattr(transformers, VLM_CLASSES[family])
    merged, sa, sb = _loads(cls, tmp_path / "out"), _loads(cls, a).state_dict(), _loads(cls, b).state_dict()
    for name, p in merged.state_dict().items():
        torch.testing.assert_close(p, (sa[name] + sb[name]) / 2)
    _forward(merged, family)

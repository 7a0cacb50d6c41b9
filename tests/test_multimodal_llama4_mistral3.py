"""Llama 4 (vision + MoE) and Mistral 3 (Pixtral vision) checkpoints (issue #18), built tiny at
test time by transformers' own classes: linear, TIES, a text-decoder frankenmerge and mergekit's
``modules:`` names (Llama 4: text_decoder, vision_model, multi_modal_projector; Mistral 3:
text_decoder, vision_tower, multi_modal_projector). Llama 4's per-layer config (``moe_layers``,
``no_rope_layers``, ``layer_types``) follows a frankenmerge's layer order."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distmerge.errors import MergeError
from tests.test_multimodal import _accounted, _by_name, _loads, _modules, _plan, _run, _ties_and_slerp

L4_TEXT = dict(hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
               head_dim=16, vocab_size=128, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8)
L4_VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
                 vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
M3_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128)
M3_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4, head_dim=16)
IMAGE_TOKEN = 127
MODULES = {"llama4": ("text_decoder", "vision_model", "multi_modal_projector"), "mistral3": ("text_decoder", "vision_tower", "multi_modal_projector")}


def _llama4(transformers, path, seed):
    """4 text layers, MoE at 1 and 3 (interleave 2), no RoPE and full attention at 3."""
    torch.manual_seed(seed)
    config = transformers.Llama4Config(text_config=L4_TEXT, vision_config=L4_VISION, image_token_index=IMAGE_TOKEN)
    transformers.Llama4ForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path


def _mistral3(transformers, path, seed):
    torch.manual_seed(seed)
    config = transformers.Mistral3Config(text_config=M3_TEXT, vision_config=M3_VISION, image_token_index=IMAGE_TOKEN, spatial_merge_size=2)
    transformers.Mistral3ForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("vlm")
    return {
        "llama4": [_llama4(transformers, d / f"llama4{i}", 30 + i) for i in range(2)],
        "mistral3": [_mistral3(transformers, d / f"mistral3{i}", 40 + i) for i in range(2)],
    }


def _cls(transformers, family):
    return {"llama4": transformers.Llama4ForConditionalGeneration, "mistral3": transformers.Mistral3ForConditionalGeneration}[family]


def _forward(model, family):
    """Logits for text alone and for text with one 16x16 image; both finite. Llama 4's own
    forward fails in transformers 5.24 (it reads ``image_outputs`` from its language model's
    output, which has none), so its steps are taken here: the image features, projected into
    the image token's place, then the language model."""
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        if family == "llama4":  # (16/8)^2 patches, pixel-shuffled by 0.5: 1 image token
            lm = model.language_model
            text = lm(input_ids=torch.tensor([[1, 5, 6]])).logits
            ids = torch.tensor([[1, IMAGE_TOKEN, 5, 6]])
            image = model.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
            projected = model.multi_modal_projector(image.view(-1, image.size(-1)))
            embeds = lm.get_input_embeddings()(ids)
            assert projected.shape == (1, 32)
            embeds[ids == IMAGE_TOKEN] = projected
            out = lm(inputs_embeds=embeds).logits
        else:  # (16/4)^2 patches merged 2x2: 4 image tokens
            text = model(input_ids=torch.tensor([[1, 5, 6]])).logits
            ids = torch.tensor([[1] + [IMAGE_TOKEN] * 4 + [5, 6]])
            out = model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[16, 16]])).logits
    assert text.shape == (1, 3, 128) and torch.isfinite(text).all()
    assert out.shape == (1, ids.shape[1], 128) and torch.isfinite(out).all()


def _recipe(method, a, b):
    if method == "linear":
        recipe = {"models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    elif method == "slerp":
        recipe = {"base_model": str(a), "parameters": {"t": 0.5}, "models": [{"model": str(a)}, {"model": str(b)}]}
    else:
        recipe = {"base_model": str(a), "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}]}
    return {**recipe, "merge_method": method, "dtype": "float32"}


@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llama4", "mistral3"])
@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_models_recipes_merge_every_tensor(tmp_path, vlms, family, method):
    """Every tensor of both models is read, the vision encoder's and the experts' included; the config is the donor's."""
    a, b = vlms[family]
    plan, _ = _plan(tmp_path, _recipe(method, a, b))
    read = _accounted(plan, [a, b] if plan.models[0].path == str(a) else [b, a])
    assert not plan.left_out
    names = set(load_file(a / "model.safetensors"))
    assert {t.name for t in plan.tensors} == names
    assert all((0, n) in read and (1, n) in read for n in names)
    donor = json.loads((a / "config.json").read_text())
    assert plan.config["text_config"] == donor["text_config"] and plan.config["vision_config"] == donor["vision_config"]


@pytest.mark.needs("transformers")
def test_llama4_passthrough_remaps_per_layer_config(tmp_path, vlms):
    """Layers [0, 3) of a then [1, 4) of b: 6 layers from source layers 0 1 2 1 2 3, so the MoE
    layers (1, 3 in each model) land at 1, 3 and 5, and no_rope_layers and layer_types follow."""
    a, b = vlms["llama4"]
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 3]}]}, {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]
    plan, _ = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "slices": slices})
    _accounted(plan, [a, b])
    text = plan.config["text_config"]
    assert text["num_hidden_layers"] == 6 and "num_hidden_layers" not in plan.config
    assert text["moe_layers"] == [1, 3, 5]
    assert text["no_rope_layers"] == [1, 1, 1, 1, 1, 0]
    assert text["layer_types"] == ["chunked_attention"] * 5 + ["full_attention"]
    assert plan.config["vision_config"]["num_hidden_layers"] == 2
    experts = {t.name.split(".")[3] for t in plan.tensors if ".feed_forward.experts." in t.name}
    assert experts == {"1", "3", "5"}


def _edited(src, dst, **text):
    """A copy of a checkpoint whose text_config has these keys set (None: removed)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in text.items():
        config["text_config"].pop(key) if value is None else config["text_config"].update({key: value})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.needs("transformers")
def test_llama4_passthrough_writes_the_per_layer_lists_a_hub_config_leaves_out(tmp_path, vlms):
    """Llama-4-Scout's config.json has no moe_layers and an empty no_rope_layers: transformers
    derives them from interleave_moe_layer_step and no_rope_layer_interval, which for 6 layers
    would put MoE and NoPE at other layers than the weights'; the output spells them out."""
    a, b = vlms["llama4"]
    hub = {"moe_layers": None, "no_rope_layers": [], "layer_types": None}
    a2, b2 = _edited(a, tmp_path / "a2", **hub), _edited(b, tmp_path / "b2", **hub)
    slices = lambda x, y: [{"sources": [{"model": str(x), "layer_range": [0, 3]}]}, {"sources": [{"model": str(y), "layer_range": [1, 4]}]}]  # noqa: E731
    explicit, _ = _plan(tmp_path, {"merge_method": "passthrough", "slices": slices(a, b)})
    derived, _ = _plan(tmp_path, {"merge_method": "passthrough", "slices": slices(a2, b2)})
    for key in ("moe_layers", "no_rope_layers", "layer_types", "num_hidden_layers"):
        assert derived.config["text_config"][key] == explicit.config["text_config"][key], key
    assert derived.config["text_config"]["moe_layers"] == [1, 3, 5]


@pytest.mark.needs("transformers")
def test_llama4_passthrough_refuses_a_per_layer_list_of_the_wrong_length(tmp_path, vlms):
    """b's no_rope_layers gives 2 values for 4 layers: the output's could not say which of b's layers use RoPE."""
    a, b = vlms["llama4"]
    c = _edited(b, tmp_path / "c", no_rope_layers=[1, 0])
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(c), "layer_range": [1, 4]}]}]
    with pytest.raises(MergeError, match=r"model .*c'.s config.json has no no_rope_layers with one value per layer, which the donor's has: .*; take these layers from models whose configs give no_rope_layers per layer"):
        _plan(tmp_path, {"merge_method": "passthrough", "slices": slices})


@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llama4", "mistral3"])
def test_modules_recipes_with_mergekits_names(tmp_path, vlms, family):
    """mergekit's module names for each family: the same models in every module plan as the
    models: recipe; a text-decoder frankenmerge with the encoders from a plans as the slices: recipe."""
    a, b = vlms[family]
    models = [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]
    flat, _ = _plan(tmp_path, {"merge_method": "linear", "dtype": "float32", "models": models})
    mods, _ = _plan(tmp_path, {"merge_method": "linear", "dtype": "float32", "modules": _modules(**{m: models for m in MODULES[family]})})
    assert _by_name(mods) == _by_name(flat) and mods.config == flat.config and not mods.left_out
    _accounted(mods, [a, b])
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]
    flat, _ = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "slices": slices})
    encoders = {m: [{"model": str(a)}] for m in MODULES[family][1:]}
    mods, _ = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "modules": _modules(text_decoder={"slices": slices}, **encoders)})
    assert _by_name(mods) == _by_name(flat) and mods.config == flat.config and mods.layer_map == flat.layer_map
    assert mods.config["text_config"]["num_hidden_layers"] == 4
    _accounted(mods, [a, b])


@pytest.mark.slow
@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llama4", "mistral3"])
@pytest.mark.parametrize("method", ["linear"])  # TIES and SLERP: test_ties_and_slerp_from_one_run_load_and_run
def test_merges_load_and_run(tmp_path, vlms, family, method):
    """The output loads with no missing or unexpected weights and runs on text and on an image;
    linear is the mean of the two, every stack."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms[family]
    _, path = _plan(tmp_path, _recipe(method, a, b))
    _run(path, tmp_path / "out")
    cls = _cls(transformers, family)
    merged = _loads(cls, tmp_path / "out")
    if method == "linear":
        sa, sb = _loads(cls, a).state_dict(), _loads(cls, b).state_dict()
        for name, p in merged.state_dict().items():
            torch.testing.assert_close(p, (sa[name] + sb[name]) / 2)
    _forward(merged, family)


@pytest.mark.slow
@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llama4", "mistral3"])
def test_ties_and_slerp_from_one_run_load_and_run(tmp_path, vlms, family):
    """One run of a two-document recipe writes TIES (kept) and SLERP; both load with no missing
    or unexpected weights, differ from each other, and run on text and on an image."""
    transformers = pytest.importorskip("transformers")
    a, b = vlms[family]
    models = {method: _loads(_cls(transformers, family), out) for method, out in _ties_and_slerp(tmp_path, a, b).items()}
    ties, slerp = models["ties"].state_dict(), models["slerp"].state_dict()
    assert any(not torch.equal(ties[n], slerp[n]) for n in ties if ".experts." in n or "vision" in n)
    for model in models.values():
        _forward(model, family)


@pytest.mark.slow
@pytest.mark.needs("transformers")
@pytest.mark.parametrize("family", ["llama4", "mistral3"])
def test_text_decoder_frankenmerge_loads_and_runs(tmp_path, vlms, family):
    """Layers [0, 2) of a then [1, 3) of b in modules: form: 4 layers (Llama 4: MoE at 1 and 2,
    from a's 1 and b's 1); the encoders are a's, bit for bit; loads, runs, and verify passes."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import run_cli

    a, b = vlms[family]
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]
    encoders = {m: [{"model": str(a)}] for m in MODULES[family][1:]}
    plan, path = _plan(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "modules": _modules(text_decoder={"slices": slices}, **encoders)})
    _run(path, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["text_config"]["num_hidden_layers"] == 4
    if family == "llama4":
        assert written["text_config"]["moe_layers"] == [1, 2] and written["text_config"]["no_rope_layers"] == [1, 1, 1, 1]
    cls = _cls(transformers, family)
    merged = _loads(cls, tmp_path / "out")
    sd, sa, sb = merged.state_dict(), _loads(cls, a).state_dict(), _loads(cls, b).state_dict()
    for name in sd:
        if name.startswith(("model.vision", "model.multi_modal_projector")):
            assert torch.equal(sd[name], sa[name]), name
        elif ".layers.3." in name:
            assert torch.equal(sd[name], sb[name.replace(".layers.3.", ".layers.2.")]), name
    _forward(merged, family)
    verified = run_cli("verify", tmp_path / "out", timeout=600)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# --- MoE layers placed by a rule of position (Qwen-MoE, DeepSeek): a frankenmerge keeps each layer's kind


@pytest.fixture(scope="module")
def moes(tmp_path_factory):
    """Qwen2-MoE with MoE at layers 1 and 3 (decoder_sparse_step 2); DeepSeek-V3 with layer 0 dense (first_k_dense_replace 1)."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("moe")
    torch.manual_seed(50)
    small = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_attention_heads=2, vocab_size=128, num_experts_per_tok=1)
    qwen = transformers.Qwen2MoeConfig(**small, shared_expert_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=1, num_experts=2, decoder_sparse_step=2)
    transformers.Qwen2MoeForCausalLM(qwen).save_pretrained(d / "qwen2moe")
    deepseek = transformers.DeepseekV3Config(**small, num_hidden_layers=3, num_key_value_heads=2, n_routed_experts=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                                             q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    transformers.DeepseekV3ForCausalLM(deepseek).save_pretrained(d / "deepseek")
    return d


def _franken(path, *ranges):
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [{"sources": [{"model": str(path), "layer_range": list(r)}]} for r in ranges]}


@pytest.mark.needs("transformers")
def test_qwen_moe_frankenmerge_lists_its_dense_layers(tmp_path, moes):
    """Layers [0, 2) + [1, 3): sources 0 1 1 2, MoE at output 1 and 2, where decoder_sparse_step 2
    would put it at 1 and 3: the output says decoder_sparse_step 1 and lists the dense layers."""
    plan, _ = _plan(tmp_path, _franken(moes / "qwen2moe", (0, 2), (1, 3)))
    assert (plan.config["num_hidden_layers"], plan.config["decoder_sparse_step"], plan.config["mlp_only_layers"]) == (4, 1, [0, 3])
    same, _ = _plan(tmp_path, _franken(moes / "qwen2moe", (0, 4)))  # the identity keeps the config as it is
    assert same.config["decoder_sparse_step"] == 2 and same.config["mlp_only_layers"] == []
    old = tmp_path / "old"  # a config without layer_types (an older transformers): the donor's values stand for its layers
    shutil.copytree(moes / "qwen2moe", old)
    config = json.loads((old / "config.json").read_text())
    del config["layer_types"]
    (old / "config.json").write_text(json.dumps(config))
    recipe = _franken(moes / "qwen2moe", (0, 2))
    recipe["slices"].append({"sources": [{"model": str(old), "layer_range": [1, 3]}]})
    mixed, _ = _plan(tmp_path, recipe)
    assert mixed.config["layer_types"] == ["full_attention"] * 4 and mixed.config["mlp_only_layers"] == [0, 3]


@pytest.mark.needs("transformers")
def test_deepseek_frankenmerge_keeps_its_dense_layers_first_or_is_refused(tmp_path, moes):
    plan, _ = _plan(tmp_path, _franken(moes / "deepseek", (0, 1), (0, 3)))  # sources 0 0 1 2: two dense layers first
    assert (plan.config["num_hidden_layers"], plan.config["first_k_dense_replace"]) == (4, 2)
    with pytest.raises(MergeError, match=r"^slices: output layer 2 is layer 0 of .*deepseek', a dense layer, but the output config's first_k_dense_replace: 1 "
                                         r"makes layer 2 MoE, and it cannot list MoE layers one by one; order the slices so that the dense layers come first"):
        _plan(tmp_path, _franken(moes / "deepseek", (0, 2), (0, 3)))


@pytest.mark.slow
@pytest.mark.needs("transformers")
def test_qwen_moe_frankenmerge_loads(tmp_path, moes):
    transformers = pytest.importorskip("transformers")
    _, path = _plan(tmp_path, _franken(moes / "qwen2moe", (0, 2), (1, 3)))
    _run(path, tmp_path / "out")
    model = _loads(transformers.Qwen2MoeForCausalLM, tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6]])).logits).all()

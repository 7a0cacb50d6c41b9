"""End to end through the CLI: distmerge's output equals mergekit 0.1.5's on the same recipe.

float32 recipes compare the merge math sharply (exact equality); bf16 recipes check the
real-world path. See ../shared/ORACLE.md for what mergekit does with dtypes.
"""

from pathlib import Path

import pytest
import torch
import yaml

from distmerge.cli import main
from tests.helpers import assert_same_tensors, load_state, run_mergekit


def distmerge(recipe: dict, out: Path, *args: str) -> Path:
    """Run ``distmerge run`` in this process (the CLI's entry point) and return ``out``."""
    path = out.parent / (out.name + ".yml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    main(["run", str(path), str(out), "--quiet", *args])
    return out


def both(recipe: dict, tmp_path: Path, *args: str) -> tuple[Path, Path]:
    return distmerge(recipe, tmp_path / "ours", *args), run_mergekit(recipe, tmp_path / "mergekit")


def models(fam, *specs):
    """[(name, parameters)] -> mergekit ``models`` entries pointing at fixture paths."""
    return [{"model": str(fam[name]), **({"parameters": p} if p else {})} for name, p in specs]


# ---------------------------------------------------------------- linear


@pytest.mark.slow
def test_linear_two_models_float32(llama_family_f32, tmp_path):
    f = llama_family_f32
    recipe = {"merge_method": "linear", "models": models(f, ("ft1", {"weight": 1.0}), ("ft2", {"weight": 1.0})), "dtype": "float32"}
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    a, b, out = load_state(f["ft1"]), load_state(f["ft2"]), load_state(ours)
    # and it is what the equation says, not merely what mergekit says
    name = "model.layers.1.mlp.up_proj.weight"
    assert (out[name] - (a[name] + b[name]) / 2).abs().max() < 1e-7


def test_linear_filters_and_gradients_three_models_float32(llama_family_f32, tmp_path):
    f = llama_family_f32
    recipe = {
        "merge_method": "linear",
        "models": models(
            f,
            ("ft1", {"weight": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.3}]}),
            ("ft2", {"weight": [0.5, 0.2, 0.7]}),
            ("ft3", {"weight": 0.25}),
        ),
        "dtype": "float32",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)


def test_linear_four_models_unnormalized_bf16(llama_family, tmp_path):
    f = llama_family
    recipe = {
        "merge_method": "linear",
        "models": models(f, ("base", {"weight": 0.4}), ("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.2}), ("ft3", {"weight": 0.1})),
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)  # linear upcasts to float32 in both: bit-identical


# ---------------------------------------------------------------- task arithmetic


def test_task_arithmetic_with_negation_float32(llama_family_f32, tmp_path):
    f = llama_family_f32
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", {"weight": 1.0}), ("ft2", {"weight": -0.5})),
        "dtype": "float32",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    base, a, b, out = (load_state(p) for p in (f["base"], f["ft1"], f["ft2"], ours))
    name = "model.layers.2.self_attn.o_proj.weight"
    expected = base[name] + (a[name] - base[name]) - 0.5 * (b[name] - base[name])
    assert (out[name] - expected).abs().max() < 1e-6


def test_task_arithmetic_gradient_normalize_lambda_float32(llama_family_f32, tmp_path):
    f = llama_family_f32
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", {"weight": [0.2, 1.0]}), ("ft2", {"weight": 0.5}), ("ft3", {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.1}]})),
        "parameters": {"normalize": True, "lambda": 1.5},
        "dtype": "float32",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)


def test_task_arithmetic_bf16_is_float32_math_rounded_once(llama_family, tmp_path):
    f = llama_family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.3})),
        "dtype": "bfloat16",
    }
    ours, theirs = both(recipe, tmp_path)
    base, a, b, out = (load_state(p) for p in (f["base"], f["ft1"], f["ft2"], ours))
    for name in out:
        x0, x1, x2 = base[name].float(), a[name].float(), b[name].float()
        expected = (x0 + (0.7 * (x1 - x0) + 0.3 * (x2 - x0))).bfloat16()
        assert torch.equal(out[name], expected), name
    # mergekit computes the deltas, products and sums in bf16 itself (ORACLE.md), rounding
    # at every step; near-zero results then differ by several ulps *of the result*. Both
    # agree within 1 ulp of the result plus 2 ulps at the weights' typical scale (|w| ~ 0.02:
    # ulp 1.2e-4), which covers cancellation to near zero.
    assert_same_tensors(ours, theirs, ulps=1, atol=2.5e-4)


# ---------------------------------------------------------------- slerp


@pytest.mark.parametrize("chunk", [None, 777])
def test_slerp_scalar_t_float32(llama_family_f32, tmp_path, monkeypatch, chunk):
    """float32 shows a one-ulp change of the coefficients, which bf16 rounding would hide."""
    import distmerge.tensor_merge

    if chunk is not None:
        monkeypatch.setattr(distmerge.tensor_merge, "CHUNK_ELEMENTS", chunk)
    f = llama_family_f32
    recipe = {
        "merge_method": "slerp",
        "base_model": str(f["base"]),
        "models": models(f, ("base", None), ("ft1", None)),
        "parameters": {"t": 0.3},
        "dtype": "float32",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("chunk", [None, 777, 4099])
def test_slerp_filtered_gradients_bf16(llama_family, tmp_path, monkeypatch, chunk):
    """Whole tensors, and the chunked path (float32 gathered in chunks, whole-tensor norms
    and cos Ω over the same values, combine chunk by chunk) with odd chunk sizes."""
    import distmerge.tensor_merge

    if chunk is not None:
        monkeypatch.setattr(distmerge.tensor_merge, "CHUNK_ELEMENTS", chunk)
    f = llama_family
    recipe = {
        "merge_method": "slerp",
        "base_model": str(f["base"]),
        "slices": [{"sources": [{"model": str(f["base"]), "layer_range": [0, 4]}, {"model": str(f["ft2"]), "layer_range": [0, 4]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "bfloat16",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)  # slerp upcasts to float32 in both: bit-identical


# ---------------------------------------------------------------- passthrough


def test_passthrough_overlapping_slices_of_two_models(llama_deep, tmp_path):
    """goliath-style: interleaved, overlapping ranges of two models into a deeper one."""
    f = llama_deep
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(f["ft1"]), "layer_range": [0, 5]}]},
            {"sources": [{"model": str(f["ft2"]), "layer_range": [3, 8]}]},
            {"sources": [{"model": str(f["ft1"]), "layer_range": [6, 8]}]},
        ],
        "dtype": "bfloat16",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    out, a, b = load_state(ours), load_state(f["ft1"]), load_state(f["ft2"])
    expected_map = [("a", i) for i in range(5)] + [("b", i) for i in range(3, 8)] + [("a", 6), ("a", 7)]
    src = {"a": a, "b": b}
    for j, (m, i) in enumerate(expected_map):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert (out[f"model.layers.{j}.{suffix}"] == src[m][f"model.layers.{i}.{suffix}"]).all()
    assert (out["model.embed_tokens.weight"] == a["model.embed_tokens.weight"]).all()  # first slice's model
    assert (out["lm_head.weight"] == a["lm_head.weight"]).all()  # last slice's model
    assert not any(k.startswith(f"model.layers.{len(expected_map)}.") for k in out)
    import json

    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 12
    assert json.loads((theirs / "config.json").read_text())["num_hidden_layers"] == 12


def test_passthrough_depth_upscaling_with_scale(llama_deep, tmp_path):
    """SOLAR-style: one model's layers [0, 6) and [2, 8) stacked; o_proj scaled in the copy."""
    f = llama_deep
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(f["base"]), "layer_range": [0, 6]}]},
            {"sources": [{"model": str(f["base"]), "layer_range": [2, 8], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        ],
        "dtype": "float32",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    out, base = load_state(ours), load_state(f["base"])
    assert (out["model.layers.6.self_attn.o_proj.weight"] == 0.5 * base["model.layers.2.self_attn.o_proj.weight"].float()).all()
    assert (out["model.layers.6.mlp.up_proj.weight"] == base["model.layers.2.mlp.up_proj.weight"].float()).all()


# ---------------------------------------------------------------- the output is a HF checkpoint


@pytest.mark.slow
@pytest.mark.needs("transformers")
@pytest.mark.parametrize("method", ["linear", "passthrough"])
def test_output_loads_in_transformers_and_runs(llama_deep, tmp_path, method):
    import torch
    import transformers

    f = llama_deep
    if method == "linear":
        recipe = {"merge_method": "linear", "models": models(f, ("ft1", {"weight": 1}), ("ft2", {"weight": 1}))}
    else:
        recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(f["ft1"]), "layer_range": [0, 6]}]}, {"sources": [{"model": str(f["ft2"]), "layer_range": [2, 8]}]}]}
    out = distmerge(recipe, tmp_path / "out", "--out-shard-size", "100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == (8 if method == "linear" else 12)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "distmerge" in card and method in card and str(f["ft1"]) in card


# ---------------------------------------------------------------- chunked element-wise merging


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "passthrough"])
def test_chunked_elementwise_merge_is_bit_identical(llama_family, tmp_path, monkeypatch, method):
    """Large tensors of element-wise methods are merged in chunks; force tiny, odd-sized
    chunks and the result must still be mergekit's, bit for bit."""
    import distmerge.tensor_merge

    from distmerge.methods import get

    assert get(method).elementwise
    monkeypatch.setattr(distmerge.tensor_merge, "CHUNK_ELEMENTS", 777)
    f = llama_family
    if method == "passthrough":
        recipe = {"merge_method": method, "slices": [{"sources": [{"model": str(f["ft1"]), "layer_range": [0, 4], "parameters": {"scale": 0.5}}]}], "dtype": "bfloat16"}
    else:
        recipe = {"merge_method": method, "models": models(f, ("ft1", {"weight": 0.6}), ("ft2", {"weight": 0.3})), "dtype": "float32"}
        if method == "task_arithmetic":
            recipe["base_model"] = str(f["base"])
        else:
            recipe["models"] += models(f, ("base", {"weight": 0.1}))
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_chunked_ties_merge_is_bit_identical_to_mergekit(llama_family_f32, tmp_path, monkeypatch, method):
    """The TIES family's two-pass chunked path (top-k statistics, then element-wise trim
    and consensus) on tiny, odd-sized chunks: mergekit's float32 result, bit for bit."""
    import distmerge.tensor_merge
    from distmerge.methods import get

    assert get(method).chunked is not None and not get(method).elementwise
    monkeypatch.setattr(distmerge.tensor_merge, "CHUNK_ELEMENTS", 777)
    f = llama_family_f32
    params = [{"weight": 0.7, "density": 0.3}, {"weight": -0.4, "density": 0.7}]
    if method == "breadcrumbs_ties":
        params = [{**p, "gamma": 0.05} for p in params]
    recipe = {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", params[0]), ("ft2", params[1])),
        "dtype": "float32",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", [{"weight": 0.6, "density": 0.3}, {"weight": -0.5, "density": 0.7}]),
        ("ties", [{"weight": 0.5, "density": 0.7}, {"weight": 0.3, "density": 0.3}, {"weight": -0.2, "density": 0.3}]),
        ("ties", [{"weight": 1.0, "density": 0.3}, {"weight": 1.0, "density": 1.0}]),
        (
            "breadcrumbs_ties",
            [{"weight": 0.6, "density": 0.3, "gamma": 0.1}, {"weight": -0.5, "density": 0.7, "gamma": 0.0}],
        ),
        ("breadcrumbs", [{"weight": 0.6, "density": 0.7, "gamma": 0.2}, {"weight": 0.5, "density": 0.3, "gamma": 0.01}]),
        ("dare_ties", [{"weight": 0.6, "density": 0.3}, {"weight": -0.5, "density": 0.7}]),
        ("dare_linear", [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 1.0}, {"weight": 0.3, "density": 0.2}]),
        ("della", [{"weight": 0.6, "density": 0.3, "epsilon": 0.1}, {"weight": -0.5, "density": 0.7, "epsilon": 0.2}]),
        (
            "della_linear",
            [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 1.0}, {"weight": 0.3, "density": 0.2, "epsilon": 0.1}],
        ),
    ],
)
def test_chunked_ties_family_is_the_whole_tensor_result(llama_family, tmp_path, monkeypatch, method, params):
    """bf16 inputs (many exactly equal |δ|, so the tie cut matters) merged in 777- and
    4099-element chunks give the same bytes as the whole-tensor merge (DARE, DELLA: the same
    masks and the same whole-tensor L1 rescale; DELLA's chunks are whole rows)."""
    import filecmp

    from distmerge import tensor_merge

    f = llama_family
    names = ("ft1", "ft2", "ft3")[: len(params)]
    recipe = {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": models(f, *zip(names, params)),
        "dtype": "bfloat16",
    }
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)  # every tensor whole
    whole = distmerge(recipe, tmp_path / "whole")
    for chunk in (777, 4099):
        monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", chunk)
        chunked = distmerge(recipe, tmp_path / f"chunked{chunk}")
        shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
        assert shards and all(filecmp.cmp(whole / n, chunked / n, shallow=False) for n in shards)


@pytest.mark.slow
def test_chunked_dare_without_rescale_is_the_whole_tensor_result(llama_family, tmp_path, monkeypatch):
    import filecmp

    from distmerge import tensor_merge

    f = llama_family
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", {"weight": 0.6, "density": 0.3}), ("ft2", {"weight": 0.5, "density": 0.5})),
        "parameters": {"rescale": False},
        "dtype": "bfloat16",
    }
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)
    whole = distmerge(recipe, tmp_path / "whole")
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 777)
    chunked = distmerge(recipe, tmp_path / "chunked")
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    assert shards and all(filecmp.cmp(whole / n, chunked / n, shallow=False) for n in shards)
    recipe["parameters"]["rescale"] = True  # and rescale does change the result
    rescaled = distmerge(recipe, tmp_path / "rescaled")
    assert not filecmp.cmp(whole / shards[0], rescaled / shards[0], shallow=False)


def test_chunked_top_k_keeps_the_same_ties_as_top_k_mask():
    """ChunkedTopK over odd chunks of a score with many exact ties = top_k_mask."""
    from distmerge.methods.sparsify import ChunkedTopK, top_k_mask

    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (10007,), generator=g).float() * 0.25
    for k in (0, 1, 2, 500, 3000, 5001, 10006, 10007, 20000):
        top = ChunkedTopK(score.numel(), k)
        chunks = score.split(333)
        if not top.trivial:
            for add in (top.add_high, top.add_low):
                for c in chunks:
                    add(c)
            top.finish()
        mask = torch.cat([top.mask(c) for c in chunks])
        assert torch.equal(mask, top_k_mask(score, k)), k


@pytest.mark.parametrize("special", [None, float("nan"), float("inf")])
def test_chunked_top_k_trim_is_the_masked_delta(special):
    """ChunkedTopK.trim (int32 cuts on |δ|'s bits, ties split inside a chunk, a drop band,
    the float fallback with NaN) = masked(δ, mask(|δ|) & ~drop.mask(|δ|)), bit for bit, and
    with finite δ = masked(δ, top_k_mask(|δ|, k) & ~top_k_mask(|δ|, j))."""
    from distmerge.kernels.reference import masked
    from distmerge.methods.sparsify import ChunkedTopK, top_k_mask

    g = torch.Generator().manual_seed(1)
    delta = torch.randint(-4, 5, (10007,), generator=g).float() * 0.25
    if special is not None:
        delta[torch.randint(0, delta.numel(), (40,), generator=g)] = special
        delta[::997] = -special
    n, chunks = delta.numel(), delta.split(333)

    def selections(k: int, j: int) -> tuple[ChunkedTopK, ChunkedTopK]:
        keep, drop = ChunkedTopK(n, k), ChunkedTopK(n, j)
        live = [top for top in (keep, drop) if not top.trivial]
        if live:
            for low in (False, True):
                for c in chunks:
                    ChunkedTopK.gather(live, c.clone(), low=low)
            for top in live:
                top.finish()
        return keep, drop

    for k, j in [(3000, 0), (5001, 500), (1, 0), (n, 700), (7000, 6999), (0, 0), (9000, n)]:
        keep, drop = selections(k, j)
        got = torch.cat([keep.trim(c.clone(), drop) for c in chunks])
        keep, drop = selections(k, j)
        mask = torch.cat([keep.mask(c.abs()) & ~drop.mask(c.abs()) for c in chunks])
        want = masked(delta, mask, rescale=False)
        if special is None or special == float("inf"):
            assert torch.equal(mask, top_k_mask(delta.abs(), k) & ~top_k_mask(delta.abs(), j))
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (k, j)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "ties", "passthrough"])
def test_pread_reads_give_the_same_bytes_as_mmap(llama_family, tmp_path, method):
    f = llama_family
    if method == "passthrough":
        recipe = {"merge_method": method, "slices": [{"sources": [{"model": str(f["ft2"]), "layer_range": [0, 4]}]}]}
    else:
        recipe = {"merge_method": method, "base_model": str(f["base"]), "models": models(f, ("ft1", {"weight": 0.5, "density": 0.5}), ("ft2", {"weight": 0.5, "density": 0.7}))}
        if method == "linear":
            recipe = {"merge_method": method, "models": models(f, ("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.5}))}
    a = distmerge(recipe, tmp_path / "mmap")
    b = distmerge(recipe, tmp_path / "pread", "--io", "pread")
    import filecmp

    shards = sorted(p.name for p in a.glob("model-*.safetensors"))
    assert shards and all(filecmp.cmp(a / n, b / n, shallow=False) for n in shards)


# ---------------------------------------------------------------- the base alone


@pytest.mark.parametrize("method, params", [("della_linear", {"density": 0.5, "weight": 0.5, "epsilon": 0.1}), ("ties", {"density": 0.5, "weight": 1.0})])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_recipe_whose_only_model_is_the_base_writes_the_base(llama_family_f32, tmp_path, method, params, dtype):
    """As in published recipes (BioMistral's della_linear): `plan` accepts it, so `run` must
    run it; mergekit writes the base rounded to the recipe's dtype."""
    f = llama_family_f32
    recipe = {"merge_method": method, "base_model": str(f["base"]), "dtype": dtype, "parameters": params, "models": models(f, ("base", None))}
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    base = load_state(f["base"])
    out = load_state(ours)
    assert out.keys() == base.keys()
    for name, x in base.items():
        assert torch.equal(out[name], x.to(getattr(torch, dtype))), name


# ---------------------------------------------------------------- tensors above every chunk size


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory):
    """float32 models whose embeddings (5000 x 384 = 1.92M elements) exceed mergekit's
    2^20-element reduction runs and distmerge's 2^18-element chunks."""
    from distmerge.demo import make_family

    return make_family(tmp_path_factory.mktemp("wide"), n_finetunes=2, seed=7, dtype=torch.float32, num_layers=2, vocab=5000, hidden=384)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, params",
    [("slerp", {"t": 0.3}), ("ties", {"density": 0.4, "weight": 0.5}), ("model_stock", {})],
)
def test_float32_is_bit_identical_above_every_chunk_size(wide_f32, tmp_path, method, params):
    f = wide_f32
    listed = ("base", "ft1") if method == "slerp" else ("ft1", "ft2")
    recipe = {"merge_method": method, "base_model": str(f["base"]), "dtype": "float32", "models": models(f, *[(m, None) for m in listed])}
    if params:
        recipe["parameters"] = params
    ours, theirs = both(recipe, tmp_path)
    assert load_state(ours)["model.embed_tokens.weight"].numel() > 2**20
    assert_same_tensors(ours, theirs)


@pytest.mark.slow
def test_sce_above_32k_elements_is_within_its_stated_tolerance(wide_f32, tmp_path):
    """SCE's weights are whole-tensor means of τᵢ²; mergekit reduces the models' stacked task
    vectors as rows of one matrix, distmerge each model's on its own (one buffer, not n), and
    torch splits the two reductions differently past 32K elements: the outputs differ by
    float32 rounding, at most 2e-8 here (README, "Differences from mergekit")."""
    f = wide_f32
    recipe = {"merge_method": "sce", "base_model": str(f["base"]), "dtype": "float32", "parameters": {"select_topk": 0.5}, "models": models(f, ("ft1", None), ("ft2", None))}
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs, atol=2e-8)
    a, b = load_state(ours), load_state(theirs)
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):  # small tensors: bit for bit
        assert torch.equal(a[name], b[name]), name

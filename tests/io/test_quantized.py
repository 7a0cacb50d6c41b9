"""Quantized inputs (distmerge.io.quantized): block-scaled FP8 and MXFP4, dequantized while read.

Checks the dequantization against per-element Python loops that decode the bits themselves
and against transformers' own dequantization functions; the fp8 round trip against its error
bound; and whole merges of quantized checkpoints (made here from tiny Llamas) against the same
merge of the dequantized checkpoints saved in float32.
"""

import json
import math
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distmerge.cli import main
from distmerge.demo import make_family
from distmerge.errors import MergeError
from distmerge.io.quantized import FP8_MAX, dequantize_fp8, dequantize_mxfp4, quantize_fp8
from distmerge.sources import load_checkpoint
from tests.helpers import load_state

BLOCK = [48, 40]
"""Blocks that do not divide the tiny Llama's 64x64, 64x128, 128x64 matrices: edges are cropped."""


# --- independent references: one element at a time, bits decoded by hand ---------------------


def fp4_value(nibble: int) -> float:
    """e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal."""
    sign = -1.0 if nibble & 8 else 1.0
    exp, man = (nibble >> 1) & 3, nibble & 1
    return sign * (man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2))


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., G, B) uint8 -> (..., G*2B) float64: byte k of a block holds values 2k (low nibble), 2k+1."""
    *prefix, groups, nbytes = blocks.shape
    flat_b, flat_s = blocks.reshape(-1, groups, nbytes).tolist(), scales.reshape(-1, groups).tolist()
    rows = []
    for row_b, row_s in zip(flat_b, flat_s):
        row = []
        for g in range(groups):
            for byte in row_b[g]:
                for nibble in (byte & 15, byte >> 4):
                    row.append(fp4_value(nibble) * 2.0 ** (row_s[g] - 127))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(*prefix, groups * 2 * nbytes)


def fp8_reference(weight: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    rows, cols = weight.shape
    w, s = weight.float().tolist(), scale.tolist()
    return torch.tensor([[w[i][j] * s[i // block[0]][j // block[1]] for j in range(cols)] for i in range(rows)])


def random_fp8(shape, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 100).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    scale = torch.rand(*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]), generator=g) + 0.01
    return w, scale


def random_mxfp4(prefix, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*prefix, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (*prefix, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


# --- the dequantization ------------------------------------------------------------------------


def test_fp8_dequantize_matches_element_loop():
    w, scale = random_fp8((100, 70), BLOCK)
    out = dequantize_fp8(w, scale, BLOCK)
    assert out.dtype == torch.float32 and out.shape == (100, 70)
    assert torch.equal(out, fp8_reference(w, scale, BLOCK))
    experts_w, experts_s = random_fp8((3, 50, 90), BLOCK, seed=1)  # leading (expert) axes
    assert torch.equal(dequantize_fp8(experts_w, experts_s, BLOCK)[2], fp8_reference(experts_w[2], experts_s[2], BLOCK))


def test_mxfp4_lookup_table_is_e2m1():
    from distmerge.io.quantized import FP4_VALUES

    assert [fp4_value(n) for n in range(16)] == list(FP4_VALUES)


def test_mxfp4_dequantize_matches_element_loop():
    blocks, scales = random_mxfp4((2, 6), 3)  # gpt-oss experts: (E, R, G, 16) -> (E, G*32, R)
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (2, 96, 6) and out.dtype == torch.float32
    assert torch.equal(out.double(), mxfp4_reference(blocks, scales).transpose(1, 2))
    flat_b, flat_s = random_mxfp4((5,), 2, seed=1)  # a 2-D weight: (R, G, 16) -> (R, G*32), no transpose
    assert torch.equal(dequantize_mxfp4(flat_b, flat_s).double(), mxfp4_reference(flat_b, flat_s))


@pytest.mark.slow  # importing transformers' integrations: ~8 s on 2 cores
@pytest.mark.needs("transformers")
def test_dequantize_matches_transformers():
    """Bit for bit with transformers' own dequantization on CPU (float32)."""
    from transformers.integrations import finegrained_fp8, mxfp4

    w, scale = random_fp8((100, 70), BLOCK)
    assert torch.equal(dequantize_fp8(w, scale, BLOCK), finegrained_fp8._dequantize_fp8_weight(w, scale, BLOCK, torch.float32))
    experts_w, experts_s = random_fp8((3, 300, 260), [128, 128], seed=2)  # DeepSeek's block, cropped edges, experts
    want = finegrained_fp8._dequantize_fp8_weight(experts_w, experts_s, [128, 128], torch.float32)
    assert torch.equal(dequantize_fp8(experts_w, experts_s, [128, 128]), want)
    blocks, scales = random_mxfp4((2, 6), 3)
    assert torch.equal(dequantize_mxfp4(blocks, scales), mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))


def test_fp8_round_trip_error_bound():
    """e4m3 has 3 mantissa bits: a normal y = x/s (|y| ≥ 2^-6) is rounded to within half its
    spacing 2^(⌊log2|y|⌋-3), so |y - q(y)| ≤ |y|·2^-4; a subnormal, to within 2^-10. Hence
    |x - deq(q(x))| ≤ max(|x|·2^-4, s·2^-10), plus float32 rounding of x/s and q·s."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(130, 100, generator=g) * torch.logspace(-4, 2, 100)  # many magnitudes per block
    x[:48, :40] = 0  # an all-zero block: scale 1, values exactly 0
    q, scale = quantize_fp8(x, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (3, 3)
    assert scale[0, 0] == 1 and torch.equal(dequantize_fp8(q, scale, BLOCK)[:48, :40], x[:48, :40])
    amax = torch.stack([torch.stack([x[i:i + 48, j:j + 40].abs().max() for j in range(0, 100, 40)]) for i in range(0, 130, 48)])
    assert torch.equal(scale[amax > 0], (amax / FP8_MAX)[amax > 0])
    s = scale.repeat_interleave(48, 0)[:130].repeat_interleave(40, 1)[:, :100]
    err = (x - dequantize_fp8(q, scale, BLOCK)).abs()
    bound = torch.maximum(x.abs() * 2**-4, s * 2**-10) * (1 + 2**-20)
    assert bool((err <= bound).all())
    normal = x.abs() >= s * 2**-6
    assert (err[normal] / x.abs()[normal]).max() > 0.9 * 2**-4  # the bound is attained: 2^-5 would fail
    assert q.float().abs().max() == FP8_MAX  # each block's amax maps to 448 exactly


# --- quantized checkpoints, made here from tiny Llamas ------------------------------------------


def is_quantized(name: str, w: torch.Tensor) -> bool:
    return w.dim() == 2 and "embed" not in name and "lm_head" not in name


def write_quantized(src: Path, dst: Path, fmt: str) -> dict[str, torch.Tensor]:
    """dst: src with its matrices quantized (fp8 blocks of BLOCK, or mxfp4), the config's
    quantization_config set; returns the dequantized float32 state (written by ``write_float32``)."""
    state = load_state(src)
    shutil.copytree(src, dst)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    out, deq = {}, {}
    g = torch.Generator().manual_seed(zlib.crc32(dst.name.encode()))  # random fp4 values, per model
    for name, w in state.items():
        if fmt == "mxfp4" and name.endswith("mlp.down_proj.weight"):  # and a gpt-oss-like experts tensor per layer
            stem = name.removesuffix("down_proj.weight") + "experts.down_proj"
            blocks, scales = torch.randint(0, 256, (2, 8, 2, 16), generator=g, dtype=torch.uint8), torch.full((2, 8, 2), 121, dtype=torch.uint8)
            out[stem + "_blocks"], out[stem + "_scales"] = blocks, scales
            deq[stem] = mxfp4_reference(blocks, scales).transpose(1, 2).float()
        if not is_quantized(name, w):
            out[name], deq[name] = w, w.float()
        elif fmt == "fp8":
            q, scale = quantize_fp8(w, BLOCK)
            out[name], out[name + "_scale_inv"] = q, scale
            deq[name] = fp8_reference(q, scale, BLOCK)
        else:
            stem = name.removesuffix(".weight")
            rows, cols = w.shape
            blocks = torch.randint(0, 256, (rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(118, 122, (rows, cols // 32), generator=g, dtype=torch.uint8)
            out[stem + ".weight_blocks"], out[stem + ".weight_scales"] = blocks, scales
            deq[name] = mxfp4_reference(blocks, scales).float()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK}
        if fmt == "fp8" else {"quant_method": "mxfp4", "modules_to_not_convert": ["model.embed_tokens", "lm_head"]}
    )
    (dst / "config.json").write_text(json.dumps(config))
    return deq


def write_float32(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    models = make_family(root, n_finetunes=1, seed=3, num_layers=2, noise=0.05)
    for fmt in ("fp8", "mxfp4"):
        for name in ("base", "ft1"):
            deq = write_quantized(models[name], root / f"{name}-{fmt}", fmt)
            write_float32(root / f"{name}-{fmt}", root / f"{name}-{fmt}-f32", deq)
    return {p.name: p for p in root.iterdir()}


def merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    path = out.parent / (out.name + ".yml")
    path.write_text(yaml.safe_dump(recipe))
    main(["run", str(path), str(out), "--quiet"])
    return load_state(out)


def ties(base: Path, ft: Path, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": 0.7}, "models": [{"model": str(ft)}], **extra}


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_quantized_merge_equals_merge_of_dequantized_float32(family, fmt, tmp_path):
    """Both models quantized: the same bytes as merging their dequantized float32 copies into
    bf16, in bf16 by default, under the dequantized names, with no quantization_config."""
    got = merge(ties(family[f"base-{fmt}"], family[f"ft1-{fmt}"]), tmp_path / "q")
    want = merge(ties(family[f"base-{fmt}-f32"], family[f"ft1-{fmt}-f32"], out_dtype="bfloat16"), tmp_path / "f32")
    assert set(got) == set(want) and not any("scale" in n or "_blocks" in n for n in got)
    for name in want:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_config" not in config
    if fmt == "mxfp4":
        assert got["model.layers.1.mlp.experts.down_proj"].shape == (2, 64, 8)


def test_mixed_fp8_and_bf16_merge_in_float32(family, tmp_path):
    """An fp8 base and a bf16 fine-tune: the merge of the dequantized base saved in float32."""
    got = merge(ties(family["base-fp8"], family["ft1"], out_dtype="bfloat16"), tmp_path / "q")
    want = merge(ties(family["base-fp8-f32"], family["ft1"], out_dtype="bfloat16"), tmp_path / "f32")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # ... and not the merge of a base rounded to bf16 first (the float32 path matters here)
    rounded = merge(ties(family["base-fp8-f32"], family["ft1"], dtype="bfloat16"), tmp_path / "bf16")
    assert any(not torch.equal(got[n], rounded[n]) for n in got)


def test_plan_lists_the_scales_as_consumed(family, tmp_path, capsys):
    for fmt, ft, shown in (("fp8", "ft1", "fp8 scales (block 48x40)"), ("mxfp4", "ft1-mxfp4", "mxfp4 scales (block 32)")):
        recipe = tmp_path / f"{fmt}.yml"
        recipe.write_text(yaml.safe_dump(ties(family[f"base-{fmt}"], family[ft])))
        main(["plan", str(recipe)])
        assert f"{shown}: read to dequantize their tensors, not merged on their own" in capsys.readouterr().out


def test_plan_lists_each_quantized_input(family, tmp_path, capsys):
    """``distmerge plan`` names each quantized input, its format and block, how many tensors it
    dequantizes and what they are written as; an unquantized input has no line."""
    def plan(base, ft) -> str:
        recipe = tmp_path / "r.yml"
        recipe.write_text(yaml.safe_dump(ties(family[base], family[ft])))
        main(["plan", str(recipe)])
        return capsys.readouterr().out

    def count(name) -> int:
        return len([t for t in load_checkpoint(str(family[name])).tensors.values() if t.quant])

    out = plan("base-fp8", "ft1")
    assert count("base-fp8") > 0 and "quantized inputs (1):\n" in out and "[1] " not in out.split("quantized inputs")[1].split("\n")[1]
    assert re.search(rf"\n  \[0\] \S*base-fp8: {count('base-fp8')} tensors block-scaled fp8 \(block 48x40\), dequantized to float32 while read, merged in float32, written as BF16\n", out)
    out = plan("base-mxfp4", "ft1-mxfp4")
    assert "quantized inputs (2):\n" in out
    for i, name in enumerate(("base-mxfp4", "ft1-mxfp4")):
        assert re.search(rf"\n  \[{i}\] \S*{name}: {count(name)} tensors mxfp4 \(block 32\), dequantized to float32 while read, merged in float32, written as BF16\n", out)
    assert "quantized inputs" not in plan("base-fp8-f32", "ft1")


def corrupt(family, tmp_path: Path, fmt: str, name: str, value: torch.Tensor | None) -> Path:
    """A copy of the quantized base whose ``name`` is replaced by ``value`` (or removed)."""
    from safetensors.torch import load_file

    dst = tmp_path / "bad"
    shutil.copytree(family[f"base-{fmt}"], dst)
    state = load_file(str(dst / "model.safetensors"))
    if value is None:
        del state[name]
    else:
        state[name] = value
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "fmt, name, value, message",
    [
        ("fp8", "model.layers.0.self_attn.q_proj.weight_scale_inv", None,
         "fp8 tensor 'model.layers.0.self_attn.q_proj.weight' needs 'model.layers.0.self_attn.q_proj.weight_scale_inv' in F32 of shape [2, 2]"),
        ("fp8", "model.layers.0.mlp.up_proj.weight_scale_inv", torch.ones(2, 2),
         "fp8 tensor 'model.layers.0.mlp.up_proj.weight' needs 'model.layers.0.mlp.up_proj.weight_scale_inv' in F32 of shape [3, 2] (one scale per 48x40 block), but it is F32 of shape [2, 2]"),
        ("mxfp4", "model.layers.1.mlp.gate_proj.weight_scales", None,
         "mxfp4 tensor 'model.layers.1.mlp.gate_proj.weight_blocks' needs 'model.layers.1.mlp.gate_proj.weight_scales' in U8 of shape [128, 2]"),
        ("mxfp4", "model.layers.1.mlp.experts.down_proj_scales", torch.ones(2, 8, dtype=torch.uint8),
         "but it is U8 of shape [2, 8]"),
    ],
)  # fmt: skip
def test_missing_or_misshapen_scales_are_one_error(family, tmp_path, fmt, name, value, message):
    with pytest.raises(MergeError, match="^model .*" + re.escape(message)):
        load_checkpoint(str(corrupt(family, tmp_path, fmt, name, value)))


@pytest.mark.parametrize(
    "model, quantization_config, message",
    [
        ("ft1", {"quant_method": "awq"}, "quant_method is 'awq'; distmerge reads only fp8 and mxfp4"),
        ("base-fp8", {"quant_method": "fp8", "weight_block_size": BLOCK, "activation_scheme": "static"}, "activation_scheme is 'static'"),
        ("base-fp8", {"quant_method": "fp8"}, "weight_block_size is None; block-scaled fp8 needs two positive integers"),
    ],
)
def test_unreadable_quantization_configs_are_refused(family, tmp_path, model, quantization_config, message):
    dst = tmp_path / "q"
    shutil.copytree(family[model], dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="^model .*" + re.escape(message)):
        load_checkpoint(str(dst))


def _without_quantization_config(family, tmp_path: Path, rename=None) -> Path:
    """A copy of the fp8 base with no quantization_config, its tensors renamed by ``rename``
    (name -> new names and values)."""
    from safetensors.torch import load_file

    dst = tmp_path / "noqc"
    shutil.copytree(family["base-fp8"], dst)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    if rename:
        state = {k: v for name, w in load_file(str(dst / "model.safetensors")).items() for k, v in rename(name, w)}
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _compressed_tensors_names(name, w):
    """DeepSeek's *_scale_inv renamed to a compressed-tensors layout: weight_scale and input_scale."""
    if name.endswith("_scale_inv"):
        stem = name.removesuffix(".weight_scale_inv")
        return [(stem + ".weight_scale", w), (stem + ".input_scale", torch.ones(1))]
    return [(name, w)]


@pytest.mark.parametrize("rename, scale", [(None, "_scale_inv"), (_compressed_tensors_names, "(?:input|weight)_scale")])
def test_fp8_with_scales_but_no_quantization_config_is_refused(family, tmp_path, rename, scale):
    """float8 values with scales beside them, which no quantization_config reads: merged as they
    are they would be a wrong checkpoint, so the plan refuses the model in one line."""
    with pytest.raises(MergeError, match=r"^model .*: \d+ float8 tensors \(e\.g\. 'model\.layers\.0\.[\w.]+\.weight'\) come with \d+ scale tensors "
                       rf"\(e\.g\. '[\w.]+{scale}'\), but config.json has no quantization_config, so their values would be merged without their scales; "
                       r"add the checkpoint's quantization_config .* or dequantize it first") as e:
        load_checkpoint(str(_without_quantization_config(family, tmp_path, rename)))
    assert "\n" not in str(e.value)


def test_plain_fp8_without_scales_is_read_as_values(family, tmp_path):
    """An fp8 checkpoint with no scale tensors at all (model.to(float8)): its values are the weights."""
    dst = _without_quantization_config(family, tmp_path, lambda name, w: [] if name.endswith("_scale_inv") else [(name, w)])
    ck = load_checkpoint(str(dst))
    info = ck.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert ck.quant is None and info.dtype == "F8_E4M3" and info.quant is None


def test_dequantized_shapes_in_the_plan(family):
    ck = load_checkpoint(str(family["base-mxfp4"]))
    info = ck.tensors["model.layers.0.mlp.experts.down_proj"]
    assert (info.dtype, info.shape, info.quant["format"]) == ("F32", (2, 64, 8), "mxfp4")
    assert math.prod(info.quant["data"][2]) == info.end - info.begin


def test_out_dtype_fp8_requantizes_to_the_input_block_layout(family, tmp_path):
    """out_dtype: fp8: each fp8 input tensor is written as fp8 blocks of the float32 merge with
    weight_scale_inv beside it (within the round-trip bound of the float32 merge), the rest in
    bf16, and the quantization_config back in the config."""
    got = merge(ties(family["base-fp8"], family["ft1-fp8"], out_dtype="fp8"), tmp_path / "q")
    exact = merge(ties(family["base-fp8-f32"], family["ft1-fp8-f32"], out_dtype="float32"), tmp_path / "f32")
    source = load_state(family["base-fp8"])
    assert set(got) == set(source)
    for name, x in exact.items():
        if source[name].dtype != torch.float8_e4m3fn:
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], x.bfloat16()), name
            continue
        q, scale = got[name], got[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and scale.shape == source[name + "_scale_inv"].shape, name
        want_q, want_scale = quantize_fp8(x, BLOCK)
        assert torch.equal(scale, want_scale) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), name
        s = scale.repeat_interleave(BLOCK[0], 0)[: x.shape[0]].repeat_interleave(BLOCK[1], 1)[:, : x.shape[1]]
        err = (fp8_reference(q, scale, BLOCK) - x).abs()
        assert bool((err <= torch.maximum(x.abs() * 2**-4, s * 2**-10) * (1 + 2**-20)).all()), name
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == BLOCK and config["quantization_config"]["quant_method"] == "fp8"
    assert config["torch_dtype"] == "bfloat16"


def test_out_dtype_fp8_merges_each_tensor_once_and_keeps_its_parts_on_one_rank(family, tmp_path, monkeypatch):
    """An fp8 output tensor's values and scales come from one float32 merge: one unit of work
    (graph.work_units), on one rank (plan.assign_tensors, the same split), merged once."""
    from distmerge import tensor_merge
    from distmerge.graph import assign_units, work_units
    from distmerge.plan import assign_tensors, build_plan
    from distmerge.recipe import parse_recipe

    recipe = ties(family["base-fp8"], family["ft1-fp8"], out_dtype="fp8")
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe)))
    parts = {t.name: t.quant["of"] for t in plan.tensors if t.quant}
    assert parts and len(parts) == 2 * len(set(parts.values()))
    units = work_units([plan])
    by_name = {plan.tensors[i].name: u for u in units for _, i in u.members}
    for name, of in parts.items():
        assert by_name[name] is by_name[of], name
    for world in (2, 3):
        shares = assign_tensors(plan, world)
        assert shares == [sorted(i for u in share for _, i in units[u].members) for share in assign_units(units, world)]
        rank = {plan.tensors[i].name: r for r, share in enumerate(shares) for i in share}
        assert all(rank[name] == rank[of] for name, of in parts.items())

    merged = []
    real = tensor_merge._merge
    def counted(plan, t, ctx, *rest):  # the float32 merges (a part's own call, t.quant set, goes on to one)
        if t.quant is None:
            merged.append(t.name)
        return real(plan, t, ctx, *rest)

    monkeypatch.setattr(tensor_merge, "_merge", counted)
    merge(recipe, tmp_path / "q")
    assert sorted(n for n in merged if n in parts.values()) == sorted(set(parts.values()))  # each once, not once per part


def test_out_dtype_fp8_needs_an_fp8_input(family, tmp_path):
    from distmerge.plan import build_plan
    from distmerge.recipe import parse_recipe

    with pytest.raises(MergeError, match="out_dtype: fp8 re-quantizes .* but no input tensor is fp8"):
        build_plan(parse_recipe(yaml.safe_dump(ties(family["base"], family["ft1"], out_dtype="fp8"))))
    with pytest.raises(MergeError, match="dtype 'fp8' is not one of bfloat16, float16, float32, float64"):
        parse_recipe(yaml.safe_dump(ties(family["base"], family["ft1"], dtype="fp8")))


def test_out_dtype_fp8_only_for_the_final_output(family, tmp_path, capsys):
    """A later stage would read an fp8 stage's values and scales as plain tensors: refused."""
    stage = {"name": "s1", **ties(family["base-fp8"], family["ft1-fp8"], out_dtype="fp8")}
    final = {"merge_method": "linear", "models": [{"model": "s1", "parameters": {"weight": 1.0}}, {"model": str(family["ft1-fp8"]), "parameters": {"weight": 1.0}}]}
    recipe = tmp_path / "stages.yml"
    recipe.write_text(yaml.safe_dump_all([stage, final], sort_keys=False))
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe)])
    assert e.value.code == 2
    assert "stage 's1': out_dtype: fp8 is for the final output only" in capsys.readouterr().err


@pytest.mark.slow  # launches torchrun
def test_same_bytes_on_two_ranks(family, tmp_path):
    """fp8 and mxfp4 inputs, fp8 out: a weight and its scales are separate units of work, each
    merged where it lands; two ranks write the bytes one process writes."""
    from tests.test_distributed import SHARD, assert_same_output, in_process, torchrun

    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties(family["base-fp8"], family["ft1-fp8"], out_dtype="fp8")))
    ref = in_process(recipe, tmp_path / "one")
    done = torchrun(2, recipe, tmp_path / "two", "--out-shard-size", SHARD)
    assert done.rc == 0, done.tail()
    assert_same_output(tmp_path / "two", ref)

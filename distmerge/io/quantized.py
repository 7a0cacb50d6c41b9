"""Quantized checkpoints: find their quantized tensors from the headers, dequantize them while reading.

Two layouts, both recognised by config.json's ``quantization_config.quant_method``:

- ``fp8``, block-scaled FP8 (DeepSeek-V3, Qwen3-*-FP8): ``X.weight`` in float8_e4m3fn, shape
  (..., R, C), and ``X.weight_scale_inv`` in float32, shape (..., ⌈R/b0⌉, ⌈C/b1⌉) for
  ``weight_block_size: [b0, b1]``; the value is weight · scale of its block (the blocks at the
  right and bottom edges are cropped). As transformers' ``integrations/finegrained_fp8.py``
  (``_dequantize_fp8_weight``) reads it.
- ``mxfp4`` (gpt-oss): ``X_blocks`` in uint8, shape (..., G, B), two fp4 e2m1 values per byte
  (low nibble first) and ``X_scales`` in uint8, shape (..., G), an e8m0 exponent (bias 127) per
  block of 2·B values (B = 16: 32 values); value = FP4_VALUES[nibble] · 2^(scale − 127). The
  packed axis is the weight's input axis; the dequantized tensor is named ``X`` and has shape
  (..., G·2B), with the last two axes swapped for 4-D blocks (gpt-oss's experts, (E, R, G, B)
  -> (E, G·2B, R)), as transformers' ``integrations/mxfp4.py`` (``convert_moe_packed_tensors``)
  gives it.

A quantized tensor enters the plan as one tensor of its dequantized shape and dtype F32,
reading its data's bytes and carrying its scales in ``quant`` (the file, dtype, shape and byte
range of the scales, the format and block). Its scales are consumed: read to dequantize it,
never merged or written as tensors of their own. ``dequantize`` returns a float32 tensor and
never holds more than the float32 result and one block row (fp8) or one leading slice
(mxfp4) of temporaries.

float8 tensors that no quantization_config covers are read as plain values (an fp8 checkpoint
saved as such, e.g. by ``model.to(torch.float8_e4m3fn)``), unless scale tensors sit beside
them (``weight_scale``, ``weight_scale_inv``, ``input_scale``, ``k_scale``, ...): then their
values mean nothing without the scales, and the checkpoint is refused (``_check_unscaled_fp8``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from distmerge.errors import MergeError

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value (torch.finfo(torch.float8_e4m3fn).max)."""
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The e2m1 values by nibble: sign bit 3, then two exponent bits and one mantissa bit."""
FP8_SCALE_SUFFIX = "_scale_inv"
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
FORMATS = ("fp8", "mxfp4")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_SCALE_NAME = re.compile(r"^(?:\w+_)?scales?(?:_inv)?$")
"""The last part of a scale tensor's name: ``weight_scale``, ``weight_scale_inv``, ``input_scale``, ``down_proj_scale``, ``scale``."""


def quant_method(ref: str, config: dict) -> str | None:
    """The checkpoint's quantization format ("fp8", "mxfp4"), None for an unquantized one."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in FORMATS:
        raise MergeError(
            f"model {ref!r}: config.json's quantization_config.quant_method is {method!r}; distmerge reads only "
            f"{' and '.join(FORMATS)} checkpoints: dequantize this one first (transformers: from_pretrained, then save_pretrained)"
        )
    return method


def fold(ref: str, config: dict, tensors: dict) -> tuple[dict, dict | None]:
    """``tensors`` (name -> ``sources.TensorInfo``) with each quantized tensor and its scales
    replaced by one dequantized tensor (dtype F32, its ``quant`` set), and a summary for the
    plan: {"format", "block", "scales": {tensor: the name of its scales}} (None when the
    checkpoint is not quantized). MergeError naming the tensor and the expected shape for
    scales that are missing or of the wrong shape."""
    method = quant_method(ref, config)
    if method is None:
        _check_unscaled_fp8(ref, tensors, "config.json has no quantization_config")
        return tensors, None
    if method == "fp8":
        return _fold_fp8(ref, config["quantization_config"], tensors)
    folded, quant = _fold_mxfp4(ref, tensors)
    _check_unscaled_fp8(ref, folded, "config.json's quantization_config is mxfp4, which does not cover them")
    return folded, quant


def _check_unscaled_fp8(ref: str, tensors: dict, why: str) -> None:
    """float8 tensors with scale tensors in their module, which no quantization_config read:
    merged as they are, their values would be missing their scales (a wrong checkpoint)."""
    fp8 = [n for n, info in tensors.items() if info.dtype in FP8_DTYPES]
    modules = {n.rpartition(".")[0] for n in fp8}
    scales = [n for n in tensors if n not in fp8 and _SCALE_NAME.match(n.rpartition(".")[2]) and n.rpartition(".")[0] in modules]
    if scales:
        raise MergeError(
            f"model {ref!r}: {len(fp8)} float8 tensors (e.g. {fp8[0]!r}) come with {len(scales)} scale tensors (e.g. {scales[0]!r}), "
            f"but {why}, so their values would be merged without their scales; add the checkpoint's quantization_config "
            "(distmerge reads quant_method fp8 with weight_block_size and *_scale_inv scales) or dequantize it first "
            "(transformers: from_pretrained, then save_pretrained in bfloat16)"
        )


def _part(info) -> list:
    return [info.file, info.dtype, list(info.shape), info.begin, info.end]


def _fold_fp8(ref: str, qc: dict, tensors: dict) -> tuple[dict, dict]:
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise MergeError(
            f"model {ref!r}: config.json's quantization_config.weight_block_size is {block!r}; block-scaled fp8 "
            "needs two positive integers such as [128, 128] (per-tensor fp8 is not read)"
        )
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise MergeError(
            f"model {ref!r}: config.json's quantization_config.activation_scheme is {qc['activation_scheme']!r}; "
            "distmerge reads fp8 checkpoints with dynamic activation scales only (static input_scale tensors cannot be merged)"
        )
    folded, scales = {}, {}
    for name, info in tensors.items():
        if info.dtype not in ("F8_E4M3", "F8_E5M2"):
            continue
        scale_name = name + FP8_SCALE_SUFFIX
        if len(info.shape) < 2:
            raise MergeError(f"model {ref!r}: fp8 tensor {name!r} has shape {list(info.shape)}; block scaling needs 2 or more dimensions")
        *lead, rows, cols = info.shape
        want = [*lead, -(-rows // block[0]), -(-cols // block[1])]
        scale = tensors.get(scale_name)
        if scale is None or list(scale.shape) != want or scale.dtype not in ("F32", "BF16"):
            found = "is missing" if scale is None else f"is {scale.dtype} of shape {list(scale.shape)}"
            raise MergeError(
                f"model {ref!r}: fp8 tensor {name!r} needs {scale_name!r} in F32 of shape {want} (one scale per "
                f"{block[0]}x{block[1]} block), but it {found}; re-download the checkpoint or fix its quantization_config"
            )
        quant = {"format": "fp8", "block": list(block), "data": _part(info), "scale": _part(scale)}
        folded[name] = (name, dataclasses.replace(info, dtype="F32", quant=quant))
        scales[name] = scale_name
    out = _replaced(tensors, folded, scales)
    orphans = [n for n in out if n.endswith(FP8_SCALE_SUFFIX)]
    if orphans:
        raise MergeError(f"model {ref!r}: {orphans[0]!r} scales no fp8 tensor {orphans[0][: -len(FP8_SCALE_SUFFIX)]!r}; the checkpoint is incomplete")
    return out, {"format": "fp8", "block": list(block), "scales": scales}


def _fold_mxfp4(ref: str, tensors: dict) -> tuple[dict, dict]:
    folded, scales = {}, {}
    for name, info in tensors.items():
        if not name.endswith(MX_BLOCKS):
            continue
        target, scale_name = name[: -len(MX_BLOCKS)], name[: -len(MX_BLOCKS)] + MX_SCALES
        scale = tensors.get(scale_name)
        want = list(info.shape[:-1])
        if info.dtype != "U8" or len(info.shape) < 3:
            raise MergeError(f"model {ref!r}: mxfp4 tensor {name!r} is {info.dtype} of shape {list(info.shape)}; expected U8 of shape [..., groups, bytes per group]")
        if scale is None or list(scale.shape) != want or scale.dtype != "U8":
            found = "is missing" if scale is None else f"is {scale.dtype} of shape {list(scale.shape)}"
            raise MergeError(
                f"model {ref!r}: mxfp4 tensor {name!r} needs {scale_name!r} in U8 of shape {want} (one e8m0 exponent "
                f"per {2 * info.shape[-1]} values), but it {found}; re-download the checkpoint"
            )
        if target in tensors:
            raise MergeError(f"model {ref!r}: holds both {target!r} and its mxfp4 form {name!r}; keep one")
        quant = {"format": "mxfp4", "block": [2 * info.shape[-1]], "data": _part(info), "scale": _part(scale)}
        folded[name] = (target, dataclasses.replace(info, dtype="F32", shape=mxfp4_shape(info.shape), quant=quant))
        scales[target] = scale_name
    out = _replaced(tensors, folded, scales)
    orphans = [n for n, info in out.items() if n.endswith(MX_SCALES) and info.dtype == "U8"]
    if orphans:
        raise MergeError(f"model {ref!r}: {orphans[0]!r} has no matching blocks; the checkpoint is incomplete")
    block = sorted({tuple(q.quant["block"]) for q in out.values() if q.quant})
    return out, {"format": "mxfp4", "block": list(block[0]) if len(block) == 1 else [list(b) for b in block], "scales": scales}


def _replaced(tensors: dict, folded: dict, scales: dict) -> dict:
    """``tensors`` in their order, each quantized one replaced by its dequantized (name, info),
    the scales dropped."""
    consumed = set(scales.values())
    return dict(folded.get(n, (n, info)) for n, info in tensors.items() if n not in consumed)


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized shape of mxfp4 blocks of shape (..., G, B): (..., G·2B), the last two
    axes swapped for 4-D blocks (transformers' gpt-oss experts)."""
    *prefix, groups, nbytes = blocks_shape
    shape = (*prefix, groups * 2 * nbytes)
    return (shape[0], shape[2], shape[1]) if len(shape) == 3 else shape


def dequantize(data: torch.Tensor, scale: torch.Tensor, quant: dict) -> torch.Tensor:
    """The float32 values of a quantized tensor read as stored (``data``, ``scale``)."""
    if quant["format"] == "fp8":
        return dequantize_fp8(data, scale, quant["block"])
    return dequantize_mxfp4(data, scale)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """weight (..., R, C) in fp8 times its block's scale, in float32. One block row at a time:
    the float32 result plus one block row of expanded scales."""
    out = weight.to(torch.float32)
    rows, cols = out.shape[-2:]
    b0, b1 = block
    for i in range(math.ceil(rows / b0)):
        s = scale_inv[..., i, :].to(torch.float32).repeat_interleave(b1, dim=-1)[..., :cols]
        out[..., i * b0 : (i + 1) * b0, :] *= s.unsqueeze(-2)
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """mxfp4 blocks (..., G, B) and e8m0 scales (..., G) in float32, shaped by ``mxfp4_shape``.
    4-D blocks go one leading slice (expert) at a time."""
    if blocks.dim() == 4:
        out = torch.empty(mxfp4_shape(tuple(blocks.shape)), dtype=torch.float32, device=blocks.device)
        for e in range(blocks.shape[0]):
            out[e] = _mxfp4_values(blocks[e], scales[e]).transpose(0, 1)
        return out
    return _mxfp4_values(blocks, scales)


def _mxfp4_values(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., G, B) -> (..., G·2B): the low nibble of byte k is value 2k, the high one 2k + 1."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    *prefix, groups, nbytes = blocks.shape
    values = torch.empty(*prefix, groups, nbytes, 2, dtype=torch.float32, device=blocks.device)
    values[..., 0] = lut[(blocks & 0x0F).long()]
    values[..., 1] = lut[(blocks >> 4).long()]
    values = values.view(*prefix, groups, 2 * nbytes)
    torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1), out=values)
    return values.view(*prefix, groups * 2 * nbytes)


def quantize_fp8(x: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, float32 scale_inv per block) of ``x`` (..., R, C): each block's
    scale is its amax / 448 (1 for an all-zero block), its values x / scale rounded to nearest
    e4m3. ``dequantize_fp8`` of the pair is within scale·2^-4 of x (see README)."""
    x = x.to(torch.float32)
    *lead, rows, cols = x.shape
    b0, b1 = block
    nr, nc = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(*lead, nr * b0, nc * b1, dtype=torch.float32, device=x.device)
    padded[..., :rows, :cols] = x
    tiles = padded.view(*lead, nr, b0, nc, b1)
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale.unsqueeze(-1).unsqueeze(-3)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(*lead, nr * b0, nc * b1)[..., :rows, :cols].contiguous(), scale

"""Tiny Hugging Face Llama checkpoints for tests and the demo, and sparse full-scale ones.

Needs only torch and the standard library (not even numpy); the tokenizer files are written
as JSON data, so they need no ``tokenizers`` package either.

* :func:`make_llama` writes a small, deterministic Llama checkpoint directory exactly as
  ``LlamaForCausalLM.save_pretrained`` would lay it out (config.json,
  generation_config.json, model.safetensors or shards + index, tokenizer files).
  With ``base=`` it writes a "fine-tune": base + noise * N(0, 1).
* :func:`make_family` writes a base and ``n_finetunes`` fine-tunes of it.
* :func:`make_sparse_checkpoint` writes a full-size (70B, 120B...) checkpoint whose
  safetensors files hold real headers and holes for data: planning, header reading
  and sharding can be exercised at full scale with no disk used.

CLI (used by launch/demo.sh)::

    python -m distmerge.demo make ROOT [--finetunes 2] [--seed 0] [--layers 4] ...
    python -m distmerge.demo sparse ROOT [--preset llama-70b]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import struct
import sys
from pathlib import Path
from typing import Mapping

import torch

__all__ = [
    "LLAMA_70B",
    "LLAMA3_70B",
    "LLAMA_120B",
    "PRESETS",
    "llama_config",
    "llama_tensor_shapes",
    "make_llama",
    "make_family",
    "make_sparse_checkpoint",
    "save_safetensors",
    "write_tokenizer",
    "main",
]

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama-2

_DTYPE_NAMES = {  # torch dtype -> (config.json name, safetensors name, bytes per element)
    torch.bfloat16: ("bfloat16", "BF16", 2),
    torch.float16: ("float16", "F16", 2),
    torch.float32: ("float32", "F32", 4),
}
_ST_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_TO_CONFIG = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


# --------------------------------------------------------------------------- config


def llama_config(
    *,
    num_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 128,
    dtype: str = "bfloat16",
    tie_embeddings: bool = False,
    max_position_embeddings: int = 512,
    rms_norm_eps: float = 1e-6,
    rope_theta: float = 10000.0,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
) -> dict:
    """A Llama ``config.json`` dict, as ``transformers.LlamaConfig.save_pretrained`` writes it.

    Both the transformers 5 spellings (``dtype``, ``rope_parameters``) and the 4.x ones
    (``torch_dtype``, ``rope_theta``) are present so every reader finds what it looks for.
    ``head_dim`` defaults to hidden // heads (Gemma and Qwen3 set it apart).
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "dtype": dtype,
        "eos_token_id": eos_token_id,
        "head_dim": head_dim or hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": dtype,
        "transformers_version": "4.45.0",
        "use_cache": True,
        "vocab_size": vocab,
    }


#: meta-llama/Llama-2-70b-hf
LLAMA_70B = llama_config(
    num_layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
)
#: meta-llama/Meta-Llama-3-70B
LLAMA3_70B = llama_config(
    num_layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    bos_token_id=128000, eos_token_id=128001,
)
#: A 120B-class passthrough "frankenmerge" of Llama-2-70B (140 layers, ~120B params).
LLAMA_120B = {**LLAMA_70B, "num_hidden_layers": 140}

PRESETS = {"llama-70b": LLAMA_70B, "llama3-70b": LLAMA3_70B, "llama-120b": LLAMA_120B}


def llama_tensor_shapes(config: Mapping) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a ``LlamaForCausalLM`` state dict, in ``named_parameters`` order."""
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (heads * hd, h)),
            (p + "self_attn.k_proj.weight", (kv * hd, h)),
            (p + "self_attn.v_proj.weight", (kv * hd, h)),
            (p + "self_attn.o_proj.weight", (h, heads * hd)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, h)))
    return out


def _generation_config(config: Mapping) -> dict:
    return {
        "_from_model_config": True,
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "transformers_version": config.get("transformers_version", "4.45.0"),
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _shard_names(n: int) -> list[str]:
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _split_even(sizes: list[int], n: int) -> list[int]:
    """Split consecutive items into n non-empty groups of about equal total: group per item."""
    total = sum(sizes)
    groups: list[int] = []
    g, acc, count = 0, 0, 0
    for i, s in enumerate(sizes):
        left = len(sizes) - i  # items not yet placed, this one included
        if count and g < n - 1 and (acc + s / 2 > total * (g + 1) / n or left <= n - 1 - g):
            g, count = g + 1, 0
        groups.append(g)
        acc += s
        count += 1
    return groups


# --------------------------------------------------------------------------- tiny models


def _llama_weights(
    shapes: list[tuple[str, tuple[int, ...]]],
    *,
    seed: int,
    base: Mapping[str, torch.Tensor] | None,
    noise: float,
) -> dict[str, torch.Tensor]:
    """float32 weights in ``shapes`` order, one generator draw per tensor (see make_llama)."""
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        draw = torch.randn(shape, generator=gen, dtype=torch.float32)
        if base is not None:
            if name not in base:
                raise ValueError(f"base has no tensor {name!r}: shapes must match the base")
            b = base[name]
            if tuple(b.shape) != tuple(shape):
                raise ValueError(f"{name}: base shape {tuple(b.shape)} != {shape}")
            out[name] = b.to(torch.float32) + noise * draw
        elif len(shape) == 1:  # RMSNorm weights
            out[name] = 1.0 + 0.02 * draw
        else:
            out[name] = 0.02 * draw
    return out


def make_llama(
    path: str | os.PathLike,
    *,
    seed: int,
    num_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    tie_embeddings: bool = False,
    base: Mapping[str, torch.Tensor] | None = None,
    noise: float = 0.01,
    tokenizer: bool = True,
) -> dict[str, torch.Tensor]:
    """Write a tiny Hugging Face Llama checkpoint directory at ``path``; return its state dict.

    Weights are deterministic in ``seed`` (and independent of ``shards``): matrices
    N(0, 0.02²), norms 1 + N(0, 0.02²). With ``base`` (a state dict, e.g. the return value
    of an earlier call) the weights are ``base + noise * N(0, 1)``, a "fine-tune" whose task
    vector has a per-element standard deviation of ``noise``. The model's shape comes
    from the keyword arguments, which must match ``base``'s.

    ``shards == 1`` writes ``model.safetensors``; more writes ``model-0000k-of-0000n``
    files and ``model.safetensors.index.json``.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, not {dtype}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = llama_config(
        num_layers=num_layers, hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=vocab, dtype=_DTYPE_NAMES[dtype][0],
        tie_embeddings=tie_embeddings,
    )
    shapes = llama_tensor_shapes(config)
    if not 1 <= shards <= len(shapes):
        raise ValueError(f"shards must be between 1 and {len(shapes)}, not {shards}")

    master = _llama_weights(shapes, seed=seed, base=base, noise=noise)
    state = {name: w.to(dtype).contiguous() for name, w in master.items()}

    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", _generation_config(config))
    for old in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    meta = {"format": "pt"}
    if shards == 1:
        save_safetensors(state, path / "model.safetensors", metadata=meta)
    else:
        names = [n for n, _ in shapes]
        sizes = [state[n].numel() * state[n].element_size() for n in names]
        groups = _split_even(sizes, shards)
        files = _shard_names(shards)
        weight_map = {}
        for g, fname in enumerate(files):
            part = {n: state[n] for n, gi in zip(names, groups) if gi == g}
            save_safetensors(part, path / fname, metadata=meta)
            weight_map.update({n: fname for n in part})
        _write_json(
            path / "model.safetensors.index.json",
            {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
        )
    if tokenizer:
        write_tokenizer(path, vocab=vocab, model_max_length=config["max_position_embeddings"])
    return state


def make_family(
    root: str | os.PathLike,
    *,
    n_finetunes: int = 2,
    seed: int = 0,
    shards: int | Mapping[str, int] = 1,
    **kw,
) -> dict[str, Path]:
    """Write ``root/base`` and fine-tunes ``root/ft1`` .. ``root/ftN`` of it.

    The base uses ``seed``, fine-tune *i* uses ``seed + i`` and is the base's float32
    weights + noise * N(0, 1), rounded to ``dtype``. ``shards`` is one number for
    all, or a mapping from name ("base", "ft1", ...) to number of shards (default 1).
    Other keyword arguments go to :func:`make_llama` for every model.
    """
    root = Path(root)

    def n_shards(name: str) -> int:
        return shards.get(name, 1) if isinstance(shards, Mapping) else shards

    out = {"base": root / "base"}
    make_llama(out["base"], seed=seed, shards=n_shards("base"), **kw)
    # Fine-tune from the float32 weights the base was rounded from, so that a bf16
    # family is exactly the bf16 rounding of the float32 family with the same seed.
    config = json.loads((out["base"] / "config.json").read_text())
    master = _llama_weights(llama_tensor_shapes(config), seed=seed, base=None, noise=0.0)
    for i in range(1, n_finetunes + 1):
        name = f"ft{i}"
        out[name] = root / name
        make_llama(out[name], seed=seed + i, base=master, shards=n_shards(name), **kw)
    return out


# --------------------------------------------------------------------------- tokenizer


_COMMON_BIGRAMS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou "
    "io le ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur"
).split()


def _tokenizer_vocab(vocab: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Exactly ``vocab`` tokens: specials, "▁", printable ASCII, then merged bigrams."""
    if vocab < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab must be at least {len(SPECIAL_TOKENS) + 1}, not {vocab}")
    tokens = list(SPECIAL_TOKENS) + ["▁"] + [chr(c) for c in range(33, 127)]
    tokens = tokens[:vocab]
    merges: list[tuple[str, str]] = []
    pairs = [(bg[0], bg[1]) for bg in _COMMON_BIGRAMS] + [
        (a, b) for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"
    ]
    seen = set(tokens)
    for a, b in pairs:
        if len(tokens) >= vocab:
            break
        if a + b in seen or a not in seen or b not in seen:
            continue
        tokens.append(a + b)
        merges.append((a, b))
        seen.add(a + b)
    i = 0
    while len(tokens) < vocab:  # only for vocabularies over ~800 tokens
        tokens.append(f"<extra_{i}>")
        i += 1
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(path: str | os.PathLike, *, vocab: int, model_max_length: int = 512) -> None:
    """Write a tiny BPE tokenizer with exactly ``vocab`` entries (ids: <unk> 0, <s> 1, </s> 2).

    The files are what ``PreTrainedTokenizerFast.save_pretrained`` writes (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json), built as JSON data so that the demo
    needs no ``tokenizers`` package: its output loads with ``AutoTokenizer`` all the same.
    """
    path = Path(path)
    vocab_map, merges = _tokenizer_vocab(vocab)
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}

    def special(i: int, token: str) -> dict:
        return {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}

    def template(*parts: str) -> list[dict]:
        return [{"SpecialToken": {"id": p, "type_id": 0}} if p.startswith("<") else {"Sequence": {"id": p, "type_id": 0}} for p in parts]

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(i, t) for i, t in enumerate(SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": template("<s>", "A"),
            "pair": template("<s>", "A", "<s>", "B"),
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
        },
        "decoder": metaspace,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab_map, "merges": [list(m) for m in merges],
        },
    }  # fmt: skip
    _write_json(path / "tokenizer.json", tokenizer)
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(
        path / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {str(i): {k: v for k, v in special(i, t).items() if k != "id"} for i, t in enumerate(SPECIAL_TOKENS)},
            **special_map,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "pad_token": None,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(path / "special_tokens_map.json", special_map)


# --------------------------------------------------------------------------- sparse full-size


def _safetensors_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, int]:
    """(8-byte length + JSON header padded to 8 bytes, data size) for (name, dtype, shape) entries.

    Data are laid out in the order given, back to back, as safetensors requires.
    """
    header: dict = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
    offset = 0
    for name, st_dtype, shape in entries:
        n = 1
        for d in shape:
            n *= d
        size = n * _ST_DTYPE_BYTES[st_dtype]
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw, offset


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file, like ``safetensors.torch.save_file`` but without numpy.

    (safetensors 0.8's ``save_file`` imports numpy, which distmerge does not depend on.)
    Assumes a little-endian machine, as safetensors does.
    """
    if sys.byteorder != "little":
        raise RuntimeError("save_safetensors writes little-endian data only")
    items = []
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        items.append((name, t.detach().to("cpu").contiguous()))
    head, _ = _safetensors_header(
        [(name, _DTYPE_NAMES[t.dtype][1], tuple(t.shape)) for name, t in items], metadata
    )
    with open(path, "wb") as f:
        f.write(head)
        for _, t in items:
            nbytes = t.numel() * t.element_size()
            if nbytes:
                f.write((ctypes.c_ubyte * nbytes).from_address(t.data_ptr()))


def make_sparse_checkpoint(
    path: str | os.PathLike,
    config: Mapping,
    dtype: str = "BF16",
    shard_bytes: float = 5e9,
) -> dict:
    """Write a full-size Llama checkpoint whose tensor data are holes (sparse files).

    Each ``model-0000k-of-0000n.safetensors`` has a real safetensors header and is then
    ``truncate``-d to its full size, so it reads back with ``safe_open`` (tensors read as
    zeros) while using almost no disk. Tensors are packed into shards of at most
    ``shard_bytes`` like ``save_pretrained`` does. Also writes config.json
    (``config`` with its dtype set) and model.safetensors.index.json. Returns the index.
    """
    if dtype not in _ST_DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_ST_DTYPE_BYTES)}, not {dtype!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(dict(config))
    if dtype in _ST_TO_CONFIG:
        config["dtype"] = config["torch_dtype"] = _ST_TO_CONFIG[dtype]
    itemsize = _ST_DTYPE_BYTES[dtype]

    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    cur = 0
    for name, shape in llama_tensor_shapes(config):
        size = itemsize
        for d in shape:
            size *= d
        if shards[-1] and cur + size > shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append((name, dtype, shape))
        cur += size

    files = _shard_names(len(shards))
    weight_map, total = {}, 0
    for fname, entries in zip(files, shards):
        head, data = _safetensors_header(entries)
        with open(path / fname, "wb") as f:
            f.write(head)
            f.truncate(len(head) + data)
        total += data
        weight_map.update({name: fname for name, _, _ in entries})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(path / "model.safetensors.index.json", index)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", _generation_config(config))
    return index


# --------------------------------------------------------------------------- CLI

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distmerge.demo",
        description="Write tiny Llama checkpoints (or sparse full-size ones) for demos and tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write ROOT/base and fine-tunes ROOT/ft1, ROOT/ft2, ...")
    mk.add_argument("root")
    mk.add_argument("--finetunes", type=int, default=2, help="number of fine-tunes (default 2)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--layers", type=int, default=4)
    mk.add_argument("--hidden", type=int, default=64)
    mk.add_argument("--intermediate", type=int, default=128)
    mk.add_argument("--vocab", type=int, default=128)
    mk.add_argument("--dtype", choices=sorted(_TORCH_DTYPES), default="bfloat16")
    mk.add_argument("--shards", type=int, default=1, help="safetensors files per model")
    mk.add_argument("--noise", type=float, default=0.01, help="fine-tune noise std (default 0.01)")
    sp = sub.add_parser("sparse", help="write a sparse full-size checkpoint (headers only)")
    sp.add_argument("root")
    sp.add_argument("--preset", choices=sorted(PRESETS), default="llama-70b")
    sp.add_argument("--dtype", default="BF16")
    sp.add_argument("--shard-bytes", type=float, default=5e9)
    args = parser.parse_args(argv)

    if args.command == "make":
        paths = make_family(
            args.root, n_finetunes=args.finetunes, seed=args.seed, shards=args.shards,
            num_layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
            vocab=args.vocab, dtype=_TORCH_DTYPES[args.dtype], noise=args.noise,
        )
        for name, p in paths.items():
            print(f"{name}: {p}")
    else:
        index = make_sparse_checkpoint(
            args.root, PRESETS[args.preset], dtype=args.dtype, shard_bytes=args.shard_bytes
        )
        n_files = len(set(index["weight_map"].values()))
        print(
            f"{args.root}: {len(index['weight_map'])} tensors, "
            f"{index['metadata']['total_size'] / 1e9:.1f} GB in {n_files} sparse files"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

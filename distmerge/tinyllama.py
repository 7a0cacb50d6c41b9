"""A tiny Llama in plain torch: forward, greedy decoding, and Hugging Face checkpoint files.

The weights are a flat ``dict[str, Tensor]`` under Hugging Face's ``LlamaForCausalLM`` names
(``model.layers.0.self_attn.q_proj.weight`` ...), so training, saving, loading and merging
all see the same names and nothing is renamed anywhere. The forward pass is the one
transformers computes (RMSNorm in float32, rotary embeddings in the "rotate half" layout,
grouped-query attention, SwiGLU MLP), so a checkpoint written here loads in
``LlamaForCausalLM`` and gives the same logits (tests/test_skills.py checks it).

Needs only torch and the standard library: a plain ``pip install distmerge`` can train,
save and score these models without transformers or tokenizers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from distmerge.demo import llama_config, llama_tensor_shapes, save_safetensors

__all__ = ["ModelArgs", "init_weights", "forward", "generate", "save_model", "load_model", "write_char_tokenizer"]

SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama-2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(kw_only=True, slots=True)
class ModelArgs:
    """Shape of a tiny Llama (the fields config.json needs)."""

    vocab: int
    """Vocabulary size (rows of the embedding and of lm_head)."""
    layers: int = 2
    """Transformer blocks."""
    hidden: int = 64
    """Model width."""
    intermediate: int = 128
    """SwiGLU MLP width."""
    heads: int = 4
    """Query heads; head_dim = hidden // heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than heads)."""
    tie_embeddings: bool = False
    """lm_head shares model.embed_tokens.weight (no lm_head.weight tensor)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 64
    """max_position_embeddings in config.json."""

    def config(self, dtype: str = "float32") -> dict:
        """The config.json dict (as ``LlamaConfig.save_pretrained`` writes it)."""
        cfg = llama_config(
            num_layers=self.layers, hidden=self.hidden, intermediate=self.intermediate,
            heads=self.heads, kv_heads=self.kv_heads, vocab=self.vocab, dtype=dtype,
            tie_embeddings=self.tie_embeddings, max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        )  # fmt: skip
        return cfg

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab=cfg["vocab_size"], layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"], heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=float(theta), max_positions=cfg["max_position_embeddings"],
        )  # fmt: skip


def init_weights(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """float32 weights: matrices N(0, 0.02²) (output projections scaled by 1/√(2·layers), as
    GPT-2 does, so the residual stream starts small), norms 1. Deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    w = {}
    for name, shape in llama_tensor_shapes(args.config()):
        if len(shape) == 1:
            w[name] = torch.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * args.layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            w[name] = torch.randn(shape, generator=gen) * std
    return w


# --------------------------------------------------------------------------- forward


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in float32, scale by weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope(args: ModelArgs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim] for the default rotary embedding (duplicated halves)."""
    hd = args.hidden // args.heads
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated in transformers' "rotate_half" layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def qkv(x, w, p, args):
    """Queries [B, heads, T, head_dim], keys and values [B, kv_heads, T, head_dim] of x [B, T,
    hidden], before the rotary embedding."""
    b, t, _ = x.shape
    hd = args.hidden // args.heads
    q = (x @ w[p + "q_proj.weight"].T).view(b, t, args.heads, hd).transpose(1, 2)
    k = (x @ w[p + "k_proj.weight"].T).view(b, t, args.kv_heads, hd).transpose(1, 2)
    v = (x @ w[p + "v_proj.weight"].T).view(b, t, args.kv_heads, hd).transpose(1, 2)
    return q, k, v


def attention(x, w, p, args, cos, sin):
    b, t, _ = x.shape
    q, k, v = qkv(x, w, p, args)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = args.heads // args.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(b, t, args.hidden) @ w[p + "o_proj.weight"].T


def swiglu(x, w, p):
    """The MLP's hidden activations silu(x·W_gateᵀ) ⊙ (x·W_upᵀ)."""
    return F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)


def mlp(x, w, p):
    return swiglu(x, w, p) @ w[p + "down_proj.weight"].T


def forward(w: dict[str, torch.Tensor], args: ModelArgs, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] for token ids [B, T] (causal, positions 0..T-1)."""
    x = w["model.embed_tokens.weight"][tokens]
    cos, sin = rope(args, tokens.shape[1])
    for i in range(args.layers):
        p = f"model.layers.{i}."
        x = x + attention(rms_norm(x, w[p + "input_layernorm.weight"], args.rms_norm_eps), w, p + "self_attn.", args, cos, sin)
        x = x + mlp(rms_norm(x, w[p + "post_attention_layernorm.weight"], args.rms_norm_eps), w, p + "mlp.")
    x = rms_norm(x, w["model.norm.weight"], args.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if args.tie_embeddings else w["lm_head.weight"]
    return x @ head.T


@torch.no_grad()
def generate(w: dict[str, torch.Tensor], args: ModelArgs, prompts: torch.Tensor, max_new: int) -> torch.Tensor:
    """Greedy continuation [B, max_new] of equal-length prompts [B, T] (no cache: T is tiny).

    Positions after a sequence's first EOS are filled with EOS.
    """
    seq = prompts
    done = torch.zeros(prompts.shape[0], dtype=torch.bool)
    for _ in range(max_new):
        nxt = forward(w, args, seq)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
        done |= nxt == EOS_ID
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
    out = seq[:, prompts.shape[1]:]
    pad = torch.full((out.shape[0], max_new - out.shape[1]), EOS_ID, dtype=out.dtype)
    return torch.cat([out, pad], dim=1)


# --------------------------------------------------------------------------- files


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save_model(
    path: str | os.PathLike, w: dict[str, torch.Tensor], args: ModelArgs, chars: str, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a Hugging Face Llama checkpoint directory: config.json, generation_config.json,
    model.safetensors (HF names, ``dtype``) and a character tokenizer over ``chars``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    _write_json(path / "config.json", args.config(dtype_name))
    _write_json(path / "generation_config.json", {"_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    names = [n for n, _ in llama_tensor_shapes(args.config())]
    save_safetensors({n: w[n].detach().to(dtype).contiguous() for n in names}, path / "model.safetensors", metadata={"format": "pt"})
    write_char_tokenizer(path, chars, vocab=args.vocab, model_max_length=args.max_positions)
    return path


def load_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """(float32 weights, args) of a checkpoint directory (one file or an index of shards)."""
    path = Path(path)
    args = ModelArgs.from_config(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    w = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                w[name] = st.get_tensor(name).float()
    return w, args


def write_char_tokenizer(path: str | os.PathLike, chars: str, *, vocab: int, model_max_length: int = 64) -> None:
    """A tokenizers-library tokenizer.json that splits text into single characters.

    A BPE model with one token per character and no merges, no normalizer and no
    pre-tokenizer: every character is one token, anything else is <unk>; "<s>" is
    prepended (as Llama does) and the Fuse decoder joins tokens back without spaces.
    Ids: <unk> 0, <s> 1, </s> 2, then ``chars`` in order, then <extra_i> up to ``vocab``.
    """
    path = Path(path)
    tokens = list(SPECIALS) + list(chars)
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    if len(tokens) != vocab or len(set(tokens)) != vocab:
        raise ValueError(f"{len(SPECIALS)} specials + {len(chars)} distinct chars do not fit a vocab of {vocab}")

    def special(i: int, token: str) -> dict:
        return {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(i, t) for i, t in enumerate(SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [],
        },
    }  # fmt: skip
    _write_json(path / "tokenizer.json", tokenizer)
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(path / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {k: v for k, v in special(i, t).items() if k != "id"} for i, t in enumerate(SPECIALS)},
        **special_map,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "pad_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })  # fmt: skip
    _write_json(path / "special_tokens_map.json", special_map)

"""Git Re-Basin by activation matching: align a Llama to a reference on calibration tokens.

Weight matching (``distmerge.align``) does not lower the loss barrier between the skills
harness's independently trained bases (README, "Git Re-Basin"). Activation matching (Ainsworth,
Hayase and Srinivasa, ICLR 2023, section 3.1: a permutation per unit group, the linear
assignment that maximises the correlation of the two models' activations on the same inputs)
does, once two continuous symmetries of a Llama are used besides its permutations:

- **The residual stream, rotated.** With each RMSNorm's weight g folded into the projections
  that read the stream, any orthogonal Q is a symmetry, since RMSNorm(xQ) = RMSNorm(x)Q when
  g = 1: x ↦ xQ with E ↦ EQ, each reading projection W ↦ W diag(g) Q, each writing one
  (o_proj, down_proj) W ↦ QᵀW. Q solves the orthogonal Procrustes problem

      Q = argmax_{QᵀQ = I} Σ_points ⟨X̂_ref, X̂_model Q⟩_F = UVᵀ,  where X̂_modelᵀ X̂_ref = UΣVᵀ,

  over the RMS-normalised residual activations X̂ at every block boundary. The model then takes
  the reference's norm weights (W ↦ W diag(g_model) Q diag(1/g_ref)), so the two checkpoints
  interpolate in one gauge. A permutation is the special case: with tied embeddings (lm_head
  is the embedding, which cannot also take the final norm's fold) the stream is permuted,
  by the linear assignment on the same matrix, and nothing is folded.
- **Each KV head's value space, rotated**: v_proj's rows of the head ↦ Rᵀ·, o_proj's columns of
  its query heads ↦ ·R, for the orthogonal R = argmax ⟨V_ref, V_model R⟩ (Procrustes on the
  value activations).
- **Each KV head's query/key planes, rotated.** Rotary embeddings turn each plane of dims
  (i, i + head_dim/2) by an angle set by the position; a fixed rotation of the same plane
  commutes with that, so the keys and the queries of a KV group may all be turned plane by
  plane (k_proj's and q_proj's rows of the group ↦ Rᵀ·) and q·k does not change. Each plane's
  angle maximises ⟨K_model R, K_ref⟩ on the keys before the rotary embedding:
  θ = atan2(m_ba − m_ab, m_aa + m_bb) for that plane's 2 × 2 block m of K_modelᵀ K_ref.

MLP units are permuted by the assignment on the correlation of their SwiGLU activations
silu(x·W_gateᵀ)·(x·W_upᵀ); attention heads by the assignment on the cosine similarity of their
attention patterns (the softmax probabilities), a KV head and its query heads as one block,
as in weight matching. Every statistic is a sum over the calibration rows, gathered in one
forward pass of both models side by side, layer by layer: both models' residual streams over
all the rows are kept between layers, and each layer's sums become its transforms before the
next layer's are gathered (the residual stream's are summed over all of them). Every
transform is exact, so the aligned model computes what it computed before (in float32; a 16-bit checkpoint rounds the
rotated weights once when written).

The activations come from distmerge's own Llama forward (``distmerge.tinyllama``: the default
rotary embedding, no rope_scaling); they only choose the transforms, which keep the function
whatever they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from distmerge.align import Perm, _lap, apply_permutation, group_assignment
from distmerge.errors import MergeError
from distmerge.tinyllama import ModelArgs, apply_rope, qkv, rms_norm, rope, swiglu

__all__ = ["Correlation", "Residual", "Layer", "layers", "transforms", "apply_transforms", "activation_matching", "calibration_tokens"]

EMBED, HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


@dataclass(slots=True)
class Correlation:
    """Pearson correlations between the columns of A and of B, from sums over their rows."""

    n: int
    a: torch.Tensor
    b: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor
    ab: torch.Tensor

    @classmethod
    def zeros(cls, columns: int) -> "Correlation":
        vector = lambda: torch.zeros(columns, dtype=torch.float64)  # noqa: E731
        return cls(0, vector(), vector(), vector(), vector(), torch.zeros(columns, columns, dtype=torch.float64))

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Rows of A and the matching rows of B (float64)."""
        self.n += a.shape[0]
        self.a += a.sum(0)
        self.b += b.sum(0)
        self.aa += a.pow(2).sum(0)
        self.bb += b.pow(2).sum(0)
        self.ab += a.T @ b

    def matrix(self) -> torch.Tensor:
        """[A's column, B's column]."""
        mean_a, mean_b = self.a / self.n, self.b / self.n
        std_a = (self.aa / self.n - mean_a.pow(2)).clamp_min(0).sqrt()
        std_b = (self.bb / self.n - mean_b.pow(2)).clamp_min(0).sqrt()
        cov = self.ab / self.n - mean_a[:, None] * mean_b[None, :]
        return cov / (std_a[:, None] * std_b[None, :]).clamp_min(1e-12)


@dataclass(slots=True)
class Residual:
    """Sums over every block boundary of the RMS-normalised residual activations X̂."""

    cross: torch.Tensor
    """[hidden, hidden]: Σ X̂_modelᵀ X̂_ref."""
    norms: torch.Tensor
    """[2]: ‖X̂_ref‖²_F and ‖X̂_model‖²_F."""
    eps: float

    @classmethod
    def zeros(cls, hidden: int, eps: float) -> "Residual":
        return cls(torch.zeros(hidden, hidden, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), eps)

    def add(self, ref: torch.Tensor, model: torch.Tensor) -> None:
        """Activations [..., hidden] at one boundary (RMSNorm without its weight, as every reader sees them)."""
        a, b = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) for x in (_flat(ref), _flat(model)))
        self.cross += b.T @ a
        self.norms += torch.stack([a.pow(2).sum(), b.pow(2).sum()])


@dataclass(kw_only=True, slots=True)
class Layer:
    """One layer's sums over the calibration tokens ("ref" the reference, "model" the one aligned)."""

    mlp: Correlation
    """Of the reference's and the model's SwiGLU activations."""
    cross: torch.Tensor
    """[heads, heads]: Σ⟨P_ref,i, P_model,j⟩ of the attention patterns."""
    pattern_norms: torch.Tensor
    """[2, heads]: Σ‖P_ref,i‖² and Σ‖P_model,j‖²."""
    values: torch.Tensor
    """[kv_heads, kv_heads, head_dim, head_dim]: [k, l] = Σ V_model,lᵀ V_ref,k."""
    keys: torch.Tensor
    """The same of the keys, before the rotary embedding."""

    @classmethod
    def zeros(cls, args: ModelArgs) -> "Layer":
        hd = args.hidden // args.heads
        pairs = lambda: torch.zeros(args.kv_heads, args.kv_heads, hd, hd, dtype=torch.float64)  # noqa: E731
        return cls(
            mlp=Correlation.zeros(args.intermediate), cross=torch.zeros(args.heads, args.heads, dtype=torch.float64),
            pattern_norms=torch.zeros(2, args.heads, dtype=torch.float64), values=pairs(), keys=pairs(),
        )  # fmt: skip

    def heads(self) -> torch.Tensor:
        """[ref head, model head]: the cosine of their attention patterns."""
        n = self.pattern_norms
        return self.cross / (n[0][:, None] * n[1][None, :]).sqrt().clamp_min(1e-300)


def _attention(h: torch.Tensor, w: dict, p: str, args: ModelArgs, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities [B, heads, T, T], values and keys before the rotary embedding
    [B, kv_heads, T, head_dim], output [B, T, hidden])."""
    b, t, _ = h.shape
    hd, rep = args.hidden // args.heads, args.heads // args.kv_heads
    q, keys, v = qkv(h, w, p, args)
    q, k = apply_rope(q, cos, sin), apply_rope(keys, cos, sin)
    scores = q @ k.repeat_interleave(rep, dim=1).transpose(-1, -2) / math.sqrt(hd)
    probs = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    y = (probs @ v.repeat_interleave(rep, dim=1)).transpose(1, 2).reshape(b, t, args.hidden)
    return probs, v, keys, y @ w[p + "o_proj.weight"].T


def _block(w: dict, args: ModelArgs, i: int, x: torch.Tensor, cos, sin, seen: list) -> torch.Tensor:
    """Layer i on the residual stream x [B, T, hidden]: its output, and in ``seen`` what is
    matched: the stream after attention, the attention's (probabilities, values, keys), the
    SwiGLU activations."""
    p = f"model.layers.{i}."
    probs, v, k, y = _attention(rms_norm(x, w[p + "input_layernorm.weight"], args.rms_norm_eps), w, p + "self_attn.", args, cos, sin)
    x = x + y
    h = rms_norm(x, w[p + "post_attention_layernorm.weight"], args.rms_norm_eps)
    u = swiglu(h, w, p + "mlp.")
    seen += [x, (probs, v, k), u]
    return x + u @ w[p + "mlp.down_proj.weight"].T


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).double()


@torch.no_grad()
def layers(ref: dict, model: dict, args: ModelArgs, tokens: torch.Tensor, residual: Residual, batch: int = 16) -> Iterator[Layer]:
    """Each layer's sums over ``tokens`` [rows, T] in turn (``batch`` rows at a time), the
    residual stream's added into ``residual`` as they go. Between layers both models' streams
    over all the rows are kept (2 × tokens × hidden floats): one layer's sums at a time."""
    xs = [w[EMBED][tokens] for w in (ref, model)]
    residual.add(*xs)
    cos, sin = rope(args, tokens.shape[1])
    for i in range(args.layers):
        layer = Layer.zeros(args)
        for first in range(0, tokens.shape[0], batch):
            rows = slice(first, first + batch)
            seen_ref, seen_model = [], []
            xs[0][rows] = _block(ref, args, i, xs[0][rows], cos, sin, seen_ref)
            xs[1][rows] = _block(model, args, i, xs[1][rows], cos, sin, seen_model)
            (mid_a, (pa, va, ka), ua), (mid_b, (pb, vb, kb), ub) = seen_ref, seen_model
            residual.add(mid_a, mid_b)
            residual.add(xs[0][rows], xs[1][rows])
            layer.mlp.add(_flat(ua), _flat(ub))
            pa, pb = pa.transpose(0, 1).flatten(1).double(), pb.transpose(0, 1).flatten(1).double()
            layer.cross += pa @ pb.T
            layer.pattern_norms += torch.stack([pa.pow(2).sum(1), pb.pow(2).sum(1)])
            layer.values += torch.einsum("bltd,bkte->klde", vb.double(), va.double())
            layer.keys += torch.einsum("bltd,bkte->klde", kb.double(), ka.double())
        yield layer


def _procrustes(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal R maximising tr(Rᵀ m) = ⟨X_model R, X_ref⟩ for m = X_modelᵀ X_ref: UVᵀ."""
    u, _, vh = torch.linalg.svd(m)
    return (u @ vh).float()


def _plane_rotations(m: torch.Tensor) -> torch.Tensor:
    """The [head_dim, head_dim] R that turns each rotary plane (i, i + head_dim/2) by the angle
    maximising tr(Rᵀ m) on that plane, for m = K_modelᵀ K_ref (a rotation, not a reflection:
    only a rotation commutes with the rotary embedding's)."""
    half = m.shape[0] // 2
    a, b = torch.arange(half), torch.arange(half) + half
    theta = torch.atan2(m[b, a] - m[a, b], m[a, a] + m[b, b])
    r = torch.zeros(m.shape, dtype=torch.float64)
    r[a, a], r[a, b], r[b, a], r[b, b] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    return r.float()


@dataclass(kw_only=True, slots=True)
class Transforms:
    """What ``apply_transforms`` does to the model."""

    residual: torch.Tensor
    """[hidden, hidden] orthogonal Q (a permutation matrix with tied embeddings)."""
    rotate_residual: bool
    perms: dict[str, torch.Tensor]
    """Each MLP and heads permutation of the spec, and the residual one with tied embeddings
    (new unit i is old unit perms[name][i])."""
    values: dict[int, list[torch.Tensor]]
    """Per layer, per KV head (after the head permutation): the orthogonal R of its values."""
    keys: dict[int, list[torch.Tensor]]
    """The same for its queries and keys: a rotation of each plane the rotary embedding turns."""
    similarity: dict[str, float]
    """Mean matched similarity per group (residual: the cosine of X̂_ref and X̂_model·Q, all points)."""


def transforms(ref: dict, model: dict, spec: list[Perm], args: ModelArgs, tokens: torch.Tensor) -> Transforms:
    """The residual map, the permutations and the value and query/key rotations that the two
    models' activations on ``tokens`` choose, each layer's as soon as its sums are in."""
    residual = Residual.zeros(args.hidden, args.rms_norm_eps)
    perms, values, keys, similarity = {}, {}, {}, {}
    kinds = {p.name: p for p in spec}
    for i, layer in enumerate(layers(ref, model, args, tokens, residual)):
        mlp, heads = kinds[f"layers.{i}.mlp"], kinds[f"layers.{i}.heads"]
        perms[mlp.name], value = _lap(layer.mlp.matrix())
        similarity[mlp.name] = value / mlp.size
        cosines = layer.heads()
        perms[heads.name], _ = group_assignment(cosines, heads.group)
        similarity[heads.name] = float(cosines[torch.arange(heads.size), perms[heads.name]].mean())
        kv = perms[heads.name][:: heads.group] // heads.group  # the model's KV head at each position
        values[i] = [_procrustes(layer.values[k, int(l)]) for k, l in enumerate(kv)]
        keys[i] = [_plane_rotations(layer.keys[k, int(l)]) for k, l in enumerate(kv)]
    rotate = not args.tie_embeddings
    if rotate:
        rot = _procrustes(residual.cross)
    else:  # a permutation: new unit i is old unit perm[i], i.e. Q[perm[i], i] = 1
        perms["residual"], _ = _lap(residual.cross.T)
        rot = torch.zeros(args.hidden, args.hidden)
        rot[perms["residual"], torch.arange(args.hidden)] = 1.0
    similarity["residual"] = float((residual.cross * rot.double()).sum() / residual.norms.prod().sqrt())
    return Transforms(residual=rot, rotate_residual=rotate, perms=perms, values=values, keys=keys, similarity=similarity)


def _readers(layers: int) -> dict[str, list[str]]:
    """Each RMSNorm weight and the projections that read its output."""
    readers = {FINAL_NORM: [HEAD]}
    for i in range(layers):
        p = f"model.layers.{i}."
        readers[p + "input_layernorm.weight"] = [p + f"self_attn.{m}_proj.weight" for m in "qkv"]
        readers[p + "post_attention_layernorm.weight"] = [p + f"mlp.{m}_proj.weight" for m in ("gate", "up")]
    return readers


def apply_transforms(model: dict, ref: dict, spec: list[Perm], t: Transforms, args: ModelArgs) -> dict[str, torch.Tensor]:
    """``model`` (float32) mapped by ``t``: it computes the same function, in the reference's
    gauge (its RMSNorm weights, when the residual is rotated)."""
    w = {n: x.float() for n, x in model.items()}
    rot = t.residual
    w[EMBED] = w[EMBED] @ rot
    for i in range(args.layers):
        for m in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            w[f"model.layers.{i}.{m}"] = rot.T @ w[f"model.layers.{i}.{m}"]
    for norm, readers in _readers(args.layers).items():
        if t.rotate_residual:
            scale = ref[norm].float()
            for r in readers:  # W diag(g_model) Q diag(1 / g_ref)
                w[r] = (w[r] * w[norm][None, :]) @ rot / scale[None, :]
            w[norm] = scale.clone()
        else:
            w[norm] = w[norm] @ rot
            for r in readers:
                if r in w:
                    w[r] = w[r] @ rot
    w = apply_permutation(w, [p for p in spec if p.name != "residual"], t.perms)
    hd, group = args.hidden // args.heads, args.heads // args.kv_heads
    for i in range(args.layers):
        p = f"model.layers.{i}.self_attn."
        q, k, v, o = (w[p + f"{m}_proj.weight"].clone() for m in "qkvo")
        for kv, (rv, rk) in enumerate(zip(t.values[i], t.keys[i])):
            v[kv * hd:(kv + 1) * hd] = rv.T @ v[kv * hd:(kv + 1) * hd]
            k[kv * hd:(kv + 1) * hd] = rk.T @ k[kv * hd:(kv + 1) * hd]
            for h in range(kv * group, (kv + 1) * group):
                o[:, h * hd:(h + 1) * hd] = o[:, h * hd:(h + 1) * hd] @ rv
                q[h * hd:(h + 1) * hd] = rk.T @ q[h * hd:(h + 1) * hd]
        for m, x in zip("qkvo", (q, k, v, o)):
            w[p + f"{m}_proj.weight"] = x
    return w


def check_alignable(config: dict, ref: dict) -> ModelArgs:
    """The forward's shape of a Llama config; MergeError for what activation matching cannot do."""
    args = ModelArgs.from_config(config)
    head_dim = config.get("head_dim") or args.hidden // args.heads
    if head_dim * args.heads != args.hidden:
        raise MergeError(f"head_dim {head_dim} × {args.heads} heads is not hidden_size {args.hidden}: activation matching needs head_dim = hidden_size / heads; align without --data (weight matching)")
    if not args.tie_embeddings:
        zero = [n for n in _readers(args.layers) if bool((ref[n] == 0).any())]
        if zero:
            raise MergeError(f"the reference's {zero[0]} has zero entries, which a rotated residual stream cannot take as its norm weights; align without --data (weight matching)")
    return args


def activation_matching(ref: dict, model: dict, config: dict, spec: list[Perm], tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], Transforms]:
    """``model`` aligned to ``ref`` on ``tokens`` [rows, T] (float32 weights), and the transforms."""
    args = check_alignable(config, ref)
    if int(tokens.max()) >= ref[EMBED].shape[0]:
        raise MergeError(f"the calibration tokens reach id {int(tokens.max())} but the model has {ref[EMBED].shape[0]} embeddings: tokenize with the reference's own tokenizer")
    ref32 = {n: x.float() for n, x in ref.items()}
    model32 = {n: x.float() for n, x in model.items()}
    t = transforms(ref32, model32, spec, args, tokens)
    return apply_transforms(model32, ref32, spec, t, args), t


def calibration_tokens(model_dir: str | Path, data: str | Path, rows: int, length: int) -> torch.Tensor:
    """[n, length]: the first n ≤ ``rows`` windows of ``length`` tokens (at most the model's
    max_position_embeddings) of the text file ``data``, its non-empty lines tokenized one
    after another by ``model_dir``'s tokenizer.json."""
    config = Path(model_dir) / "config.json"
    if config.is_file():
        length = min(length, json.loads(config.read_text()).get("max_position_embeddings") or length)
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise MergeError(f"{model_dir}: no tokenizer.json to tokenize {data} with; align --data needs the reference's fast tokenizer")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MergeError("distmerge align --data needs the tokenizers library: pip install tokenizers") from None
    try:
        lines = Path(data).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"{data}: cannot read the calibration text ({e}); give a UTF-8 text file") from None
    tokenizer = Tokenizer.from_file(str(path))
    ids = [i for line in lines if line.strip() for i in tokenizer.encode(line).ids]
    n = min(rows, len(ids) // length)
    if n == 0:
        raise MergeError(f"{data}: {len(ids)} tokens, fewer than one window of {length}; give more text or a smaller --length")
    return torch.tensor(ids[: n * length]).view(n, length)

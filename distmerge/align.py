"""Git Re-Basin by weight matching: permute a Llama's hidden units to line up with a reference.

Two models trained from different initialisations compute similar functions with their hidden
units in different orders; averaging them unaligned averages unrelated units. Weight matching
(Ainsworth, Hayase and Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023, Algorithm 1) finds permutations π of MODEL's units that maximise

    Σ_tensors ⟨W_ref, π(W_model)⟩_F

by coordinate ascent: each permutation in turn, the others fixed, is the solution of one linear
assignment problem (scipy.optimize.linear_sum_assignment, the Hungarian method, O(n³)),
visited in a random (seeded) order, until a full pass improves none.

The permutations of a Llama checkpoint (:func:`llama_spec`):

- ``residual``: the residual stream, one permutation shared by every layer: the columns of the
  embeddings, of every q/k/v/gate/up projection and of lm_head, the rows of every o_proj and
  down_proj, and the RMSNorm weight vectors (RMSNorm is permutation-equivariant: the mean of
  squares does not depend on the order).
- ``layers.N.mlp``: the SwiGLU intermediate units of layer N (rows of gate_proj and up_proj,
  columns of down_proj).
- ``layers.N.heads``: the attention heads of layer N as whole heads. With grouped-query
  attention a KV head and its ``heads / kv_heads`` query heads move as one block; within a
  group the query heads may also be permuted. The dims inside a head are never permuted:
  rotary embeddings rotate dim pairs (i, i + head_dim/2) by position-dependent angles, so
  q·k is not invariant under a permutation of a head's dims.

The permuted model computes exactly the same function (tests/test_align.py checks the logits
through transformers' LlamaForCausalLM). ``align`` with ``data`` matches activations instead
(``distmerge.activation_matching``: the residual stream, values and query/key planes rotated).
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from distmerge.demo import save_safetensors
from distmerge.errors import MergeError

__all__ = ["Axis", "Perm", "llama_spec", "weight_matching", "group_assignment", "apply_permutation", "objective", "align"]


@dataclass(frozen=True, slots=True)
class Axis:
    """One axis of one tensor that a permutation reorders, in blocks of ``block`` rows."""

    tensor: str
    """The tensor's name in the state dict."""
    axis: int
    """0 for rows, 1 for columns."""
    block: int = 1
    """Consecutive indices that move together (head_dim for attention heads)."""
    kv: bool = False
    """A KV-head axis of a head permutation: it moves by the permutation of KV groups."""


@dataclass(kw_only=True, slots=True)
class Perm:
    """A permutation of ``size`` units and the tensor axes it reorders."""

    name: str
    """``residual``, ``layers.N.mlp`` or ``layers.N.heads``."""
    size: int
    """Units permuted (hidden, intermediate, or query heads)."""
    axes: list[Axis] = field(default_factory=list)
    """Where the units are."""
    group: int = 1
    """Query heads per KV head (heads permutations only): a group moves as one block."""


def llama_spec(config: dict, names) -> list[Perm]:
    """The permutations of a Llama-shaped checkpoint with tensors ``names`` (see the module
    docstring). Raises MergeError for a config that is not Llama-shaped."""
    names = set(names)
    try:
        layers, hidden = config["num_hidden_layers"], config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
    except KeyError as e:
        raise MergeError(f"config.json has no {e}: distmerge align knows Llama-shaped checkpoints only") from None
    intermediate = config.get("intermediate_size")
    residual = Perm(name="residual", size=hidden)
    perms = [residual]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in names:
            residual.axes.append(Axis(name, 1))
    residual.axes.append(Axis("model.norm.weight", 0))
    for i in range(layers):
        p = f"model.layers.{i}."
        residual.axes += [Axis(p + "input_layernorm.weight", 0), Axis(p + "post_attention_layernorm.weight", 0)]
        residual.axes += [Axis(p + f"self_attn.{m}_proj.weight", 1) for m in "qkv"]
        residual.axes += [Axis(p + "self_attn.o_proj.weight", 0), Axis(p + "mlp.down_proj.weight", 0)]
        residual.axes += [Axis(p + f"mlp.{m}_proj.weight", 1) for m in ("gate", "up")]
        mlp = [Axis(p + "mlp.gate_proj.weight", 0), Axis(p + "mlp.up_proj.weight", 0), Axis(p + "mlp.down_proj.weight", 1)]
        perms.append(Perm(name=f"layers.{i}.mlp", size=intermediate, axes=mlp))
        attn = [Axis(p + "self_attn.q_proj.weight", 0, head_dim), Axis(p + "self_attn.o_proj.weight", 1, head_dim)]
        attn += [Axis(p + f"self_attn.{m}_proj.weight", 0, head_dim, kv=True) for m in "kv"]
        perms.append(Perm(name=f"layers.{i}.heads", size=heads, axes=attn, group=heads // kv_heads))
    missing = sorted({a.tensor for perm in perms for a in perm.axes} - names)
    if missing:
        raise MergeError(f"the checkpoint has no {missing[0]} ({len(missing)} Llama tensors missing): distmerge align knows Llama-shaped checkpoints only")
    extra = sorted(n for n in names - {a.tensor for perm in perms for a in perm.axes} if "rotary_emb" not in n)
    if extra:
        raise MergeError(f"{extra[0]} ({len(extra)} tensors) is not in a Llama layer: distmerge align cannot say how it permutes; align Llama-shaped checkpoints only")
    return perms


def _index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Unit permutation → index of the rows it moves, ``block`` rows per unit."""
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def _kv(perm: torch.Tensor, group: int) -> torch.Tensor:
    """The KV-head permutation a (group-preserving) query-head permutation implies."""
    return perm[::group] // group


def _permute(t: torch.Tensor, axis: Axis, perm: torch.Tensor, group: int) -> torch.Tensor:
    p = _kv(perm, group) if axis.kv else perm
    return t.index_select(axis.axis, _index(p, axis.block))


def apply_permutation(state: dict[str, torch.Tensor], spec: list[Perm], perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every unit reordered: new unit i is old unit ``perms[name][i]``."""
    out = dict(state)
    for perm in spec:
        for a in perm.axes:
            out[a.tensor] = _permute(out[a.tensor], a, perms[perm.name], perm.group)
    return out


def objective(ref: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> float:
    """Σ ⟨W_ref, W_model⟩_F over the tensors both have: what weight matching maximises."""
    return float(sum((ref[n].double() * model[n].double()).sum() for n in ref if n in model))


def _lap(cost: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation maximising Σ_i cost[i, perm[i]], and that sum."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)
    return perm, float(cost[torch.as_tensor(rows), perm].sum())


def _similarity(ref, model, spec, perms, perm: Perm, kv: bool) -> torch.Tensor:
    """C[i, j] = Σ_axes ⟨unit i of ref, unit j of model⟩ with every *other* permutation applied
    to the model (the units of ``perm`` itself left in place)."""
    n = perm.size // perm.group if kv else perm.size
    c = torch.zeros(n, n, dtype=torch.float64)
    for a in (a for a in perm.axes if a.kv == kv):
        w = model[a.tensor]
        for other in spec:  # the other permutations that touch this tensor
            for b in other.axes:
                if other is not perm and b.tensor == a.tensor:
                    w = _permute(w, b, perms[other.name], other.group)
        x, y = ref[a.tensor].double().movedim(a.axis, 0), w.double().movedim(a.axis, 0)
        c += x.reshape(n, -1) @ y.reshape(n, -1).T
    return c


def group_assignment(c: torch.Tensor, group: int, score: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The head permutation maximising Σ c[i, perm[i]] + Σ score[reference group, model group]
    with KV groups kept whole, and that value: the best query-head assignment inside each
    (reference group, model group) pair is a small LAP, its value plus ``score`` (the KV heads'
    own similarity; none by default) is the pair's, and a LAP over groups picks the pairs.
    ``score`` is added to in place."""
    groups = c.shape[0] // group
    if score is None:
        score = torch.zeros(groups, groups, dtype=torch.float64)
    inner = {}
    for i in range(groups):
        for j in range(groups):
            inner[i, j], value = _lap(c[i * group:(i + 1) * group, j * group:(j + 1) * group])
            score[i, j] += value
    outer, value = _lap(score)
    return torch.cat([j * group + inner[i, int(j)] for i, j in enumerate(outer)]), value


def _solve(ref, model, spec, perms, perm: Perm) -> tuple[torch.Tensor, float]:
    """The best ``perm`` with the others fixed. For heads: ``group_assignment`` with the KV
    heads' similarity as each pair of groups' score."""
    c = _similarity(ref, model, spec, perms, perm, kv=False)
    if not any(a.kv for a in perm.axes):
        return _lap(c)
    return group_assignment(c, perm.group, _similarity(ref, model, spec, perms, perm, kv=True))


def weight_matching(
    ref: dict[str, torch.Tensor], model: dict[str, torch.Tensor], spec: list[Perm], seed: int = 0, max_iter: int = 100
) -> tuple[dict[str, torch.Tensor], int]:
    """Permutations of ``model``'s units that maximise Σ ⟨W_ref, π(W_model)⟩ (Ainsworth et al.
    2023, Algorithm 1), and the passes it took: coordinate ascent from the identity, one LAP
    per permutation per pass in a seeded random order, until a pass improves none."""
    try:
        importlib.import_module("scipy.optimize")
    except ImportError:
        raise MergeError("distmerge align needs scipy: pip install scipy") from None
    ref = {n: t.float() for n, t in ref.items()}
    model = {n: t.float() for n, t in model.items()}
    perms = {p.name: torch.arange(p.size) for p in spec}
    rng = random.Random(seed)
    for it in range(1, max_iter + 1):
        improved = False
        for perm in rng.sample(spec, len(spec)):
            new, value = _solve(ref, model, spec, perms, perm)
            old = perms[perm.name]
            before = _value(ref, model, spec, perms, perm, old)
            if value > before + 1e-9 * max(1.0, abs(before)):
                perms[perm.name], improved = new, True
        if not improved:
            return perms, it
    return perms, max_iter


def _value(ref, model, spec, perms, perm: Perm, p: torch.Tensor) -> float:
    """The value of permutation ``p`` for ``perm`` with the others fixed (the LAP's objective)."""
    value = 0.0
    for a in perm.axes:
        w = model[a.tensor]
        for other in spec:
            for b in other.axes:
                if b.tensor == a.tensor:
                    w = _permute(w, b, p if other is perm else perms[other.name], other.group)
        value += float((ref[a.tensor].double() * w.double()).sum())
    return value


# --------------------------------------------------------------------------- checkpoints


def _load(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, list[str]], dict]:
    """config, tensors, tensor names per safetensors file, and per-file metadata of a local
    checkpoint directory."""
    if not (path / "config.json").is_file():
        raise MergeError(f"{path}: no config.json; give a local Hugging Face checkpoint directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{path}: no *.safetensors files; distmerge align reads safetensors checkpoints only")
    state, layout, meta = {}, {}, {}
    for f in files:
        with safe_open(f, "pt") as h:
            layout[f.name] = list(h.keys())
            meta[f.name] = h.metadata()
            for n in h.keys():
                state[n] = h.get_tensor(n)
    return json.loads((path / "config.json").read_text()), state, layout, meta


@dataclass(kw_only=True, slots=True)
class Result:
    """What :func:`align` did (also written to OUT/align.json)."""

    objective_before: float
    objective_after: float
    iterations: int
    seconds: float
    perms: dict[str, list[int]]
    moved: dict[str, int]
    """Units that moved, per permutation."""
    method: str = "weights"
    """``weights`` (weight matching) or ``activations`` (``distmerge.activation_matching``)."""
    similarity: dict[str, float] = field(default_factory=dict)
    """Activations only: the mean matched similarity per unit group."""


def align(model_dir: str, ref_dir: str, out: str, seed: int = 0, data: str | None = None, rows: int = 256, length: int = 64) -> Result:
    """Write MODEL aligned to REFERENCE into ``out``: the same safetensors files (names,
    tensors per file, dtype), config, tokenizer and other files copied, plus ``align.json``.
    Weight matching, or with ``data`` (a text file) activation matching on up to ``rows``
    windows of ``length`` of its tokens (``distmerge.activation_matching``)."""
    model_dir, ref_dir, out_dir = Path(model_dir), Path(ref_dir), Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MergeError(f"{out}: the output directory is not empty; give a new directory")
    if data is not None:  # read first: bad text fails before the models are loaded
        from distmerge import activation_matching as am

        tokens = am.calibration_tokens(ref_dir, data, rows, length)
    start = time.perf_counter()
    config, model, layout, meta = _load(model_dir)
    ref_config, ref, _, _ = _load(ref_dir)
    spec = llama_spec(config, model)
    shapes = {n: tuple(t.shape) for n, t in model.items()}
    ref_shapes = {n: tuple(t.shape) for n, t in ref.items()}
    if shapes != ref_shapes or llama_spec(ref_config, ref) != spec:
        diff = next((n for n in sorted(shapes.keys() | ref_shapes.keys()) if shapes.get(n) != ref_shapes.get(n)), "the head layout")
        raise MergeError(f"{model_dir} and {ref_dir} differ in shape at {diff}: align models of one architecture and size")
    if data is None:
        perms, iterations = weight_matching(ref, model, spec, seed)
        aligned, similarity = apply_permutation(model, spec, perms), {}
    else:
        aligned, t = am.activation_matching(ref, model, config, spec, tokens)
        aligned = {n: aligned[n].to(model[n].dtype) for n in model}
        perms, iterations, similarity = t.perms, 1, t.similarity
    result = Result(
        objective_before=objective(ref, model), objective_after=objective(ref, aligned), iterations=iterations,
        seconds=0.0, perms={k: v.tolist() for k, v in perms.items()},
        moved={k: int((v != torch.arange(len(v))).sum()) for k, v in perms.items()},
        method="weights" if data is None else "activations", similarity=similarity,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out_dir / f.name)
    for fname, names in layout.items():
        save_safetensors({n: aligned[n] for n in names}, out_dir / fname, metadata=meta[fname])
    result.seconds = time.perf_counter() - start
    record = {"model": str(model_dir), "reference": str(ref_dir), "seed": seed, "data": data, **{k: getattr(result, k) for k in Result.__slots__}}
    (out_dir / "align.json").write_text(json.dumps(record, indent=1) + "\n")
    return result

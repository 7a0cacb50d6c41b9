"""The output vocabulary, when a recipe sets ``tokenizer_source`` or a ``tokenizer:`` block.

Models fine-tuned from one base often add tokens (chat markers, tool tokens), so their
embedding matrices have different rows. As in mergekit 0.1.5, the recipe picks an output
tokenizer (the base's, a model's, or the ``union`` of all of them) and every
vocabulary-indexed tensor (``embed_tokens``, ``lm_head``) of every model is re-indexed to
it before the merge: output row i of a model is its own row for token i where it has that
token; where it lacks it, the row comes from a fallback shared by all models:

- the only model that has the token, else the base model's row, else the mean of the rows
  of the models that have it (a token no model has gets zeros);
- or what ``tokenizer.tokens`` says (a model's row, another token's row, zeros), which
  with ``force: true`` replaces even the rows models have;
- rows past the vocabulary (``pad_to_multiple_of``) are the mean of the vocabulary's rows.

Planning reads tokenizers as data (``tokenizer.json``); the row maps go into the plan, and
:func:`permute` applies one while the tensor is merged.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from distmerge.errors import MergeError
from distmerge.recipe import TokenSource, TokenizerSpec

VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|lm_head|embed_out)\.weight$")
"""Tensors indexed by token id along their first axis."""
ADDED_TOKEN_KEYS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass(slots=True)
class VocabMap:
    """How one vocabulary-indexed tensor's rows are rebuilt for the output vocabulary."""

    rows: int
    """Output rows: the vocabulary, padded to ``pad_to_multiple_of``."""
    vocab: int
    """Output vocabulary size; rows past it are the mean of the rows before it."""
    copies: list[list] = field(default_factory=list)
    """``[model, [[dst, src, n], ...]]``: runs of rows a model has for the output's tokens."""
    fills: list[list] = field(default_factory=list)
    """``[dst, [[model, src], ...], force]``: the fallback row of a token some model lacks
    (or every model, with ``force``): one source is copied, several averaged, none is zeros."""


@dataclass(slots=True)
class OutputVocab:
    """The output tokenizer and where each model's rows land in it (plan time only)."""

    source: str
    """The model whose tokenizer files the output starts from."""
    added: list[dict]
    """Added-token entries (tokenizer.json spelling, with ``id``) appended to those files."""
    vocab: dict[str, int]
    rows: int
    """The output config's vocab_size: the vocabulary, padded."""
    perms: dict[str, list[int]]
    """Model -> its row for each output token id, or -1."""
    own: dict[str, dict[str, int]]
    """Model -> its own vocabulary (for ``model_token`` sources given by token)."""


def read_tokenizer(path: str) -> dict | None:
    """A model's ``tokenizer.json`` as data, or None when it has none."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{file}: cannot read it: {e}") from None


def vocabulary(tok: dict, where: str) -> dict[str, int]:
    """Token -> id, added tokens included: what ``get_vocab()`` of the fast tokenizer gives."""
    model = tok.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") == "Unigram" and isinstance(vocab, list):
        out = {piece[0]: i for i, piece in enumerate(vocab)}
    elif isinstance(vocab, dict):
        out = dict(vocab)
    else:
        raise MergeError(f"{where}: tokenizer.json has a {model.get('type')!r} model without a vocabulary distmerge can read")
    for a in tok.get("added_tokens") or []:
        out[a["content"]] = a["id"]
    return out


def build_vocab(spec: TokenizerSpec, checkpoints: dict, donor: str) -> OutputVocab | None:
    """The output vocabulary for a recipe's ``tokenizer`` spec (see the module docstring);
    None when no model has a ``tokenizer.json`` (then they are taken to share one).

    ``checkpoints``: model ref -> Checkpoint, in recipe order (the base/donor first).
    """
    tokenizers = {ref: read_tokenizer(ck.path) for ref, ck in checkpoints.items()}
    if all(tok is None for tok in tokenizers.values()) and not spec.tokens and not spec.pad_to_multiple_of:
        return None  # no model has a tokenizer.json: one shared vocabulary, nothing to re-index
    if tokenizers[donor] is None:
        raise MergeError(f"tokenizer: the base model {donor!r} has no tokenizer.json to build the output vocabulary from")
    own = {ref: vocabulary(tok, ref) for ref, tok in tokenizers.items() if tok is not None}
    base_vocab = own[donor]
    # A model's usable ids: below its config's vocab_size (else all of its tokenizer's).
    sizes = {}
    for ref, ck in checkpoints.items():
        size = ck.config.get("vocab_size")
        sizes[ref] = size if isinstance(size, int) else len(own.get(ref, base_vocab))
    if isinstance(checkpoints[donor].config.get("vocab_size"), int) and any(i >= sizes[donor] for i in base_vocab.values()):
        raise MergeError(
            f"tokenizer: {donor!r}'s tokenizer has tokens past its vocab_size {sizes[donor]}; distmerge "
            "does not strip tokenizers: remove those tokens first"
        )
    if spec.source == "base":
        source, added = donor, []
    elif spec.source == "union":
        source, added = donor, _union(tokenizers, own, sizes, donor)
    elif spec.source in checkpoints:
        if tokenizers[spec.source] is None:
            raise MergeError(f"tokenizer source {spec.source!r} has no tokenizer.json")
        source, added = spec.source, []
    else:
        raise MergeError(f"tokenizer source {spec.source!r} is not one of the recipe's models: {', '.join(checkpoints)}")
    vocab = dict(own[source])
    next_id = max(vocab.values(), default=-1) + 1
    for entry in added:
        entry["id"] = next_id
        vocab[entry["content"]] = next_id
        next_id += 1
    for token in spec.tokens:  # tokens the recipe configures are added when missing
        if token not in vocab:
            added.append(_added(token, special=False, id=next_id))
            vocab[token] = next_id
            next_id += 1
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise MergeError(f"tokenizer: the token ids of {source!r}'s tokenizer are not 0..{len(vocab) - 1}")
    rows = len(vocab)
    pad = spec.pad_to_multiple_of
    if pad and rows % pad:
        rows += pad - rows % pad
    perms = {}
    for ref in checkpoints:
        theirs = own.get(ref, base_vocab)  # a model without a tokenizer is taken to share the base's
        row = [-1] * len(vocab)
        for token, i in vocab.items():
            j = theirs.get(token, -1)
            row[i] = j if j < sizes[ref] else -1
        perms[ref] = row
    return OutputVocab(source=source, added=added, vocab=vocab, rows=rows, perms=perms, own=own)


def _added(content: str, *, special: bool, id: int | None = None, like: dict | None = None) -> dict:
    entry = {"id": id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": not special, "special": special}  # fmt: skip
    if like is not None:
        entry.update({k: like[k] for k in ADDED_TOKEN_KEYS if k in like})
    return entry


def _union(tokenizers: dict[str, dict | None], own: dict[str, dict[str, int]], sizes: dict[str, int], donor: str) -> list[dict]:
    """Entries to add to the base's tokenizer so that it holds every model's tokens: each
    model's ordinary tokens it lacks (as plain added tokens), then the models' added tokens
    (with their settings; the first model's win). Models in recipe order, tokens by id.

    mergekit 0.1.5 takes the same tokens in the order of a Python set of models and of a
    Rust hash map of each vocabulary, so its ids for new tokens change from run to run;
    each token's embedding is the same.
    """
    regular: dict[str, None] = {}
    special: dict[str, dict] = {}
    for ref in [donor, *[r for r in tokenizers if r != donor]]:
        tok = tokenizers[ref]
        if tok is None:
            continue
        added = {a["content"]: a for a in tok.get("added_tokens") or []}
        for token, i in sorted(own[ref].items(), key=lambda kv: kv[1]):
            if i < sizes[ref] and token not in added:
                regular.setdefault(token)
        for a in sorted(added.values(), key=lambda a: a["id"]):
            if a["id"] < sizes[ref]:
                special.setdefault(a["content"], a)
    base = own[donor]
    out = [_added(t, special=False) for t in regular if t not in special and t not in base]
    out += [_added(t, special=bool(a.get("special")), like=a) for t, a in special.items() if t not in base]
    return out


def vocab_map(ov: OutputVocab, spec: TokenizerSpec, order: list[str], index: dict[str, int], base: str | None, name: str) -> VocabMap:
    """The row map of one vocabulary tensor whose inputs come from ``order`` (mergekit's
    gather order: the slice's sources, the base last when it is not one of them)."""
    perms = {m: ov.perms[m] for m in order}
    configs = dict(spec.tokens)
    average = set()
    for token, i in ov.vocab.items():
        if token in configs:
            continue
        has = [perms[m][i] >= 0 for m in order]
        if sum(has) == 1:
            configs[token] = TokenSource(model=order[has.index(True)])
        elif not any(has):
            configs[token] = TokenSource(zero=True)
        elif base in perms and perms[base][i] >= 0:
            configs[token] = TokenSource(model=base)
        else:
            average.add(token)
    fills = []
    for token, i in ov.vocab.items():
        cfg = configs.get(token)
        force = bool(cfg is not None and cfg.force)
        if not force and all(perms[m][i] >= 0 for m in order):
            continue
        if token in average:
            sources = [[index[m], perms[m][i]] for m in order if perms[m][i] >= 0]
        elif cfg.zero:
            sources = []
        elif cfg.model is None:
            raise MergeError(f"tokenizer.tokens[{token!r}]: no source given and not every model has the token; set source")
        else:
            row = _source_row(ov, cfg, token, i, perms, name)
            sources = [[index[cfg.model], row]]
        fills.append([i, sources, force])
    copies = []
    for m in order:
        runs: list[list[int]] = []
        for i, j in enumerate(perms[m]):  # forced rows are overwritten by their fill in permute
            if j < 0:
                continue
            if runs and runs[-1][0] + runs[-1][2] == i and runs[-1][1] + runs[-1][2] == j:
                runs[-1][2] += 1
            else:
                runs.append([i, j, 1])
        copies.append([index[m], runs])
    return VocabMap(rows=ov.rows, vocab=len(ov.vocab), copies=copies, fills=fills)


def _source_row(ov: OutputVocab, cfg: TokenSource, token: str, i: int, perms: dict[str, list[int]], name: str) -> int:
    if cfg.model not in perms:
        raise MergeError(f"{name}: token {token!r} takes its row from {cfg.model!r}, which is not one of this tensor's models")
    if cfg.token_id is not None:
        return cfg.token_id
    if cfg.token is not None:
        theirs = ov.own.get(cfg.model, {})
        if cfg.token not in theirs:
            raise MergeError(f"tokenizer.tokens[{token!r}]: token {cfg.token!r} is not in {cfg.model!r}'s vocabulary")
        return theirs[cfg.token]
    if perms[cfg.model][i] < 0:
        raise MergeError(f"tokenizer.tokens[{token!r}]: {cfg.model!r} does not have this token to take its row from")
    return perms[cfg.model][i]


def is_identity(vm: VocabMap, rows: dict[int, int]) -> bool:
    """True when the map changes nothing: every model keeps all of its rows in place."""
    return not vm.fills and all(
        runs == [[0, 0, vm.rows]] and rows[m] == vm.rows for m, runs in vm.copies
    )


def permute(vm: VocabMap, tensors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each model's tensor (model index -> rows on dim 0) re-indexed to the output
    vocabulary, in the tensors' dtype (fallback rows are averaged in it, as mergekit does)."""
    first = next(iter(tensors.values()))
    rest, dtype, device = tuple(first.shape[1:]), first.dtype, first.device
    fill = {}
    for dst, sources, force in vm.fills:
        if not sources:
            value = torch.zeros(rest, dtype=dtype, device=device)
        elif len(sources) == 1:
            m, src = sources[0]
            value = tensors[m][src]
        else:
            value = torch.zeros(rest, dtype=dtype, device=device)
            for m, src in sources:
                value = value + tensors[m][src]
            value = value / len(sources)
        fill[dst] = (value, force)
    out = {}
    for m, runs in vm.copies:
        old = tensors[m]
        new = torch.zeros((vm.rows, *rest), dtype=dtype, device=device)
        have = torch.zeros(vm.rows, dtype=torch.bool)
        for dst, src, n in runs:
            new[dst : dst + n] = old[src : src + n]
            have[dst : dst + n] = True
        for dst, (value, force) in fill.items():
            if force or not have[dst]:
                new[dst] = value
        if vm.rows > vm.vocab:
            new[vm.vocab :] = torch.mean(new[: vm.vocab], dim=0)
        out[m] = new
    return out

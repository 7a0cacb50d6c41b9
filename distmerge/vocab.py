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

Everything the merge and ``finish`` will rely on is checked while planning, so that a plan
that is accepted also runs: each tokenizer.json's shape (:func:`vocabulary`), every row a
map reads against the model's embedding rows, the padding's size, and the tokenizer files
``finish`` edits (:func:`tokenizer_files` runs the same edits on the same bytes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from distmerge.architecture import is_vocab_tensor
from distmerge.errors import MergeError
from distmerge.io.header import read_small
from distmerge.recipe import TokenSource, TokenizerSpec
from distmerge.sources import MAX_JSON_BYTES, read_json

"""Tensors indexed by token id along their first axis."""
ADDED_TOKEN_KEYS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
MAX_PAD_FACTOR, MAX_PADDED_ROWS = 16, 2**24
"""``pad_to_multiple_of`` may pad the vocabulary to at most 16 times its size and 2**24 rows
(real vocabularies have 32k-256k tokens and pad to multiples of 8-128; a larger value is a typo
that would plan terabytes of embedding)."""


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
    limits: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Model -> (rows, name) of its vocabulary tensor with the fewest rows: no row map may
    read a row at or past it."""


def read_tokenizer(path: str) -> dict | None:
    """A model's ``tokenizer.json`` as data, or None when it has none.

    Anything at that name is read (a FIFO or directory there is an error, not "no tokenizer"):
    a regular UTF-8 file holding a JSON object, see ``sources.read_json``.
    """
    file = os.path.join(path, "tokenizer.json")
    if not os.path.lexists(file):
        return None
    return read_json(file, "tokenizer.json")


def vocabulary(tok: dict, file: str) -> dict[str, int]:
    """Token -> id, added tokens included: what ``get_vocab()`` of the fast tokenizer gives.

    Checks what this module reads of ``tok`` (the tokenizer.json at ``file``): ``model.vocab``
    (an object of token -> id, or a Unigram model's list of [piece, score]) and
    ``added_tokens`` (a list of objects with a string ``content`` and an ``id``); ids are
    whole numbers >= 0, tokens strings UTF-8 can write. Anything else is a MergeError naming
    the file and the entry.
    """
    fix = "re-download the tokenizer or fix the file"
    model = tok.get("model")
    if not isinstance(model, dict):
        raise MergeError(f"{file}: 'model' is {_kind(model)}, not the JSON object of a tokenizer model; {fix}")
    vocab = model.get("vocab")
    if model.get("type") == "Unigram" and isinstance(vocab, list):
        out = {}
        for i, piece in enumerate(vocab):
            if not (isinstance(piece, list) and piece and isinstance(piece[0], str)):
                raise MergeError(f"{file}: model.vocab[{i}] is {_short(piece)}, not a [piece, score] pair; {fix}")
            out[_token(piece[0], file, f"model.vocab[{i}]")] = i
    elif isinstance(vocab, dict):
        out = {}
        for token, i in vocab.items():
            out[_token(token, file, "model.vocab")] = _token_id(i, file, f"model.vocab[{_short(token)}]")
    else:
        raise MergeError(f"{file}: a {_short(model.get('type'))} model without a vocabulary distmerge can read (model.vocab is {_kind(vocab)}); {fix}")
    added = tok.get("added_tokens")
    if added is not None and not isinstance(added, list):
        raise MergeError(f"{file}: 'added_tokens' is {_kind(added)}, not a list; {fix}")
    for k, a in enumerate(added or []):
        if not isinstance(a, dict) or not isinstance(a.get("content"), str):
            raise MergeError(f"{file}: added_tokens[{k}] is {_short(a)}, not an object with a string 'content'; {fix}")
        out[_token(a["content"], file, f"added_tokens[{k}]")] = _token_id(a.get("id"), file, f"added_tokens[{k}].id")
    return out


def is_utf8(text: str) -> bool:
    """Whether UTF-8 can write ``text``: JSON and YAML allow unpaired surrogate escapes
    (``"\\ud800"``), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _token(token: str, file: str, where: str) -> str:
    if not is_utf8(token):
        raise MergeError(f"{file}: {where}: token {_short(token)} holds an unpaired surrogate (a \\ud800-\\udfff escape), which no tokenizer loads; re-download the tokenizer or fix the file") from None
    return token


def _token_id(i: object, file: str, where: str) -> int:
    if type(i) is not int or i < 0:
        raise MergeError(f"{file}: {where} is {_short(i)}, not a token id (a whole number >= 0); re-download the tokenizer or fix the file")
    return i


_JSON_KINDS = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}


def _kind(value: object) -> str:
    """What a JSON value is, for messages: "a list", "an object", or "missing" for None (absent or null)."""
    name = _JSON_KINDS.get(type(value), type(value).__name__)
    return "missing" if value is None else f"an {name}" if name == "object" else f"a {name}"


def _short(value: object, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    own = {ref: vocabulary(tok, os.path.join(checkpoints[ref].path, "tokenizer.json")) for ref, tok in tokenizers.items() if tok is not None}
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
    for token in spec.tokens:
        if not is_utf8(token):
            raise MergeError(f"tokenizer.tokens: token {_short(token)} holds an unpaired surrogate (a \\ud800-\\udfff escape), which no tokenizer loads; fix the recipe")
    rows = _padded(len(vocab), spec.pad_to_multiple_of)
    limits = {ref: lim for ref, ck in checkpoints.items() if (lim := _limit(ref, ck)) is not None}
    perms = {}
    for ref in checkpoints:
        theirs = own.get(ref, base_vocab)  # a model without a tokenizer is taken to share the base's
        row = [-1] * len(vocab)
        for token, i in vocab.items():
            j = theirs.get(token, -1)
            row[i] = j if j < sizes[ref] else -1
            if row[i] >= 0 and ref in limits and row[i] >= limits[ref][0]:
                n, name = limits[ref]
                whose = "its tokenizer" if ref in own else "the base's tokenizer (it has none of its own)"
                raise MergeError(
                    f"tokenizer: model {ref!r}: token {_short(token)} has id {row[i]} in {whose}, past the {n} rows of its "
                    f"{name}; set vocab_size to {n} in its config.json (ids from there on are then left out) or fix the checkpoint"
                )
        perms[ref] = row
    ov = OutputVocab(source=source, added=added, vocab=vocab, rows=rows, perms=perms, own=own, limits=limits)
    for token, cfg in spec.tokens.items():
        if cfg.model is not None and cfg.model in checkpoints and (cfg.token_id is not None or cfg.token is not None):
            _model_token_row(ov, cfg, token)
    return ov


def _padded(n: int, pad: int | None) -> int:
    """``n`` rows padded to a multiple of ``pad``; refuses padding past MAX_PAD_FACTOR times
    the vocabulary or MAX_PADDED_ROWS rows (mergekit 0.1.5 has no bound: it fails allocating
    the embedding in the middle of the merge)."""
    if not pad or n % pad == 0:
        return n
    rows = n + pad - n % pad
    bound = min(MAX_PAD_FACTOR * max(n, 1), MAX_PADDED_ROWS)
    if rows > bound:
        raise MergeError(
            f"tokenizer.pad_to_multiple_of {pad} would pad the {n}-token vocabulary to {rows} rows; distmerge pads "
            f"to at most {MAX_PAD_FACTOR}x the vocabulary and 2^24 rows (here {bound}): use a multiple such as 8, 64 or 128"
        )
    return rows


def _limit(ref: str, ck) -> tuple[int, str] | None:
    """(rows, name) of the model's vocabulary tensor with the fewest rows (None: it has none)."""
    found = []
    for name, info in ck.tensors.items():
        if is_vocab_tensor(name):
            if not info.shape:
                raise MergeError(f"model {ref!r}: tensor {name} is a scalar, not an embedding with a row per token; fix the checkpoint")
            found.append((info.shape[0], name))
    return min(found) if found else None


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
    if cfg.token_id is not None or cfg.token is not None:
        return _model_token_row(ov, cfg, token)
    if perms[cfg.model][i] < 0:
        raise MergeError(f"tokenizer.tokens[{token!r}]: {cfg.model!r} does not have this token to take its row from")
    return perms[cfg.model][i]


def _model_token_row(ov: OutputVocab, cfg: TokenSource, token: str) -> int:
    """The row a ``{kind: model_token}`` source names: its ``token_id``, or its ``token``'s id in
    the model's vocabulary; below the model's embedding rows (mergekit checks this only when
    it reaches the tensor, mid-merge)."""
    where = f"tokenizer.tokens[{_short(token)}].source"
    if cfg.token is not None:
        theirs = ov.own.get(cfg.model, {})
        if cfg.token not in theirs:
            raise MergeError(f"tokenizer.tokens[{token!r}]: token {cfg.token!r} is not in {cfg.model!r}'s vocabulary")
        row, what = theirs[cfg.token], f"token {_short(cfg.token)} (id {theirs[cfg.token]} in its tokenizer)"
    else:
        row, what = cfg.token_id, f"token_id {cfg.token_id}"
    if cfg.model in ov.limits and row >= ov.limits[cfg.model][0]:
        n, name = ov.limits[cfg.model]
        raise MergeError(f"{where}: {what} is past the {n} rows of {name} in model {cfg.model!r}; use an id below {n}")
    return row


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


# ---------------------------------------------------------------- the output's tokenizer files

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
"""What the output copies from the tokenizer source (the same names as ``output.TOKENIZER_FILES``)."""


def tokenizer_files(donor_dir: str, tokenizer_dir: str | None, added: list[dict], template: str | None) -> dict[str, bytes]:
    """The donor's generation config and the tokenizer source's tokenizer files, with the
    added tokens and the chat template written in: what ``output.finish`` writes, by name.

    ``build_plan`` calls this too and drops the result: any file ``finish`` would fail to
    read or edit is refused then, before the output directory exists (``finish`` checks
    first that no input changed, so it reads the same bytes).
    """
    files = read_files(donor_dir, ["generation_config.json"])
    if tokenizer_dir is not None:
        files.update(read_files(tokenizer_dir, TOKENIZER_FILES))
    add_tokens(files, added, tokenizer_dir or donor_dir)
    set_chat_template(files, template, tokenizer_dir or donor_dir)
    return files


def read_files(src_dir: str, names) -> dict[str, bytes]:
    """The bytes of each of ``names`` in ``src_dir`` that is there. Only regular files of at
    most MAX_JSON_BYTES are read; anything else at one of the names (a FIFO, a directory, a
    link to nothing, an unreadable or huge file) is a MergeError naming it."""
    found = {}
    for name in names:
        src = os.path.join(src_dir, name)
        if not os.path.lexists(src):
            continue
        if not os.path.exists(src):
            raise MergeError(f"cannot read {src}: it is a link to {os.readlink(src)}, which is missing; re-download the model or remove the link")
        try:
            found[name] = read_small(src, MAX_JSON_BYTES, "a tokenizer or config file")
        except OSError as e:
            raise MergeError(f"cannot read {src}: {e.strerror or e}; the output copies it, so fix it or remove it") from None
    return found


def add_tokens(files: dict[str, bytes], added: list[dict], where: str) -> None:
    """Append ``added`` (tokenizer.json added_tokens entries) to ``files``' tokenizer.json and
    to tokenizer_config.json's added_tokens_decoder. ``where``: the directory they came from."""
    if not added:
        return
    if "tokenizer.json" not in files:
        raise MergeError(f"{where}: no tokenizer.json to add the tokens {', '.join(_short(a['content']) for a in added[:3])} to")
    tok = _json_object(files, "tokenizer.json", where)
    old = tok.get("added_tokens")
    if old is not None and not isinstance(old, list):
        raise MergeError(f"{os.path.join(where, 'tokenizer.json')}: 'added_tokens' is {_kind(old)}, not a list; re-download the tokenizer or fix the file")
    tok["added_tokens"] = [*(old or []), *added]
    files["tokenizer.json"] = _dump(tok, "tokenizer.json", where, ensure_ascii=False)
    if "tokenizer_config.json" in files:
        config = _json_object(files, "tokenizer_config.json", where)
        decoder = config.get("added_tokens_decoder")
        if decoder is None:
            decoder = config["added_tokens_decoder"] = {}
        if not isinstance(decoder, dict):
            raise MergeError(
                f"{os.path.join(where, 'tokenizer_config.json')}: 'added_tokens_decoder' is {_kind(decoder)}, not the object "
                "of id -> token the added tokens go into; re-download the tokenizer or fix the file"
            )
        for entry in added:
            decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
        files["tokenizer_config.json"] = _dump(config, "tokenizer_config.json", where, ensure_ascii=False)


def set_chat_template(files: dict[str, bytes], template: str | None, where: str) -> None:
    """Write ``template`` where transformers looks for it: chat_template.jinja (which takes
    precedence when present) and tokenizer_config.json (made when ``files`` has none)."""
    if not template:
        return
    files["chat_template.jinja"] = _dump(template, "chat_template.jinja", where)
    config = _json_object(files, "tokenizer_config.json", where) if "tokenizer_config.json" in files else {}
    config["chat_template"] = template
    files["tokenizer_config.json"] = _dump(config, "tokenizer_config.json", where)


def _json_object(files: dict[str, bytes], name: str, where: str) -> dict:
    """``files[name]`` parsed as ``sources.read_json`` parses a file (UTF-8, BOM allowed, a JSON object)."""
    path, fix = os.path.join(where, name), "re-download the tokenizer or fix the file"
    try:
        value = json.loads(files[name].decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: not UTF-8 text (byte 0x{files[name][e.start]:02x} at offset {e.start}); {fix}") from None
    except RecursionError:
        raise MergeError(f"{path}: its JSON is nested too deeply; {fix}") from None
    except ValueError as e:
        raise MergeError(f"{path}: invalid JSON ({' '.join(str(e).split())}); {fix}") from None
    if not isinstance(value, dict):
        raise MergeError(f"{path}: holds a JSON {_JSON_KINDS.get(type(value))}, not the JSON object distmerge edits (added tokens, chat template); {fix}")
    return value


def _dump(value: dict | str, name: str, where: str, **json_options) -> bytes:
    """``value`` as UTF-8 (a dict as indented JSON), or a MergeError when it holds an
    unpaired surrogate UTF-8 cannot write."""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, **json_options)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise MergeError(
            f"{os.path.join(where, name)}: the output's {name} would hold an unpaired surrogate (a \\ud800-\\udfff escape), "
            "which UTF-8 cannot write; fix the file (or the recipe's chat_template)"
        ) from None

"""Merge recipes in mergekit's YAML format: parse, check, and resolve parameters.

A recipe names a ``merge_method`` and either ``models`` (whole models merged layer by
layer) or ``slices`` (layer ranges of models, stacked). Parameters are set at the top
level, per slice, or per model, and each setting is a scalar, a gradient (a list
interpolated over the layer stack) or a list of ``{filter, value}`` entries matched
against tensor names. The semantics follow mergekit 0.1.5 (config.py, parameter_resolver.py).

What mergekit accepts is accepted, or refused here with one reason: ``modules:`` with the one
module ``default`` (the form mergekit writes into model cards) is the same recipe without it;
``modules:`` naming a multimodal model's modules (``text_decoder``, ``vision_tower``,
``multi_modal_projector``) gives each its own models or slices and parameters under the one
merge_method (``Recipe.modules``; the planner checks the names against the checkpoints);
booleans are read as mergekit reads them (``1.0``, ``0``, ``"yes"``); keys mergekit ignores
(NO_EFFECT) are warnings in ``Recipe.warnings``; close misspellings get a "did you mean".

A file of several YAML documents is a multi-stage recipe in mergekit-multi's format: each
document may have a ``name``, which later documents use as a model (``distmerge.graph``
plans them as one graph). ``sweep:`` (distmerge's own) makes one recipe stand for several
variants that differ in top-level parameters.

Reading is bounded (see ``distmerge.safe_yaml``): nesting, alias expansion and integers are capped, so
a hostile recipe is one MergeError, never a hang or a RecursionError in the functions below.
"""

from __future__ import annotations

import difflib
import math
import os
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distmerge import methods
from distmerge.errors import MergeError
from distmerge.safe_yaml import load_yaml_documents
from distmerge.io.header import read_small
from distmerge.lines import Lines
from distmerge.lines import parse as parse_lines
from distmerge.templates import check_setting

TOP_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "modules", "sweep", "lines",
}  # fmt: skip
MODULE_KEYS = {"models", "slices", "parameters"}
"""Keys of a ``modules:`` entry (mergekit's OutputModuleDefinition)."""
NO_EFFECT = {
    "model_name": "mergekit ignores it too",
    "residual_weight": "mergekit reads it and never uses it",
}
"""Keys that mergekit accepts and ignores: accepted with a warning, never refused. ``model_name``
at the top level, in the module, model entries, slices and their sources (mergekit ignores
unknown keys everywhere); ``residual_weight`` on slices, where mergekit declares it."""
DTYPES = {"float32", "float16", "bfloat16", "float64"}
OUT_DTYPES = DTYPES | {"fp8"}
"""``out_dtype`` may also be fp8: the tensors that are block-scaled fp8 in the inputs are
re-quantized to that block layout (``distmerge.io.quantized``), the others written in bf16."""
DTYPE_ALIASES = {
    "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32",
    **{f"torch.{name}": name for name in DTYPES},  # mergekit strips a "torch." prefix
}  # fmt: skip
TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})
"""Strings a boolean parameter accepts, in any case: the words mergekit's validation
(pydantic's lax bool) accepts. Unquoted yes/no/on/off are booleans in YAML already."""
MAX_RECIPE_BYTES = 16 * 2**20
"""A recipe is a few KB of YAML; a larger file is the wrong file."""

Setting = Any
"""A parameter setting as written: scalar, list of scalars, {filter, value} or a list of those."""


@dataclass(frozen=True, slots=True)
class InputModel:
    """One input model of a slice (or of a ``models`` recipe, where layer_range is None): a
    recipe entry, not yet found on disk (``distmerge.sources`` finds and reads it)."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Slice:
    """One output slice: its sources are merged layer by layer into consecutive output layers."""

    sources: tuple[InputModel, ...]
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where one token's embedding row comes from (a ``tokenizer: tokens:`` entry)."""

    model: str | None = None
    """Take the row from this model: its row for this token, or for ``token_id``/``token``."""
    token_id: int | None = None
    token: str | None = None
    zero: bool = False
    """``{kind: zero}``: a row of zeros."""
    force: bool = False
    """Use this source even for models that have the token."""


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """The output vocabulary: ``tokenizer_source: X`` or a ``tokenizer:`` block."""

    source: str
    """``union``, ``base``, or a model of the recipe."""
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True, slots=True)
class Module:
    """One entry of ``modules:`` (mergekit's OutputModuleDefinition): the models or slices that
    make one module of a multimodal model, over that module's own layers."""

    name: str
    """mergekit's module name: ``text_decoder``, ``vision_tower`` (``vision_model`` for Llama 4),
    ``multi_modal_projector`` (see ``distmerge.architecture.module_of``)."""
    models: tuple[InputModel, ...] | None
    slices: tuple[Slice, ...] | None
    parameters: dict[str, Setting] = field(default_factory=dict)
    """Ranked between the slices' and the recipe's top level, as mergekit ranks them."""


@dataclass(frozen=True, slots=True)
class Recipe:
    merge_method: str
    base_model: str | None
    models: tuple[InputModel, ...] | None
    """The ``models:`` form; None for a ``slices:`` recipe."""
    slices: tuple[Slice, ...] | None
    parameters: dict[str, Setting]
    dtype: str | None
    out_dtype: str | None
    tokenizer: TokenizerSpec | None
    """None: keep the donor's tokenizer and merge embeddings as they are."""
    chat_template: str | None
    name: str | None
    """A stage's name in a multi-document recipe (mergekit-multi): later documents name it as a model."""
    base_dir: str = "."
    """Directory of the recipe file; relative model paths are looked up there first."""
    warnings: tuple[str, ...] = ()
    """One line per accepted setting that has no effect (``distmerge plan`` and ``run`` print
    each as ``warning: ...``); not part of the plan."""
    sweep: tuple[tuple[str, tuple[Setting, ...]], ...] = ()
    """``sweep:``: top-level parameters and the values each takes; the recipe stands for one
    variant per combination (``sweep_variants``), all written from one read of the inputs."""
    text: str = field(default="", compare=False)
    """The document as written (a stage's own recipe, kept with its output)."""
    lines: Lines | None = None
    """``lines: {alpha, beta}``: LiNeS layer scaling of the merge's update (``distmerge.lines``)."""
    modules: tuple[Module, ...] = ()
    """``modules:`` with named modules (a multimodal model's); ``models`` and ``slices`` are then
    None. Empty otherwise (``modules: {default: ...}`` is read as the recipe without it)."""

    @property
    def method(self) -> methods.Method:
        return methods.get(self.merge_method)

    def model_refs(self) -> list[str]:
        """Every model the recipe names, each once, in order of first mention (base first)."""
        refs = [self.base_model] if self.base_model else []
        for part in (self, *self.modules):
            for src in part.models or ():
                refs.append(src.model)
            for s in part.slices or ():
                refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    def module_recipe(self, module: Module) -> "Recipe":
        """The recipe one module is planned with: its models or slices, and its parameters
        ranked before the top level's (a module's setting applies first; the top level's
        where the module's filters match nothing)."""
        return dataclasses.replace(self, models=module.models, slices=module.slices, modules=(), parameters=_ranked(module.parameters, self.parameters))

    @property
    def donor(self) -> str:
        """The model whose config and tokenizer the output starts from: the base model, else
        the first model of the recipe (mergekit picks an arbitrary one; we pick a fixed one)."""
        return self.base_model or self.model_refs()[0]


def load_recipe(path: str) -> Recipe:
    """The recipe of a one-document recipe file (see ``load_recipes``)."""
    return _one(load_recipes(path), path)


def load_recipes(path: str) -> list[Recipe]:
    """Read and check a recipe file, one Recipe per YAML document: a regular file (a FIFO is
    never opened for a blocking read) of UTF-8 text, at most MAX_RECIPE_BYTES. Raises
    MergeError with the line for YAML errors."""
    try:
        raw = read_small(path, MAX_RECIPE_BYTES, "a recipe")
    except OSError as e:
        raise MergeError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise MergeError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save the recipe as UTF-8"
        ) from None
    return parse_recipes(text, base_dir=os.path.dirname(os.path.abspath(path)), source=path)


def recipe_warnings(path: str) -> tuple[str, ...]:
    """The warnings of the recipe at ``path``; none when it cannot be read (the plan, made
    next, reports why, agreed across ranks)."""
    try:
        return tuple(w for r in load_recipes(path) for w in r.warnings)
    except MergeError:
        return ()


def parse_recipe(text: str, base_dir: str = ".", source: str = "recipe") -> Recipe:
    """The recipe of one-document recipe text (see ``parse_recipes``)."""
    return _one(parse_recipes(text, base_dir, source), source)


def _one(recipes: list[Recipe], source: str) -> Recipe:
    if len(recipes) > 1:
        raise MergeError(f"{source}: this is a multi-stage recipe (mergekit-multi) with {len(recipes)} documents; `distmerge run` and `plan` take it")
    return recipes[0]


def parse_recipes(text: str, base_dir: str = ".", source: str = "recipe") -> list[Recipe]:
    """One Recipe per YAML document. Several documents are a multi-stage recipe (mergekit-multi):
    each may have a ``name``, which later documents use as a model; at most one has none, and
    names are unique. Messages name the document (``r.yml (document 2, 'a')``)."""
    docs = [d for d in load_yaml_documents(text, source) if d is not None]
    if len(docs) <= 1:
        return [_parse_document(docs[0] if docs else None, base_dir, source, text)]
    recipes = []
    for i, doc in enumerate(docs):
        name = doc.get("name") if isinstance(doc, dict) else None
        where = f"{source} (document {i + 1}" + (f", {_cut(name)!r})" if isinstance(name, str) else ")")
        recipes.append(_parse_document(doc, base_dir, where, yaml_text(doc)))
    names = [r.name for r in recipes]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise MergeError(f"{source}: two documents are named {_cut(twice)!r}; give each stage its own name")
    if names.count(None) > 1:
        raise MergeError(f"{source}: {names.count(None)} documents have no name; in a multi-stage recipe only the final one may be unnamed")
    return recipes


def yaml_text(doc: Any) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _parse_document(doc: Any, base_dir: str, source: str, text: str) -> Recipe:
    if not isinstance(doc, dict):
        raise MergeError(f"{source}: a recipe is a YAML mapping with at least merge_method and models or slices")
    notes: list[str] = []
    doc = _drop_no_effect(doc, ("model_name",), "", source, notes)
    _no_unknown(doc, TOP_KEYS, "", source)
    if doc.get("tokenizer") is not None and doc.get("tokenizer_source") is not None:
        raise MergeError(f"{source}: give either tokenizer_source or a tokenizer: block, not both")

    name = doc.get("merge_method")
    if not isinstance(name, str) or name not in methods.METHODS:
        raise MergeError(
            f"{source}: unknown merge_method {_short(name)}{_hint(name, methods.METHODS)}"
            f"valid methods are {', '.join(sorted(methods.METHODS))}"
        )
    if sum(bool(doc.get(k)) for k in ("models", "slices", "modules")) != 1:
        raise MergeError(f"{source}: a recipe needs exactly one of 'models', 'slices' or 'modules' (non-empty)")
    at = ""  # where the models or slices are written
    modules: tuple[Module, ...] = ()
    if doc.get("modules") and _is_default_only(doc["modules"], source):
        doc, at = _single_module(doc, methods.get(name), source, notes), "modules.default."
    elif doc.get("modules"):
        modules = tuple(_module(key, entry, source, notes) for key, entry in doc["modules"].items())

    recipe = Recipe(
        merge_method=name,
        base_model=_model(doc.get("base_model"), "base_model", source, optional=True),
        models=tuple(_source(m, f"{at}models[{i}]", source, False, notes) for i, m in enumerate(_list(doc, "models", source))) or None,
        slices=tuple(_slice(s, f"{at}slices[{i}]", source, notes) for i, s in enumerate(_list(doc, "slices", source))) or None,
        parameters=_params(doc.get("parameters"), "parameters", source),
        dtype=_dtype(doc.get("dtype"), "dtype", source),
        out_dtype=_dtype(doc.get("out_dtype"), "out_dtype", source, OUT_DTYPES),
        tokenizer=_tokenizer(doc, source),
        chat_template=_chat_template(doc.get("chat_template"), source),
        name=_text(doc.get("name"), "name", source),
        base_dir=base_dir,
        warnings=tuple(notes),
        sweep=_sweep(doc.get("sweep"), source),
        text=text,
        lines=parse_lines(doc.get("lines"), source, methods.get(name)),
        modules=modules,
    )
    _check_parameters(recipe, source, at)
    _check_base(recipe, source)
    _check_sweep(recipe, source, at)
    return recipe


def _sweep(value: Any, source: str) -> tuple[tuple[str, tuple[Setting, ...]], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not value:
        raise MergeError(f"{source}: sweep must map parameter names to lists of values, e.g. sweep: {{density: [0.3, 0.5]}}")
    for key, values in value.items():
        if not isinstance(values, list) or not values:
            raise MergeError(f"{source}: sweep.{key if isinstance(key, str) else _short(key)} must be a non-empty list of values, got {_short(values)}")
    return tuple((key, tuple(values)) for key, values in value.items())


def _check_sweep(recipe: Recipe, source: str, at: str) -> None:
    """Each swept parameter is the method's, each value a valid setting, and no model, slice
    or source sets it itself (the sweep, which sets the top-level value, would not reach it)."""
    for key, values in recipe.sweep:
        for value in values:
            _check_block(recipe.method, {key: value}, "sweep", source)
        for where, block in _all_parameter_blocks(recipe, at):
            if key in block and where != "parameters":
                raise MergeError(
                    f"{source}: sweep.{key}: {where} sets {key} too, which would override every swept value there; "
                    f"remove it from {where} (the sweep sets the top-level parameters.{key})"
                )
    names = [name for name, _ in sweep_variants(recipe)]
    if len(set(names)) < len(names):
        raise MergeError(f"{source}: sweep: two variants would have the same name {names[0]!r}; give different values")


def sweep_variants(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """(name, recipe) of every combination of the swept values, in order (the last parameter
    varying fastest); the name is ``density-0.3_weight-1`` (a gradient's values joined by ``~``)."""
    import itertools
    import re

    def word(value: Setting) -> str:
        text = "~".join(map(str, value)) if isinstance(value, list) else str(value)
        return re.sub(r"[^A-Za-z0-9.+~-]", "", text)

    keys = [key for key, _ in recipe.sweep]
    out = []
    for combo in itertools.product(*(values for _, values in recipe.sweep)):
        name = "_".join(f"{k}-{word(v)}" for k, v in zip(keys, combo))
        params = {**recipe.parameters, **dict(zip(keys, combo))}
        out.append((name, dataclasses.replace(recipe, parameters=params, sweep=(), name=name, text=_variant_text(recipe.text, params))))
    return out


def _variant_text(text: str, parameters: dict) -> str:
    """A sweep variant's own recipe: the document without ``sweep``, with its parameters."""
    docs = [d for d in load_yaml_documents(text) if isinstance(d, dict) and "sweep" in d]
    if len(docs) != 1:
        return text
    doc = {k: v for k, v in docs[0].items() if k != "sweep"}
    doc["parameters"] = {**(doc.get("parameters") or {}), **parameters}
    return yaml_text(doc)


def _is_default_only(modules: Any, source: str) -> bool:
    if not isinstance(modules, dict) or not modules:
        raise MergeError(f"{source}: modules must be a mapping of module names to {{models or slices, parameters}}")
    return list(modules) == ["default"]


MODULE_NOT_HERE = {
    "merge_method": "mergekit has one merge_method per recipe (its modules have none, and it ignores this key)",
    "base_model": "mergekit has no base_model per module (it ignores this key); set base_model at the top level or per slice",
}


def _module(key: Any, entry: Any, source: str, notes: list[str]) -> Module:
    """One named module of ``modules:``: models or slices, and parameters. Keys mergekit
    ignores in a module but a person means (merge_method, base_model) are refused: a recipe
    that seems to merge a module differently must not be merged as if it did not."""
    if not isinstance(key, str) or not key:
        raise MergeError(f"{source}: modules: module names are text such as text_decoder, vision_tower, multi_modal_projector; got {_short(key)}")
    where = f"modules.{key}"
    if not isinstance(entry, dict):
        raise MergeError(f"{source}: {where} must be a mapping with models or slices, and parameters")
    entry = _drop_no_effect(entry, ("model_name",), where, source, notes)
    for bad, why in MODULE_NOT_HERE.items():
        if bad in entry:
            raise MergeError(f"{source}: {where}.{bad}: {why}; remove it from the module")
    _no_unknown(entry, MODULE_KEYS, where, source)
    if bool(entry.get("models")) == bool(entry.get("slices")):
        raise MergeError(f"{source}: {where} needs exactly one of 'models' or 'slices' (non-empty)")
    return Module(
        name=key,
        models=tuple(_source(m, f"{where}.models[{i}]", source, False, notes) for i, m in enumerate(_list(entry, "models", source))) or None,
        slices=tuple(_slice(s, f"{where}.slices[{i}]", source, notes) for i, s in enumerate(_list(entry, "slices", source))) or None,
        parameters=_params(entry.get("parameters"), f"{where}.parameters", source),
    )


def _ranked(first: dict[str, Setting], then: dict[str, Setting]) -> dict[str, Setting]:
    """One parameter block that gives ``first``'s setting where it has one (a filter that
    matches), else ``then``'s: mergekit's module-over-top-level precedence."""
    out = dict(then)
    for key, setting in first.items():
        out[key] = _as_filters(setting) + _as_filters(then[key]) if key in then else setting
    return out


def _single_module(doc: dict, method: methods.Method, source: str, notes: list[str]) -> dict:
    """A ``modules:`` recipe as the same recipe written without it, when it has the one module
    ``default``: the form mergekit writes into model cards for a language model. That module's
    ``models`` or ``slices`` move to the top level; its ``parameters`` rank between the slices'
    and the top level's, as in mergekit, so a setting it makes comes first and the top level's
    applies where the module's filters match nothing."""
    where = "modules.default"
    module = doc["modules"]["default"]
    if not isinstance(module, dict):
        raise MergeError(f"{source}: {where} must be a mapping with models or slices, and parameters")
    module = _drop_no_effect(module, ("model_name",), where, source, notes)
    _no_unknown(module, MODULE_KEYS, where, source)
    if bool(module.get("models")) == bool(module.get("slices")):
        raise MergeError(f"{source}: {where} needs exactly one of 'models' or 'slices' (non-empty)")
    params = _params(module.get("parameters"), f"{where}.parameters", source)
    _check_block(method, params, f"{where}.parameters", source)
    top = _ranked(params, _params(doc.get("parameters"), "parameters", source))
    out = {k: v for k, v in doc.items() if k != "modules"}
    kind = "models" if module.get("models") else "slices"
    out[kind] = module[kind]
    if top:
        out["parameters"] = top
    return out


def _as_filters(setting: Setting) -> list:
    """A setting as a list of {filter, value} entries that evaluates to the same values."""
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and all(isinstance(v, dict) for v in setting):
        return list(setting)
    return [{"value": setting}]


def _drop_no_effect(entry: dict, keys: tuple[str, ...], where: str, source: str, notes: list[str]) -> dict:
    """``entry`` without those of ``keys`` (see NO_EFFECT) that it has, each noted as a warning."""
    found = [k for k in keys if k in entry]
    for key in found:
        notes.append(
            f"{source}: {where + '.' if where else ''}{key} has no effect ({NO_EFFECT[key]}); remove it to silence this warning"
        )
    return {k: v for k, v in entry.items() if k not in found} if found else entry


def _hint(word: Any, choices) -> str:
    """The join before a list of valid choices: "; did you mean 'X'? " when ``word`` is close
    to one of them (difflib, ignoring case), else "; "."""
    if isinstance(word, str) and len(word) <= 100:
        by_lower = {c.lower(): c for c in choices if isinstance(c, str)}
        close = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
        if close:
            return f"; did you mean {by_lower[close[0]]!r}? "
    return "; "


def _cut(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: Any, where: str, source: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise MergeError(f"{source}: {where} must be text, got {_short(value)}")
    return value


def _chat_template(value: Any, source: str) -> str | None:
    value = _text(value, "chat_template", source)
    if value is not None and (problem := check_setting(value)):
        raise MergeError(f"{source}: {problem}")
    return value


def _list(doc: dict, key: str, source: str) -> list:
    value = doc.get(key) or []
    if not isinstance(value, list):
        raise MergeError(f"{source}: '{key}' must be a list")
    return value


def _model(value: Any, where: str, source: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, dict):
        value = _model_mapping(value, where, source)
    if not isinstance(value, str) or not value.strip():
        raise MergeError(f"{source}: {where} must be a model path or hub id, got {_short(value)}")
    return value


def _model_mapping(value: dict, where: str, source: str) -> str:
    """mergekit's long form of a model reference, ``{model: PATH | {path, revision}, lora:
    PATH | {path, revision}}``, as its short form ``path@revision+lora@revision``."""
    _no_unknown(value, {"model", "lora", "override_architecture"}, where, source)
    if value.get("override_architecture") is not None:
        raise MergeError(
            f"{source}: {where}.override_architecture is not supported yet; distmerge merges models as the "
            "architecture their config.json names: remove it, or edit architectures in a copy of the model's config.json"
        )
    parts = []
    for key in ("model", "lora"):
        path = value.get(key)
        if isinstance(path, dict):
            _no_unknown(path, {"path", "revision"}, f"{where}.{key}", source)
            path, revision = path.get("path"), path.get("revision")
            if isinstance(path, str) and revision is not None:
                path = f"{path}@{_text(revision, f'{where}.{key}.revision', source)}"
        if path is None and key == "lora":
            continue
        if not isinstance(path, str) or not path.strip():
            raise MergeError(f"{source}: {where}.{key} must be a model path or hub id, got {_short(path)}")
        parts.append(path)
    return "+".join(parts)


def _tokenizer(doc: dict, source: str) -> TokenizerSpec | None:
    """``tokenizer_source: X``, or a ``tokenizer:`` block (whose source defaults to union,
    as in mergekit)."""
    if doc.get("tokenizer_source") is not None:
        return TokenizerSpec(source=_model(doc["tokenizer_source"], "tokenizer_source", source))
    block = doc.get("tokenizer")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise MergeError(f"{source}: tokenizer must be a mapping with source, tokens, pad_to_multiple_of")
    _no_unknown(block, {"source", "tokens", "pad_to_multiple_of"}, "tokenizer", source)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad < 1):
        raise MergeError(f"{source}: tokenizer.pad_to_multiple_of must be a positive integer, got {_short(pad)}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise MergeError(f"{source}: tokenizer.tokens must map tokens to {{source, force}}")
    return TokenizerSpec(
        source=_model(block.get("source", "union"), "tokenizer.source", source),
        tokens={str(tok): _token_source(cfg, f"tokenizer.tokens[{_short(tok)}]", source) for tok, cfg in tokens.items()},
        pad_to_multiple_of=pad,
    )


def _token_source(cfg: Any, where: str, source: str) -> TokenSource:
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise MergeError(f"{source}: {where} must be a mapping with source and/or force")
    _no_unknown(cfg, {"source", "force"}, where, source)
    try:
        force = as_bool(cfg.get("force", False))
    except ValueError:
        raise MergeError(f"{source}: {where}.force must be true or false, got {_short(cfg['force'])}") from None
    src = cfg.get("source")
    if src is None:
        return TokenSource(force=force)
    if isinstance(src, str):
        return TokenSource(model=_model(src, f"{where}.source", source), force=force)
    if not isinstance(src, dict) or src.get("kind") not in ("zero", "model_token"):
        raise MergeError(
            f"{source}: {where}.source must be a model, {{kind: zero}} or {{kind: model_token, model, token_id | token}}"
        )
    if src["kind"] == "zero":
        _no_unknown(src, {"kind"}, f"{where}.source", source)
        return TokenSource(zero=True, force=force)
    _no_unknown(src, {"kind", "model", "token_id", "token"}, f"{where}.source", source)
    token_id, token = src.get("token_id"), src.get("token")
    if (token_id is None) == (token is None):
        raise MergeError(f"{source}: {where}.source: give exactly one of token_id or token")
    if token_id is not None and (type(token_id) is not int or token_id < 0):
        raise MergeError(f"{source}: {where}.source.token_id must be a non-negative integer, got {_short(token_id)}")
    model = _model(src.get("model"), f"{where}.source.model", source)
    return TokenSource(model=model, token_id=token_id, token=None if token is None else str(token), force=force)


def _no_unknown(entry: dict, allowed: set[str], where: str, source: str) -> None:
    unknown = sorted(set(entry) - allowed, key=str)
    if unknown:
        place = f"{where}: " if where else ""
        raise MergeError(
            f"{source}: {place}unknown key {_short(unknown[0])}{_hint(unknown[0], allowed)}valid keys are {', '.join(sorted(allowed))}"
        )


def _source(entry: Any, where: str, source: str, sliced: bool, notes: list[str]) -> InputModel:
    if isinstance(entry, str) and not sliced:
        return InputModel(model=entry)
    if not isinstance(entry, dict):
        raise MergeError(f"{source}: {where} must be a mapping with 'model'")
    entry = _drop_no_effect(entry, ("model_name",), where, source, notes)
    _no_unknown(entry, {"model", "parameters"} | ({"layer_range"} if sliced else set()), where, source)
    layer_range = None
    if sliced:
        lr = entry.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int for x in lr)):
            raise MergeError(f"{source}: {where}.layer_range must be [start, end] (integers), got {_short(lr)}")
        if not 0 <= lr[0] < lr[1]:
            raise MergeError(
                f"{source}: {where}.layer_range {lr} is empty or reversed; it is [start, end) with 0 <= start < end"
            )
        layer_range = (lr[0], lr[1])
    return InputModel(
        model=_model(entry.get("model"), f"{where}.model", source),
        layer_range=layer_range,
        parameters=_params(entry.get("parameters"), f"{where}.parameters", source),
    )


def _slice(entry: Any, where: str, source: str, notes: list[str]) -> Slice:
    if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
        raise MergeError(f"{source}: {where} must be a mapping with a non-empty 'sources' list")
    entry = _drop_no_effect(entry, ("residual_weight", "model_name"), where, source, notes)
    _no_unknown(entry, {"sources", "base_model", "parameters"}, where, source)
    sources = tuple(_source(s, f"{where}.sources[{i}]", source, True, notes) for i, s in enumerate(entry["sources"]))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        raise MergeError(f"{source}: {where}: every source of a slice must span the same number of layers, got {sorted(lengths)}")
    return Slice(
        sources=sources,
        base_model=_model(entry.get("base_model"), f"{where}.base_model", source, optional=True),
        parameters=_params(entry.get("parameters"), f"{where}.parameters", source),
    )


def _params(value: Any, where: str, source: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeError(f"{source}: {where} must be a mapping of parameter names to values")
    for key, setting in value.items():
        _check_setting_shape(setting, f"{where}.{key}", source)
    return dict(value)


def _check_setting_shape(setting: Setting, where: str, source: str) -> None:
    scalar = (bool, int, float, str)
    if isinstance(setting, scalar) or setting is None:
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and all(isinstance(v, scalar) for v in setting):
        return
    if isinstance(setting, list) and all(isinstance(v, dict) for v in setting):
        for cond in setting:
            unknown = sorted(set(cond) - {"filter", "value"}, key=str)
            if unknown or "value" not in cond:
                raise MergeError(f"{source}: {where}: each entry is {{filter: NAME-PART, value: V}}, got {_short(cond)}")
            _check_setting_shape(cond["value"], where, source)
        return
    raise MergeError(f"{source}: {where}: expected a number, a list of numbers (gradient) or filter entries, got {_short(setting)}")


def _dtype(value: Any, where: str, source: str, allowed: set[str] = DTYPES) -> str | None:
    if value is None:
        return None
    name = DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
    if not isinstance(name, str) or name not in allowed:
        raise MergeError(f"{source}: {where} {_short(value)} is not one of {', '.join(sorted(allowed))}")
    return name


def _all_parameter_blocks(recipe: Recipe, at: str = ""):
    yield "parameters", recipe.parameters
    for part, at in ((recipe, at), *((m, f"modules.{m.name}.") for m in recipe.modules)):
        if part is not recipe:
            yield f"{at}parameters", part.parameters
        for i, m in enumerate(part.models or ()):
            yield f"{at}models[{i}].parameters", m.parameters
        for i, s in enumerate(part.slices or ()):
            yield f"{at}slices[{i}].parameters", s.parameters
            for j, src in enumerate(s.sources):
                yield f"{at}slices[{i}].sources[{j}].parameters", src.parameters


def _check_parameters(recipe: Recipe, source: str, at: str = "") -> None:
    """Every parameter block's names and values; ``at`` prefixes the places of the models and
    slices (``modules.default.``) in messages."""
    for where, block in _all_parameter_blocks(recipe, at):
        _check_block(recipe.method, block, where, source)


def _check_block(method: methods.Method, block: dict[str, Setting], where: str, source: str) -> None:
    for key, setting in block.items():
        param = method.param_index.get(key)
        if param is None:
            valid = ", ".join(p.name for p in method.params) or "none"
            hint = _hint(key, method.param_index)
            raise MergeError(f"{source}: {where}: {method.name} has no parameter {_short(key)}{hint}its parameters are: {valid}")
        for value in _leaf_values(setting):
            convert(param, value, f"{source}: {where}.{key}")


def _leaf_values(setting: Setting):
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        for v in setting:
            yield from _leaf_values(v["value"]) if isinstance(v, dict) else [v]
    else:
        yield setting


def _check_base(recipe: Recipe, source: str) -> None:
    method = recipe.method
    parts = recipe.modules or (recipe,)
    every_slice_has_one = all(part.slices and all(s.base_model for s in part.slices) for part in parts)
    if method.base == "required" and not recipe.base_model and not every_slice_has_one:
        raise MergeError(f"{source}: merge_method {method.name} needs a base_model (the model the others were fine-tuned from)")


def convert(param: methods.Param, value: Any, where: str) -> Any:
    """A recipe value as the parameter's type, checked; MergeError naming ``where`` if not."""
    if value is None and not param.required and param.default is None:
        return None
    try:
        if param.type is bool:
            out = as_bool(value)
        elif param.type in (int, float):
            if isinstance(value, bool):
                raise ValueError
            out = param.type(value)  # numbers, and strings like "1e-3" (YAML 1.1 reads those as text)
            if param.type is int and out != float(value):
                raise ValueError
        else:
            out = param.type(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400), int(inf)
        expected = "a boolean (true or false, 1 or 0, yes or no, on or off)" if param.type is bool else param.type.__name__
        raise MergeError(f"{where}: expected {expected}, got {_short(value)}") from None
    if param.type is float and not math.isfinite(out):
        raise MergeError(f"{where}: {_short(value)} is not a finite number; give a number like 0.5")
    if param.check and (problem := param.check(out)):
        raise MergeError(f"{where} {problem}")
    return out


def as_bool(value: Any) -> bool:
    """A recipe's boolean as mergekit's validation reads one (pydantic's lax bool, measured on
    0.1.5): true or false, the numbers 1 and 0 (also 1.0 and 0.0), or one of TRUE_WORDS and
    FALSE_WORDS in any case; ValueError for anything else (2, 0.5, "", " true", null)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return value == 1
    if isinstance(value, str) and (word := value.lower()) in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"not a boolean: {value!r}")


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def evaluate(setting: Setting, tensor_name: str, t: float, param: methods.Param, where: str) -> Any:
    """The value a setting gives for one tensor at relative depth ``t``, or None if no filter matches.

    - a scalar is itself;
    - a list of scalars is a gradient: piecewise-linear at s = t·(n−1) for numbers, the
      value at index ⌊s⌋ for booleans and strings;
    - filter entries are tried in order; the first whose ``filter`` is a substring of the
      tensor name (or is missing or ``*``) gives the value.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return convert(param, setting, where)
    if not setting:
        return None
    if not all(isinstance(v, dict) for v in setting):
        values = [convert(param, v, where) for v in setting]
        s = t * (len(values) - 1)
        i = int(s)
        if param.type not in (int, float):
            return values[i]
        j, frac = min(len(values) - 1, i + 1), s - i
        return convert(param, (1 - frac) * values[i] + frac * values[j], where)
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(cond["value"], tensor_name, t, param, where)
    return None

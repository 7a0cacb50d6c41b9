"""The plan: every output tensor, where its inputs are, how it is merged, and which file it goes to.

A plan is plain data, a pure function of the recipe, the checkpoints' headers and the
options. Every rank computes it independently and gets the same plan (checked through
its fingerprint); ``distmerge plan`` prints it and ``distmerge run`` executes it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from distmerge import __version__, methods, templates
from distmerge.architecture import (
    ENCODER_LAYER_LISTS, TEXT_LAYER_INDEX_LISTS, TEXT_MODULE, LayerName, after_encoder_layers, comes_before_layers, is_vocab_tensor, layer_stacks, module_names,
    layer_count, layer_lists, moe_rule, module_of, set_layer_count, split_layer_name, stack_layer_name, text_section,
)
from distmerge.errors import MergeError
from distmerge.io import quantized
from distmerge.io.header import DTYPE_NAMES, DTYPES, build_header, itemsize
from distmerge.recipe import InputModel, Recipe, Slice, evaluate
from distmerge.sources import Checkpoint, load_checkpoint
from distmerge.vocab import OutputVocab, VocabMap, build_vocab, is_identity, tokenizer_files, vocab_map

PLAN_VERSION = 1
DEFAULT_SHARD_BYTES = 5 * 10**9
TORCH_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(slots=True)
class ModelInfo:
    ref: str
    """As the recipe names it."""
    path: str
    """Local directory (machine-specific: not part of the fingerprint)."""
    num_layers: int | None
    adapter_path: str | None = None
    """Local directory of the LoRA adapter of a ``model+adapter`` reference (machine-specific)."""
    stage: bool = False
    """An earlier stage of a multi-stage recipe (its plan is ``Plan.stages[ref]``): its tensors
    are computed in the same pass, never read from disk; ``path`` holds its config and tokenizer."""


@dataclass(slots=True)
class InputRef:
    """One input tensor: model (index into Plan.models), name and byte range in its file."""

    model: int
    name: str
    file: str
    dtype: str
    begin: int
    end: int
    lora: dict | None = None
    """For ``model+adapter`` references: the adapter's A and B (file, dtype, shape, begin,
    end, in the adapter directory) and the scale s, applied as W + s·B·A while reading."""
    quant: dict | None = None
    """For a quantized tensor (``distmerge.io.quantized``): dequantized to float32 while read;
    ``dtype`` is then F32 and ``file``/``begin``/``end`` are its data's."""

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(slots=True)
class OutputTensor:
    name: str
    shape: list[int]
    dtype: str
    """Output dtype, safetensors spelling."""
    inputs: list[InputRef]
    """Non-base inputs in recipe order (all inputs for methods that ignore the base)."""
    base: InputRef | None
    params: dict[str, Any]
    """Shared parameters, resolved for this tensor."""
    input_params: dict[str, list[Any]]
    """Per-input parameters, aligned with ``inputs``."""
    seeds: list[int] | None = None
    """Random keys, aligned with ``inputs``, for randomized methods."""
    layer: int | None = None
    """Output layer index, None for embeddings, final norm, lm_head."""
    vocab: VocabMap | None = None
    """For embeddings and lm_head when the recipe sets a tokenizer: how each input's rows are
    re-indexed to the output vocabulary before the merge (None: inputs used as they are)."""
    quant: dict | None = None
    """With ``out_dtype: fp8``, a re-quantized tensor: {"format": "fp8", "block", "part": "data"
    or "scale", "of": the data tensor's name, "shape": its shape}; the float32 merge of "of",
    quantized per block (``distmerge.io.quantized.quantize_fp8``), gives both parts."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def read_bytes(self) -> int:
        return sum(r.nbytes for r in self.all_inputs)

    @property
    def all_inputs(self) -> list[InputRef]:
        return ([self.base] if self.base else []) + self.inputs


@dataclass(slots=True)
class LeftOut:
    """Input tensors the plan deliberately does not read, and why (every other input
    tensor is read: ``build_plan`` refuses a plan that would drop one unexplained)."""

    model: int
    """Index into Plan.models."""
    reason: str
    tensors: list[str]


@dataclass(slots=True)
class OutputFile:
    name: str
    tensors: list[str]
    nbytes: int
    """Whole file size, header included."""
    read_bytes: int
    """Input bytes read to produce it."""


@dataclass(slots=True)
class Plan:
    method: str
    dtype: str | None
    """Recipe ``dtype``: inputs are cast to it before the math (which runs in float32)."""
    models: list[ModelInfo]
    tensors: list[OutputTensor]
    files: list[OutputFile]
    layer_map: list[list[tuple[str, int]]]
    """For each output layer: the (model, input layer) pairs merged into it."""
    config: dict
    """The output config.json."""
    donor: int
    """Index of the model whose config (and tokenizer, unless told otherwise) the output takes."""
    tokenizer_source: int | None
    """Index of the model whose tokenizer files the output gets."""
    seed: int
    recipe_text: str
    chat_template: str | None
    """The chat template written into the output's tokenizer config (None: keep the source's)."""
    peak_memory: int
    """Estimated bytes of working memory for the largest tensor (inputs in float32, result, output)."""
    left_out: list[LeftOut] = field(default_factory=list)
    """Input tensors not read, grouped by model and reason."""
    added_tokens: list[dict] = field(default_factory=list)
    """Tokens appended to the tokenizer files (``tokenizer_source: union``, ``tokenizer.tokens``),
    as tokenizer.json's added_tokens entries."""
    stages: dict[str, "Plan"] = field(default_factory=dict)
    """The plans of the earlier stages this one reads (models with ``stage``), by name."""
    lines: dict[str, float] | None = None
    """LiNeS (``distmerge.lines``): {"alpha": α, "beta": β}, each tensor's update scaled by
    α + β·l/(L − 1) for its output layer l of ``len(layer_map)``; None without it."""
    version: int = PLAN_VERSION
    distmerge_version: str = __version__
    fingerprint: str = ""

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tensors)

    @property
    def write_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["models"] = [ModelInfo(**m) for m in d["models"]]
        d["tensors"] = [_tensor_from_dict(t) for t in d["tensors"]]
        d["files"] = [OutputFile(**f) for f in d["files"]]
        d["layer_map"] = [[tuple(p) for p in layer] for layer in d["layer_map"]]
        d["left_out"] = [LeftOut(**g) for g in d.get("left_out", [])]
        d["stages"] = {name: Plan.from_dict(p) for name, p in d.get("stages", {}).items()}
        return cls(**d)


def _tensor_from_dict(d: dict) -> OutputTensor:
    d = dict(d)
    d["inputs"] = [InputRef(**r) for r in d["inputs"]]
    d["base"] = InputRef(**d["base"]) if d["base"] else None
    d["vocab"] = VocabMap(**d["vocab"]) if d.get("vocab") else None
    return OutputTensor(**d)


def stage_plans(plan: Plan) -> list[Plan]:
    """The plans of every stage ``plan`` reads, directly or through other stages."""
    return [p for stage in plan.stages.values() for p in (stage, *stage_plans(stage))]


def fingerprint(plan: Plan) -> str:
    """sha256 of everything that determines the output bytes; local paths excluded."""
    d = plan.to_dict()
    d.pop("fingerprint")
    d["stages"] = {name: stage.fingerprint for name, stage in plan.stages.items()}
    if d["lines"] is None:  # plans without LiNeS keep the fingerprints (and model cards) they had
        del d["lines"]
    for t in d["tensors"]:  # unquantized inputs and outputs keep the fingerprints they had
        if t["quant"] is None:
            del t["quant"]
        for r in [*t["inputs"], t["base"]]:
            if r is not None and r["quant"] is None:
                del r["quant"]
    for m in d["models"]:
        m.pop("path")
        m.pop("adapter_path")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclass(slots=True)
class _Layered:
    """A checkpoint's tensors split into layer tensors and the rest."""

    prefix: str | None = None
    layers: dict[int, list[str]] = field(default_factory=dict)
    """layer index -> tensor name suffixes, in header order."""
    other: list[str] = field(default_factory=list)


def split_layers(ref: str, names: list[str], split: Callable[[str], LayerName | None] = split_layer_name) -> _Layered:
    """Split a checkpoint's tensor names into its text decoder's layer stack and the rest (a
    VLM's vision tower and projector among the rest: see :mod:`distmerge.architecture`); with
    ``split=stack_layer_name``, an encoder module's names into its stack and the rest. A
    checkpoint with several text stacks (an encoder and a decoder) is refused: merging it as
    one stack would drop or mix layers."""
    out = _Layered()
    stacks: dict[str, str] = {}  # prefix -> its first tensor
    for name in names:
        layer = split(name)
        if layer:
            stacks.setdefault(layer.stack, name)
            out.layers.setdefault(layer.index, []).append(layer.rest)
        else:
            out.other.append(name)
    if len(stacks) > 1:
        raise MergeError(
            f"model {ref!r} has {len(stacks)} layer stacks ({', '.join(f'{p}.N' for p in stacks)}), as an "
            "encoder-decoder model does; distmerge merges models with one stack of text layers (beside a "
            "vision or audio encoder); merge the decoder's weights on their own"
        )
    out.prefix = next(iter(stacks), None)
    return out


def _check_layer_count(ref: str, ck: Checkpoint, layered: _Layered) -> None:
    """Weights for layers past config.json's layer count would never be merged: refuse."""
    n = ck.num_layers
    extra = sorted(k for k in layered.layers if n is not None and k >= n)
    if extra:
        example = f"{layered.prefix}.{extra[0]}.{layered.layers[extra[0]][0]}"
        raise MergeError(
            f"model {ref!r}: config.json says {n} layers, but its weights also hold layer(s) {layer_ranges(extra)} "
            f"(e.g. {example}), which the merge would leave out; correct the layer count in config.json, "
            "or remove those tensors from the checkpoint"
        )
    for stack in layer_stacks(ck.config, ck.tensors):  # a vision or audio encoder's own count
        indices = {split.index for name in ck.tensors if (split := stack_layer_name(name)) and split.stack == stack.prefix}
        extra = sorted(k for k in indices if stack.count is not None and k >= stack.count)
        if stack.role != "text" and extra:
            raise MergeError(
                f"model {ref!r}: config.json's {stack.key} says {stack.count} layers, but its weights also hold "
                f"{stack.prefix} layer(s) {layer_ranges(extra)}, which the output model would not load; correct "
                f"{stack.key} in config.json, or remove those tensors from the checkpoint"
            )


def layer_ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for k in sorted(indices):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def build_plan(
    recipe: Recipe,
    recipe_text: str = "",
    *,
    out_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    checkpoints: dict[str, Checkpoint] | None = None,
    allow_pickle: bool = False,
    local_only: bool = False,
    stages: dict[str, Plan] | None = None,
) -> Plan:
    """Plan the merge from headers alone. Raises MergeError for anything that does not line up.

    A ``modules:`` recipe is planned one module at a time (``_parts``): each module's models or
    slices over its own stack, its parameters first; the text decoder's gives ``layer_map``.

    ``local_only``: take hub models from the local cache, without asking the hub. ``stages``:
    the plans of earlier stages that the recipe names as models (``checkpoints`` then holds
    each as ``distmerge.graph.stage_checkpoint`` describes it).
    """
    stages = stages or {}
    for name, stage in stages.items():
        if any(t.quant for t in stage.tensors):  # a later plan would read its fp8 values and scales as plain tensors
            raise MergeError(f"stage {name!r}: out_dtype: fp8 is for the final output only (a later stage reads this one's tensors); remove it from {name!r}")
    if checkpoints is None:
        checkpoints = {ref: load_checkpoint(ref, recipe.base_dir, allow_pickle, local_only) for ref in recipe.model_refs()}
    refs = list(checkpoints)
    index = {ref: i for i, ref in enumerate(refs)}
    layered = {ref: split_layers(ref, list(ck.tensors)) for ref, ck in checkpoints.items()}
    for ref, ck in checkpoints.items():
        _check_layer_count(ref, ck, layered[ref])
    method = recipe.method

    vocab = build_vocab(recipe.tokenizer, checkpoints, recipe.donor) if recipe.tokenizer else None
    planner = _Planner(recipe, method, checkpoints, index, seed, vocab)
    layer_map: list = []
    text_recipe = recipe
    planned: list[tuple[_Part, list[Slice]]] = []
    encoder_counts: dict[str, int] = {}  # an encoder module's config key -> its sliced layer count
    for part in _parts(recipe, checkpoints):
        part_layered = layered if part.module is None else {
            ref: split_layers(ref, [n for n in ck.tensors if part.owns(n)], part.split) for ref, ck in checkpoints.items()
        }
        slices = _normalize(part.recipe, checkpoints, part_layered, part.count, f"modules.{part.module}." if part.module else "")
        planner.recipe = part.recipe  # its parameters: the module's, then the top level's
        stack_map = _plan_part(planner, slices, part_layered, part.before, text=part.split is split_layer_name)
        planned.append((part, slices))
        if part.split is split_layer_name:
            layer_map, text_recipe = stack_map, part.recipe
        elif part.recipe.slices:
            encoder_counts.update(_encoder_count(checkpoints[recipe.donor], part, stack_map))
    planner.recipe = recipe

    left_out = _left_out(checkpoints, planned, planner.read)
    donor = index[recipe.donor]
    config = _output_config(checkpoints[recipe.donor].config, text_recipe, layer_map, checkpoints)
    for key, count in encoder_counts.items():
        section, name = key.split(".")
        config[section][name] = count
    if recipe.out_dtype == "fp8":
        _requantized_config(config, [checkpoints[recipe.donor], *checkpoints.values()], planner.tensors)
    if vocab is not None:
        config["vocab_size"] = vocab.rows
    plan = Plan(
        method=method.name,
        dtype=recipe.dtype,
        models=[ModelInfo(ref, ck.path, ck.num_layers, ck.adapter_path, stage=ref in stages) for ref, ck in checkpoints.items()],
        tensors=planner.tensors,
        files=shard_files(planner.tensors, out_shard_bytes),
        layer_map=layer_map,
        config=config,
        donor=donor,
        tokenizer_source=index[_tokenizer_source(recipe, vocab, index)],
        seed=seed,
        recipe_text=recipe_text,
        chat_template=templates.resolve(recipe.chat_template, [ck.path for ck in checkpoints.values()]),
        peak_memory=max((_working_bytes(method, t) for t in planner.tensors), default=0),
        left_out=left_out,
        added_tokens=vocab.added if vocab else [],
        stages={ref: stages[ref] for ref in checkpoints if ref in stages},
        lines=dataclasses.asdict(recipe.lines) if recipe.lines else None,
    )
    if recipe.lines:
        _check_lines(plan)
    # The files finish reads and edits, built now and dropped: bad ones are refused before any work.
    tokenizer_files(plan.models[donor].path, plan.models[plan.tokenizer_source].path, plan.added_tokens, plan.chat_template)
    plan.fingerprint = fingerprint(plan)
    return plan


def _plan_part(planner: "_Planner", slices: list[Slice], layered: dict[str, _Layered], before: Callable[[str], bool], text: bool) -> list:
    """Add the output tensors of one stack and the tensors around it: those before its layers
    from the first slice's models, its layers slice by slice, those after from the last slice's.
    Returns the stack's layer map (``Plan.layer_map`` for the text decoder)."""
    first, last = slices[0], slices[-1]
    pre = [n for n in layered[first.sources[0].model].other if before(n)]
    post = [n for n in layered[last.sources[0].model].other if not before(n)]
    for name in pre:
        planner.add(first, {s.model: name for s in first.sources}, name, t=0.0, layer=None)
    layer_map = []
    for s in slices:
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        lead = s.sources[0]
        for k in range(length):
            t = k / (length - 1) if length > 1 else 1.0
            out_layer = len(layer_map)
            layer_map.append([(src.model, src.layer_range[0] + k) for src in s.sources])
            lead_layer = layered[lead.model]
            for rest in lead_layer.layers[lead.layer_range[0] + k]:
                names = {}
                for src in s.sources:
                    lay = layered[src.model]
                    i = src.layer_range[0] + k
                    if rest not in lay.layers.get(i, []):
                        raise MergeError(
                            f"model {src.model!r} has no tensor {lay.prefix}.{i}.{rest}, which "
                            f"{lead.model!r} has: the models' tensor names don't line up"
                        )
                    names[src.model] = f"{lay.prefix}.{i}.{rest}"
                planner.add(s, names, f"{lead_layer.prefix}.{out_layer}.{rest}", t=t, layer=out_layer if text else None)
    for name in post:
        planner.add(last, {s.model: name for s in last.sources}, name, t=0.0, layer=None)
    return layer_map


@dataclass(slots=True)
class _Part:
    """What one pass of the planner covers: the whole recipe, or one module of a ``modules:``
    recipe (mergekit plans each module on its own: its models or slices over its own layers)."""

    recipe: Recipe
    """Its models or slices, and its parameters (a module's ranked before the top level's)."""
    module: str | None
    owns: Callable[[str], bool]
    split: Callable[[str], LayerName | None]
    """Its layer stack: ``split_layer_name`` for the text decoder, ``stack_layer_name`` for an encoder."""
    before: Callable[[str], bool]
    """Its tensors outside the layers that come before them (the rest come after)."""
    count: Callable[[Checkpoint], int | None]
    """The layer count a model's config gives for this stack."""


def _parts(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> list[_Part]:
    """The recipe as one part, or a ``modules:`` recipe as one part per module, after checking
    that each module it names is one the models have and that it names every module of the
    donor (mergekit writes only the modules a recipe names: an output without its vision tower
    would not load)."""
    if not recipe.modules:
        return [_Part(recipe, None, lambda n: True, split_layer_name, comes_before_layers, lambda ck: ck.num_layers)]
    named = [m.name for m in recipe.modules]
    arch = checkpoints[recipe.donor].config.get("architectures")
    for ref, ck in checkpoints.items():  # a module is written under the donor's config and names
        if ck.config.get("architectures") != arch:
            raise MergeError(
                f"modules: model {ref!r} is {ck.config.get('architectures')}, but the output takes {recipe.donor!r}'s config, "
                f"{arch}; each module must come from models of the donor's architecture (mergekit refuses this too, without --allow-crimes)"
            )
    for m in recipe.modules:
        for ref in recipe.module_recipe(m).model_refs():
            have = module_names(checkpoints[ref].tensors)
            if m.name not in have:
                hint = ("; it is a language model: merge it with models or slices, or modules: {default: ...}" if have == ["default"]
                        else f"; mergekit's module names for it are {', '.join(have)}")
                raise MergeError(f"modules.{m.name}: model {ref!r} has no module {m.name!r}{hint}")
        if m.name != TEXT_MODULE and m.slices and not any(stack_layer_name(n) for n in checkpoints[m.slices[0].sources[0].model].tensors if module_of(n) == m.name):
            raise MergeError(f"modules.{m.name}: this module has no numbered layers to slice; give it models: instead of slices:")
    missing = [m for m in module_names(checkpoints[recipe.donor].tensors) if m not in named]
    if missing:
        raise MergeError(
            f"modules: the recipe names {', '.join(named)}, but {recipe.donor!r} also has {', '.join(missing)}, which the output "
            f"needs to load (mergekit would write it without them); add {missing[0]}: {{models: [...]}} to modules"
        )
    parts = []
    for m in recipe.modules:
        if m.name == TEXT_MODULE:
            parts.append(_Part(recipe.module_recipe(m), m.name, lambda n: module_of(n) == TEXT_MODULE, split_layer_name, comes_before_layers, lambda ck: ck.num_layers))
        else:
            owns = (lambda name: lambda n: module_of(n) == name)(m.name)
            parts.append(_Part(recipe.module_recipe(m), m.name, owns, stack_layer_name, lambda n: not after_encoder_layers(n), (lambda own: lambda ck: _encoder_stack_count(ck, own))(owns)))
    return parts


def _encoder_stack_count(ck: Checkpoint, owns: Callable[[str], bool]) -> int | None:
    stacks = layer_stacks(ck.config, [n for n in ck.tensors if owns(n)])
    return stacks[0].count if len(stacks) == 1 else None


def _encoder_count(donor: Checkpoint, part: _Part, stack_map: list) -> dict[str, int]:
    """{config key: layer count} for an encoder module that slices its layers; a config that
    lists that encoder's layers by index (Qwen2.5-VL's fullatt_block_indexes) is refused unless
    the layers stay as they are, since the list would no longer say which layers they are."""
    stacks = layer_stacks(donor.config, [n for n in donor.tensors if part.owns(n)])
    if len(stacks) != 1 or stacks[0].key is None:
        raise MergeError(f"modules.{part.module}: slices change this module's layer count, but {donor.ref!r}'s config.json has no key for it; give it models: instead")
    key = stacks[0].key
    section = donor.config.get(key.split(".")[0], {})
    identity = [pairs[0][1] for pairs in stack_map] == list(range(stacks[0].count or 0))
    lists = [k for k in ENCODER_LAYER_LISTS if k in section]
    if lists and not identity:
        raise MergeError(
            f"modules.{part.module}: its slices reorder or change the encoder's layers, but {key.split('.')[0]}.{lists[0]} lists "
            "those layers by index, which distmerge does not remap; keep the encoder's layers as they are (models:)"
        )
    return {key: len(stack_map)}


def _check_lines(plan: Plan) -> None:
    """LiNeS scales the update from the base: every merged tensor needs one."""
    for t in plan.tensors:
        if t.base is None and DTYPES[t.dtype].is_floating_point:
            raise MergeError(
                f"lines: scales the update from the base model, but tensor {t.name!r} is merged without one; "
                f"set base_model (and list it in every slice), or remove lines:"
            )


def _left_out(checkpoints: dict[str, Checkpoint], planned: list[tuple[_Part, list[Slice]]], read: dict[str, set[str]]) -> list[LeftOut]:
    """Every input tensor the plan does not read, grouped by model and reason. An unread
    tensor without a reason (a model holds a tensor its slice's first model lacks, say)
    would vanish from the output unnoticed: MergeError naming it."""
    groups: dict[tuple[int, str], list[str]] = {}
    for i, (ref, ck) in enumerate(checkpoints.items()):
        unexplained = []
        for name in ck.tensors:
            if name in read.get(ref, ()):
                continue
            found = next(((part, slices) for part, slices in planned if part.owns(name)), None)
            if found is None:  # a module the donor (and so the output) does not have
                groups.setdefault((i, f"its module {module_of(name)} is not in the output (the donor has none)"), []).append(name)
                continue
            part, slices = found
            first = {src.model for src in slices[0].sources}
            last = {src.model for src in slices[-1].sources}
            sourced = [src for s in slices for src in s.sources if src.model == ref]
            taken = {k for src in sourced for k in range(*src.layer_range)}
            layer = part.split(name)
            index = layer.index if layer else None
            if part.module is not None and not sourced:
                reason = f"not among modules.{part.module}'s models"
            elif not sourced:
                reason = "named as a base_model but in no slice's sources, so the method does not read it"
            elif index is not None:
                reason = None if index in taken else "its layer is in no slice's layer_range"
            elif part.before(name):
                reason = None if ref in first else "embeddings come from the first slice's models"
            else:
                reason = None if ref in last else "tensors after the layers (final norm, lm_head) come from the last slice's models"
            if reason is not None and part.module is not None and part.module != TEXT_MODULE and not reason.startswith("not among"):
                reason = f"modules.{part.module}: " + reason.replace("embeddings come", "its tensors before its layers come").replace("(final norm, lm_head) ", "")
            if reason is None:
                unexplained.append(name)
            else:
                groups.setdefault((i, reason), []).append(name)
        if unexplained:
            more = f" and {len(unexplained) - 1} more" if len(unexplained) > 1 else ""
            raise MergeError(
                f"model {ref!r}: tensor {unexplained[0]!r}{more} would not be merged into the output: the "
                "models' tensor names don't line up (the first model of each slice decides which tensors the "
                "output has); check that the models share one architecture"
            )
    for i, (ref, ck) in enumerate(checkpoints.items()):
        if ck.quant is not None:  # the scales a quantized checkpoint's tensors were dequantized with
            q, used = ck.quant, read.get(ref, set())
            block = "x".join(map(str, q["block"]))
            for taken, why in ((True, "read to dequantize their tensors, not merged on their own"), (False, "the scales of tensors left out")):
                names = [scale for name, scale in q["scales"].items() if (name in used) == taken]
                if names:
                    groups[(i, f"{q['format']} scales (block {block}): {why}")] = names
    return [LeftOut(model, reason, names) for (model, reason), names in groups.items()]


def _normalize(recipe: Recipe, checkpoints: dict[str, Checkpoint], layered: dict[str, _Layered], count=lambda ck: ck.num_layers, at: str = "") -> list[Slice]:
    """Turn a ``models`` recipe into one slice over every layer (the base appended when it is
    not listed, as mergekit does), and check layer ranges against the models. ``count``: a
    model's layer count for the stack (a module's own); ``at``: where messages say the models are."""

    def layers_of(ref: str) -> int:
        n = count(checkpoints[ref])
        return n if n is not None else len(layered[ref].layers)

    if recipe.models:
        sources = list(recipe.models)
        if recipe.base_model and recipe.base_model not in [m.model for m in sources]:
            sources.append(InputModel(model=recipe.base_model))
        counts = {m.model: layers_of(m.model) for m in sources}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{m} has {n}" for m, n in counts.items())
            raise MergeError(f"{at}models must have the same number of layers to be merged layer by layer: {detail}; use slices")
        slices = [Slice(sources=tuple(dataclasses.replace(m, layer_range=(0, counts[m.model])) for m in sources))]
    else:
        slices = list(recipe.slices)
    for i, s in enumerate(slices):
        listed = [src.model for src in s.sources]
        twice = next((m for m in listed if listed.count(m) > 1), None)
        if twice is not None:
            where = f"{at}models" if recipe.models else f"{at}slices[{i}].sources"
            raise MergeError(
                f"{where}: model {twice!r} is listed {listed.count(twice)} times; list each model once "
                "(mergekit refuses this too: \"Duplicate merge inputs\"); to weigh it more, raise its weight"
            )
        for src in s.sources:
            n = layers_of(src.model)
            start, end = src.layer_range
            if end > n:
                raise MergeError(f"{at}slices[{i}]: layer_range [{start}, {end}] of {src.model!r} is out of bounds: the model has {n} layers (0..{n - 1})")
            missing = [k for k in range(start, end) if k not in layered[src.model].layers]
            if missing:
                raise MergeError(f"{at}slices[{i}]: {src.model!r} has no tensors for layer {missing[0]}")
    return slices


class _Planner:
    """Builds OutputTensors: gathers inputs, resolves parameters, checks shapes."""

    def __init__(self, recipe: Recipe, method: methods.Method, checkpoints, index, seed, vocab: OutputVocab | None):
        self.recipe, self.method, self.checkpoints, self.index, self.seed = recipe, method, checkpoints, index, seed
        self.vocab = vocab
        self.tensors: list[OutputTensor] = []
        self.names: set[str] = set()
        self.read: dict[str, set[str]] = {}
        """model -> the names of its tensors that some output tensor reads."""

    def add(self, s: Slice, names: dict[str, str], out_name: str, *, t: float, layer: int | None) -> None:
        present = {m: n for m, n in names.items() if n in self.checkpoints[m].tensors}
        if not present:
            return  # e.g. lm_head of models with tied embeddings: absent everywhere, nothing to write
        if len(present) < len(names):
            missing = sorted(set(names) - set(present))
            raise MergeError(f"tensor {out_name!r}: present in {sorted(present)} but missing from {missing}")
        if out_name in self.names:
            raise MergeError(f"tensor {out_name!r} would be written twice; check the slices")
        self.names.add(out_name)
        for m, n in names.items():
            self.read.setdefault(m, set()).add(n)

        refs = {m: self._ref(m, n) for m, n in names.items()}
        shapes = {m: tuple(self.checkpoints[m].tensors[n].shape) for m, n in names.items()}
        order = [src.model for src in s.sources]
        base_ref = s.base_model or self.recipe.base_model
        vocab = None
        reindexed = self.vocab is not None and is_vocab_tensor(out_name)
        if reindexed:
            shapes = {m: shape[1:] for m, shape in shapes.items()}  # rows are re-indexed
            vocab = vocab_map(self.vocab, self.recipe.tokenizer, order, self.index, base_ref, out_name)
            if is_identity(vocab, {self.index[m]: self.checkpoints[m].tensors[n].shape[0] for m, n in names.items()}):
                vocab = None
        if len(set(shapes.values())) > 1:
            detail = ", ".join(f"{m}: {list(shape)}" for m, shape in shapes.items())
            hint = " The vocabularies differ: set tokenizer_source (union, base or a model) to re-index the embeddings to one tokenizer." if is_vocab_tensor(out_name) else ""
            raise MergeError(f"tensor {out_name!r} has different shapes across models ({detail}).{hint}")

        if self.method.base == "ignored" or base_ref not in order:
            if self.method.base == "required":
                raise MergeError(f"{self.method.name} needs the base model {base_ref!r} among the sources of every slice")
            base, inputs = None, order
        else:
            base, inputs = base_ref, [m for m in order if m != base_ref]
        self._check_count(len(inputs), out_name)

        dtypes = {self.checkpoints[m].tensors[names[m]].dtype for m in names}
        fp8 = None
        if not all(DTYPES[d].is_floating_point for d in dtypes):
            # Integer and bool tensors (index buffers, masks) are copied bit for bit, never
            # cast or merged; the run checks that every model holds the same values.
            if len(dtypes) > 1:
                detail = ", ".join(f"{m}: {self.checkpoints[m].tensors[n].dtype}" for m, n in names.items())
                raise MergeError(f"tensor {out_name!r} has different dtypes across models ({detail}); integer and bool tensors are copied, not merged, so the models must agree")
            out_dtype, shared, per_input, seeds = dtypes.pop(), {}, {}, None
        else:
            quants = [q for m, n in names.items() if (q := self.checkpoints[m].tensors[n].quant)]
            out_dtype = _out_dtype(self.recipe, dtypes, bool(quants))
            fp8 = next((q for q in quants if q["format"] == "fp8"), None)
            if out_dtype == "fp8":  # re-quantized to the block layout of its first fp8 input, or written in bf16
                out_dtype = "F8_E4M3" if fp8 and vocab is None else "BF16"
            shared = {p.name: self._resolve(p, [s.parameters, self.recipe.parameters], out_name, t, out_name) for p in self.method.params if p.scope == "shared"}
            per_input = {
                p.name: [self._resolve(p, [_source_params(s, m), s.parameters, self.recipe.parameters], names[m], t, f"{m}: {out_name}") for m in inputs]
                for p in self.method.params
                if p.scope == "input"
            }
            self._check_weight_sum(shared, per_input, out_name)
            seeds = None
            if self.method.randomized:
                from distmerge.rng import derive_seed

                # Keyed by what the tensor *is*, never by where or when it is computed.
                seeds = [derive_seed(self.seed, out_name, m, names[m]) for m in inputs]
        self.tensors.append(
            OutputTensor(
                name=out_name,
                shape=[self.vocab.rows, *shapes[order[0]]] if reindexed else list(shapes[order[0]]),
                dtype=out_dtype,
                inputs=[refs[m] for m in inputs],
                base=refs[base] if base else None,
                params=shared,
                input_params=per_input,
                seeds=seeds,
                layer=layer,
                vocab=vocab,
            )
        )
        if out_dtype == "F8_E4M3" and fp8 is not None:
            self._requantize(self.tensors[-1], fp8["block"])

    def _requantize(self, t: OutputTensor, block: list[int]) -> None:
        """``out_dtype: fp8``: ``t`` is written as fp8 blocks, and its scales (``weight_scale_inv``)
        as an output tensor of their own, right after it, merged from the same inputs."""
        *lead, rows, cols = t.shape
        scale = dataclasses.replace(t, name=t.name + quantized.FP8_SCALE_SUFFIX, dtype="F32", shape=[*lead, -(-rows // block[0]), -(-cols // block[1])])
        if scale.name in self.names:
            raise MergeError(f"tensor {scale.name!r} would be written twice: the inputs hold it, and out_dtype: fp8 writes it as {t.name!r}'s scales")
        self.names.add(scale.name)
        info = {"format": "fp8", "block": list(block), "of": t.name, "shape": list(t.shape)}
        t.quant, scale.quant = {**info, "part": "data"}, {**info, "part": "scale"}
        self.tensors.append(scale)

    def _check_weight_sum(self, shared: dict, per_input: dict, out_name: str) -> None:
        """A method that divides by Σᵢ wᵢ with no guard (as mergekit's does) would write NaN/Inf
        for weights that sum to zero: refuse them now, before anything is written."""
        flag = self.method.divides_by_weight_sum
        if flag is None or not shared.get(flag):
            return
        import torch

        weights = per_input["weight"]
        if float(torch.tensor(weights, dtype=torch.float32).sum()) == 0:  # summed as the merge sums them
            raise MergeError(
                f"tensor {out_name!r}: the weights {weights} sum to zero, and {self.method.name} with "
                f"{flag}: true divides by their sum; change the weights, or set {flag}: false"
            )

    def _ref(self, model: str, name: str) -> InputRef:
        info = self.checkpoints[model].tensors[name]
        return InputRef(self.index[model], name, info.file, info.dtype, info.begin, info.end, info.lora, info.quant)

    def _check_count(self, n: int, out_name: str) -> None:
        m = self.method
        what = "models besides the base" if m.base != "ignored" else "models"
        if n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs):
            want = f"exactly {m.min_inputs}" if m.min_inputs == m.max_inputs else f"at least {m.min_inputs}" if m.max_inputs is None else f"{m.min_inputs} to {m.max_inputs}"
            raise MergeError(f"{m.name} takes {want} {what}, but {out_name!r} has {n}")

    def _resolve(self, param: methods.Param, scopes: list[dict], tensor: str, t: float, where: str) -> Any:
        for scope in scopes:
            if param.name in scope:
                value = evaluate(scope[param.name], tensor, t, param, f"parameter {param.name} for {where}")
                if value is not None:
                    return value
        if param.required:
            raise MergeError(f"{self.method.name} needs parameter {param.name!r} for {where}; set it in the recipe's parameters")
        return param.default


def _source_params(s: Slice, model: str) -> dict:
    for src in s.sources:
        if src.model == model:
            return src.parameters
    return {}


def _out_dtype(recipe: Recipe, input_dtypes: set[str], quantized: bool = False) -> str:
    """out_dtype, else dtype, else BF16 for a tensor with a quantized input (merged in
    float32, written as transformers dequantizes), else the inputs' own dtype (promoted if
    they differ)."""
    if recipe.out_dtype == "fp8":
        return "fp8"  # decided per tensor by the caller
    if recipe.out_dtype or recipe.dtype:
        return TORCH_DTYPE_NAMES[recipe.out_dtype or recipe.dtype]
    if quantized:
        return "BF16"
    import torch

    promoted = DTYPES[min(input_dtypes)]
    for d in input_dtypes:
        promoted = torch.promote_types(promoted, DTYPES[d])
    return DTYPE_NAMES[promoted]


def _tokenizer_source(recipe: Recipe, vocab: OutputVocab | None, index: dict[str, int]) -> str:
    """The model whose tokenizer files the output gets."""
    if vocab is not None:
        return vocab.source
    source = recipe.tokenizer.source if recipe.tokenizer else None
    if source not in (None, "base", "union") and source not in index:
        raise MergeError(f"tokenizer source {source!r} is not one of the recipe's models: {', '.join(index)}")
    return source if source in index else recipe.donor


def _working_bytes(method: methods.Method, t: OutputTensor) -> int:
    """The memory merging ``t`` needs: the method's working memory (``Method.work_bytes``), the
    output, and the float32 values of its quantized inputs (each dequantized whole)."""
    dequantized = 4 * math.prod(t.shape) * sum(1 for r in t.all_inputs if r.quant)
    if t.quant is not None:  # out_dtype: fp8: the float32 merge, and quantize_fp8's padded copy and quotient
        return method.work_bytes(len(t.all_inputs), math.prod(t.quant["shape"])) + 13 * math.prod(t.quant["shape"]) + dequantized
    return method.work_bytes(len(t.all_inputs), math.prod(t.shape)) + t.nbytes + dequantized

def _output_config(donor: dict, recipe: Recipe, layer_map: list, checkpoints: dict[str, Checkpoint]) -> dict:
    config = copy.deepcopy(donor)
    config.pop("quantization_config", None)  # quantized inputs are dequantized while read
    if recipe.slices:
        donor_count = layer_count(donor)
        text = text_section(config)  # a VLM's text_config
        text.update(layer_lists(text))  # the per-layer lists the config leaves to defaults, written out
        donor_text = dict(text)
        set_layer_count(config, len(layer_map))
        for key, value in list(text.items()):
            if key in TEXT_LAYER_INDEX_LISTS and isinstance(value, list):
                text[key] = _layer_index_list(key, layer_map, checkpoints, donor_text)
            elif isinstance(value, list) and len(value) == donor_count and key != "architectures":
                text[key] = _per_layer_list(key, layer_map, checkpoints, donor_text)
        _keep_moe_layers(text, layer_map, checkpoints)
    dtype = recipe.out_dtype or recipe.dtype
    if dtype:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
    return config


def _keep_moe_layers(text: dict, layer_map: list, checkpoints: dict[str, Checkpoint]) -> None:
    """A frankenmerge keeps each layer MoE or dense as in its own model, where the config says
    which by a rule of the layer's position (``moe_rule``): Qwen-MoE's is rewritten to list the
    output's dense layers (``decoder_sparse_step: 1``, ``mlp_only_layers``); DeepSeek's
    ``first_k_dense_replace`` cannot list them, so a layer order it cannot state is refused."""
    moe = []
    for pairs in layer_map:
        ref, i = pairs[0]
        rule = moe_rule(text_section(checkpoints[ref].config))
        moe.append(None if rule is None else rule(i))
    out = moe_rule(text)
    mismatched = [k for k, m in enumerate(moe) if m is not None and (out is None or out(k) != m)]
    if not mismatched:
        return
    if text.get("decoder_sparse_step") is not None and text.get("num_experts"):
        text["decoder_sparse_step"] = 1
        text["mlp_only_layers"] = [k for k, m in enumerate(moe) if not m]
        return
    dense = moe.index(True) if True in moe else len(moe)
    if text.get("first_k_dense_replace") is not None and None not in moe and all(moe[dense:]):
        text["first_k_dense_replace"] = dense  # the dense layers still come first: say how many
        return
    k = mismatched[0]
    ref, i = layer_map[k][0]
    raise MergeError(
        f"slices: output layer {k} is layer {i} of {ref!r}, {'an MoE' if moe[k] else 'a dense'} layer, but the output config's "
        f"first_k_dense_replace: {text.get('first_k_dense_replace')} makes layer {k} {'dense' if moe[k] else 'MoE'}, and it cannot list "
        "MoE layers one by one; order the slices so that the dense layers come first, as in the models"
    )


def _source_list(key: str, ck: Checkpoint, donor_text: dict):
    """A per-layer list of a source model's text config; the donor's where the source's config
    does not state it and is of the donor's model type (a config saved by an older transformers)."""
    section = layer_lists(text_section(ck.config))
    if section.get(key) is None and section.get("model_type") == donor_text.get("model_type"):
        return donor_text[key]
    return section.get(key)


def _layer_index_list(key: str, layer_map: list, checkpoints: dict[str, Checkpoint], donor_text: dict) -> list[int]:
    """A list of layer indices (Llama 4's moe_layers) for the output's layers: the output layers
    whose source layer its own model's config lists (a MoE layer stays one, wherever it lands)."""
    out = []
    for k, pairs in enumerate(layer_map):
        ref, i = pairs[0]
        listed = _source_list(key, checkpoints[ref], donor_text)
        if not isinstance(listed, list):
            raise MergeError(f"model {ref!r}'s config.json has no list {key}, which the donor's has: the output's {key} cannot say "
                             f"which of its layers are which; take these layers from models whose configs list {key}")
        if i in listed:
            out.append(k)
    return out


def _per_layer_list(key: str, layer_map: list, checkpoints: dict[str, Checkpoint], donor_text: dict) -> list:
    """A list with one value per layer (layer_types, Llama 4's no_rope_layers) for the output's
    layers: each output layer takes its source layer's value from its own model's config."""
    out = []
    for pairs in layer_map:
        ref, i = pairs[0]
        ck = checkpoints[ref]
        values = _source_list(key, ck, donor_text)
        if not isinstance(values, list) or len(values) != layer_count(ck.config):
            raise MergeError(f"model {ref!r}'s config.json has no {key} with one value per layer, which the donor's has: the output's "
                             f"{key} cannot say what its layers from {ref!r} are; take these layers from models whose configs give {key} per layer")
        out.append(values[i])
    return out


def _requantized_config(config: dict, checkpoints: list[Checkpoint], tensors: list[OutputTensor]) -> None:
    """``out_dtype: fp8``: the output config gets the quantization_config of the donor (else of
    the first fp8 model), for the block its tensors were re-quantized to, and bf16 otherwise."""
    blocks = sorted({tuple(t.quant["block"]) for t in tensors if t.quant})
    if len(blocks) != 1:
        raise MergeError(
            "out_dtype: fp8 re-quantizes the tensors that are block-scaled fp8 in the inputs to their block layout, "
            + ("but no input tensor is fp8; choose bfloat16 or float32" if not blocks else
               f"but the fp8 inputs have different blocks ({', '.join(map(str, map(list, blocks)))}); choose bfloat16 or float32")
        )
    qc = next(ck.config["quantization_config"] for ck in checkpoints if ck.quant and ck.quant["format"] == "fp8")
    config["quantization_config"] = {**qc, "weight_block_size": list(blocks[0])}
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = "bfloat16"


def shard_files(tensors: list[OutputTensor], max_bytes: int) -> list[OutputFile]:
    """Pack tensors, in plan order, into files of at most ``max_bytes`` of data each
    (a larger tensor gets a file of its own). The layout depends only on the plan, never
    on the number of ranks, so every world size writes the same bytes."""
    groups: list[list[OutputTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    files = []
    for i, group in enumerate(groups):
        header, offsets = build_header([(t.name, t.dtype, tuple(t.shape)) for t in group], FILE_METADATA)
        files.append(
            OutputFile(
                name=f"model-{i + 1:05d}-of-{n:05d}.safetensors",
                tensors=[t.name for t in group],
                nbytes=len(header) + offsets[-1],
                read_bytes=sum(t.read_bytes for t in group),
            )
        )
    return files


FILE_METADATA = {"format": "pt"}


def file_layout(plan: Plan, file: OutputFile) -> tuple[bytes, dict[str, int]]:
    """An output file's header bytes and the absolute byte offset of each of its tensors."""
    by_name = {t.name: t for t in plan.tensors}
    tensors = [by_name[n] for n in file.tensors]
    header, offsets = build_header([(t.name, t.dtype, tuple(t.shape)) for t in tensors], FILE_METADATA)
    return header, {t.name: len(header) + off for t, off in zip(tensors, offsets)}


IO_BYTES_PER_S = 350e6
"""Rough rate at which one rank reads and writes tensor bytes, for the estimated time that spreads
tensors over ranks: measured on the development machine (2 shared cores, local disk) as 256 MB
written and fsync'd (240 MB/s) then read back uncached (780 MB/s), 370 MB/s for both. A page cache
or a fast NVMe makes it several times higher; only its ratio to ``CPU_FLOPS_PER_S`` matters."""

CPU_FLOPS_PER_S = 70e9
"""Rough rate of one rank's compute, in operations a second on one thread (``Method.work_flops``
counts in matrix products' operations): measured on the same machine as a 2048×2048 float32
product on one thread, 0.24 s (72 G a second); the SVD of such a matrix took 4.1 s, which
``methods.tsv.svd_flops`` counts as twice its nominal operations. A GPU is 10-100 times faster."""


@dataclass(slots=True)
class RankWork:
    """What one rank's share of a plan is estimated to cost (``rank_work``)."""

    tensors: int
    bytes: int
    """Input bytes read plus output bytes written."""
    flops: int
    """Operations of the merges (``Method.work_flops``)."""
    seconds: float
    """bytes / IO_BYTES_PER_S + flops / CPU_FLOPS_PER_S: what the assignment balances."""
    peak_memory: int
    """Working memory of its largest merge (as ``Plan.peak_memory``, for its tensors only)."""


def tensor_bytes(t: OutputTensor) -> int:
    """Bytes a rank moves for one output tensor: its inputs read plus its output written."""
    return t.read_bytes + t.nbytes


def tensor_flops(method: methods.Method, t: OutputTensor) -> int:
    """Operations of the merge of one output tensor (``Method.work_flops``)."""
    return method.work_flops(len(t.all_inputs), t.quant["shape"] if t.quant else t.shape, t.params)


def estimated_seconds(nbytes: int, flops: int) -> float:
    """Rough time of moving ``nbytes`` and computing ``flops`` on one rank."""
    return nbytes / IO_BYTES_PER_S + flops / CPU_FLOPS_PER_S


def tensor_cost(method: methods.Method, t: OutputTensor) -> int:
    """Estimated time of one output tensor on one rank, in whole nanoseconds (integers, so that
    the split is exact and the same on every machine): the bytes it moves at ``IO_BYTES_PER_S``
    plus the operations of its merge at ``CPU_FLOPS_PER_S``. For an element-wise method the bytes
    dominate (2 operations per input element against 2 bytes read: 1%), so the cost is nearly
    proportional to bytes; ``tsv`` of an 8192×28672 bfloat16 matrix from two fine-tunes computes
    for about 350 times as long as it moves bytes (32 min against 5 s at these rates)."""
    return round(1e9 * estimated_seconds(tensor_bytes(t), tensor_flops(method, t)))


def tensor_costs(plan: Plan) -> list[int]:
    """``tensor_cost`` of each of the plan's tensors, in plan order."""
    method = methods.get(plan.method)
    return [tensor_cost(method, t) for t in plan.tensors]


def work_key(t: OutputTensor) -> str:
    """What a tensor is merged as: its own name, or, for the two parts of an fp8 output tensor
    (``out_dtype: fp8``: its values and its scales), the tensor both are quantized from, whose one
    float32 merge gives both. Tensors of one key are one unit of work, on one rank."""
    return t.quant["of"] if t.quant else t.name


def work_groups(plan: Plan) -> list[list[int]]:
    """The plan's tensors (indices) grouped by ``work_key``, in plan order: single tensors, but
    an fp8 output's values and scales together."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(plan.tensors):
        groups.setdefault(work_key(t), []).append(i)
    return list(groups.values())


def costed_groups(plan: Plan) -> list[tuple[list[int], int]]:
    """Each ``work_groups`` group of the plan with its ``group_cost``: what ``assign_tensors``
    spreads over ranks and ``rank_loads`` sums."""
    method = methods.get(plan.method)
    return [(g, group_cost(method, [plan.tensors[i] for i in g])) for g in work_groups(plan)]


def group_cost(method: methods.Method, tensors: list[OutputTensor]) -> int:
    """``tensor_cost`` of tensors merged as one (a ``work_groups`` group): their outputs, their
    distinct inputs read once, and each distinct merge once."""
    if len(tensors) == 1:
        return tensor_cost(method, tensors[0])
    reads = {(r.model, r.name): r.nbytes for t in tensors for r in t.all_inputs}
    flops = {work_key(t): tensor_flops(method, t) for t in tensors}
    return round(1e9 * estimated_seconds(sum(t.nbytes for t in tensors) + sum(reads.values()), sum(flops.values())))


BALANCE_TARGET = 0.05
"""Contiguous shares are used while their busiest rank moves at most 5% more than the mean."""


def assign_tensors(plan: Plan, world_size: int) -> list[list[int]]:
    """Each rank's share of the output tensors (indices into ``plan.tensors``, in plan
    order), balanced by estimated time (``tensor_cost``: bytes read + written, and the merge's
    operations, which for the SVD methods outweigh the bytes). Deterministic: a function of the
    plan and the world size alone; which rank merges a tensor never changes its bytes.

    Contiguous runs of the plan's order when they can be balanced within 5% (a rank then
    writes runs of whole files and reads its inputs in file order); otherwise, when a few
    large tensors make every contiguous split uneven (64+ ranks on a 70B model, or an SVD
    method, whose cost grows as m·n·min(m, n)), the longest-processing-time-first assignment
    of single tensors. An fp8 output's values and scales (``work_groups``) go to one rank.
    """
    groups = costed_groups(plan)
    shares = assign([cost for _, cost in groups], world_size)
    return [sorted(i for k in share for i in groups[k][0]) for share in shares]


def assign(costs: list[int], world_size: int) -> list[list[int]]:
    """``assign_tensors`` for any list of work costs (in work order)."""
    shares = [list(r) for r in contiguous_shares(costs, world_size)]
    if _imbalance(costs, shares) <= BALANCE_TARGET:
        return shares
    lpt = longest_first_shares(costs, world_size)
    return lpt if _imbalance(costs, lpt) < _imbalance(costs, shares) else shares


def contiguous_shares(costs: list[int], world_size: int) -> list[range]:
    """The split into ``world_size`` contiguous runs with the smallest possible largest share
    (a linear partition), cut as evenly as that allows."""
    n = len(costs)
    cap = _min_capacity(costs, world_size)
    bounds = [0]
    for r in range(world_size - 1):
        i, left = bounds[-1], world_size - r
        target = sum(costs[i:]) / left
        j, acc = i, 0
        # Take tensors up to the even share (always at least one, even a big one).
        while j < n and acc + costs[j] <= cap and (j == i or acc + costs[j] / 2 <= target):
            acc, j = acc + costs[j], j + 1
        while _parts_needed(costs[j:], cap) > left - 1:  # too little taken: the rest won't fit
            acc, j = acc + costs[j], j + 1
        bounds.append(j)
    bounds.append(n)
    return [range(bounds[r], bounds[r + 1]) for r in range(world_size)]


def longest_first_shares(costs: list[int], world_size: int) -> list[list[int]]:
    """Largest tensor first, each to the least-loaded rank (ties: lowest index, lowest rank)."""
    loads = [(0, r) for r in range(world_size)]
    heapq.heapify(loads)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        shares[r].append(i)
        heapq.heappush(loads, (load + costs[i], r))
    return [sorted(share) for share in shares]


def _imbalance(costs: list[int], shares: list[list[int]]) -> float:
    return _spread([sum(costs[i] for i in share) for share in shares])


def _spread(loads: list[int]) -> float:
    """The largest load over the mean, minus 1."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean - 1 if mean else 0.0


def _parts_needed(costs: list[int], cap: int) -> int:
    parts, acc = 0, cap + 1
    for c in costs:
        if acc + c > cap:
            parts, acc = parts + 1, 0
        acc += c
    return parts


def _min_capacity(costs: list[int], parts: int) -> int:
    """Smallest largest-share over all splits of ``costs`` into ``parts`` contiguous runs."""
    lo, hi = max(costs, default=0), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if _parts_needed(costs, mid) <= parts:
            hi = mid
        else:
            lo = mid + 1
    return lo


def rank_loads(plan: Plan, assignment: list[list[int]]) -> list[int]:
    """Each rank's estimated nanoseconds, as ``assign_tensors`` balances them: the ``group_cost``
    of each ``work_groups`` group it holds (a tensor's ``tensor_cost``, but an fp8 output's values
    and scales, always on one rank, cost one merge)."""
    rank_of = {i: r for r, share in enumerate(assignment) for i in share}
    loads = [0] * len(assignment)
    for g, cost in costed_groups(plan):
        loads[rank_of[g[0]]] += cost
    return loads


def rank_work(plan: Plan, assignment: list[list[int]]) -> list[RankWork]:
    """Each rank's estimated bytes, operations, time and working memory, for ``distmerge plan``."""
    method = methods.get(plan.method)
    work = []
    for share in assignment:
        tensors = [plan.tensors[i] for i in share]
        nbytes, flops = sum(map(tensor_bytes, tensors)), sum(tensor_flops(method, t) for t in tensors)
        memory = max((_working_bytes(method, t) for t in tensors), default=0)
        work.append(RankWork(len(tensors), nbytes, flops, estimated_seconds(nbytes, flops), memory))
    return work


def imbalance(plan: Plan, assignment: list[list[int]]) -> float:
    """Largest rank's estimated time (``rank_loads``) over the mean, minus 1 (0.05 = the busiest
    rank does 5% more)."""
    return _spread(rank_loads(plan, assignment))

"""What distmerge knows about model architectures, in one place.

A decoder-only transformer checkpoint, whatever its family, is: tensors before the layers
(token and position embeddings), one stack of numbered layers, and tensors after them (the
final norm, the LM head). Recipes slice and stack layers, vocabularies re-index the
embedding rows, configs count the layers: the planner (:mod:`distmerge.plan`), the
vocabulary code (:mod:`distmerge.vocab`), the checkpoint reader (:mod:`distmerge.sources`)
and :mod:`distmerge.verify` all ask here, by tensor name and config key, so that a new
family's names are taught once.

Names covered: Llama/Mistral/Qwen (``model.layers.N``, ``embed_tokens``, ``lm_head``),
GPT-2/GPT-J (``transformer.h.N``, ``wte``, ``wpe``), BLOOM/Falcon (``word_embeddings``),
GPT-NeoX (``gpt_neox.layers.N``, ``embed_in``, ``embed_out``), MPT/OLMo (``blocks.N``).

Multimodal checkpoints (LLaVA, Qwen2-VL, Gemma 3, Mistral 3) hold more stacks: a vision (or
audio) encoder and a projector beside the text decoder. The text decoder is *the* layer stack
(the one recipes' ``layer_range`` addresses, counted at ``text_config.num_hidden_layers`` when
the config nests it); the encoder modules' tensors, their own layers included, are merged like
embeddings: they feed the decoder's input, so a frankenmerge takes them from its first slice's
models. :func:`layer_stacks` lists every stack with its own count and config key.

mergekit's ``modules:`` recipes address these parts by name (its architecture definitions for
Mistral 3, Gemma 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Llama 4): ``text_decoder`` (the text
stack with its embeddings, final norm and LM head), ``vision_tower`` (``vision_model`` in
Llama 4) and ``multi_modal_projector`` (Qwen-VL's ``visual.merger``, which sits inside its
vision tower, included). :func:`module_of` names a tensor's module; LLaVA, which mergekit
infers as one ``default`` module, gets the names of its Mistral 3 sibling.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "LAYER_KEYS", "LayerName", "split_layer_name", "layer_index", "comes_before_layers", "is_vocab_tensor",
    "layer_count", "set_layer_count", "Stack", "layer_stacks", "is_encoder_tensor", "text_section", "stack_layer_name", "layer_count_key",
    "TEXT_MODULE", "module_of", "module_names", "after_encoder_layers", "ENCODER_LAYER_LISTS", "TEXT_LAYER_INDEX_LISTS",
    "layer_lists", "moe_rule",
]  # fmt: skip

_LAYER = re.compile(r"^(?P<prefix>(?:.+?\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
# The first ``layers``/``h``/``blocks`` segment followed by a number is the stack, so an
# expert list inside a layer (``mlp.experts.3``) is not taken for a stack of its own.
_BEFORE_LAYERS = re.compile(r"(^|\.)(embed(?!_out)\w*|wte|wpe|word_embeddings)(\.|$)")
# (GPT-NeoX's ``embed_out`` is its LM head, after the layers.)
_ENCODER = re.compile(
    r"^(?:model\.)?(?P<module>vision_tower|visual|vision_model|vision_encoder|multi_modal_projector|mm_projector"
    r"|audio_tower|audio_encoder|embed_vision|embed_audio)\."
)
# The modules of a multimodal checkpoint that encode images or audio and project them into the
# text decoder (LLaVA and Gemma 3 ``vision_tower``/``multi_modal_projector``, Qwen2-VL ``visual``).
_ENCODER_CONFIGS = {"vision": ("vision_config", ("depth", "num_hidden_layers", "num_layers")),
                    "audio": ("audio_config", ("num_hidden_layers", "encoder_layers", "num_layers"))}
# Where a config keeps an encoder stack's layer count: Qwen2-VL ``vision_config.depth``,
# LLaVA/Gemma 3 ``vision_config.num_hidden_layers``.
_PROJECTOR = re.compile(r"^(?:model\.)?(?:multi_modal_projector|mm_projector|visual\.merger|visual\.deepstack_merger_list)\.")
# mergekit's multi_modal_projector module: LLaVA/Mistral 3/Gemma 3/Llama 4's projector, and
# Qwen-VL's patch merger (and Qwen3-VL's deepstack mergers) inside the ``visual`` tower.
_AFTER_ENCODER_LAYERS = re.compile(r"\.(?:post_layernorm|layernorm_post|ln_post|vision_adapter|head)\.")
# An encoder's tensors after its layers (mergekit's post_weights: Gemma 3's post_layernorm,
# Llama 4's layernorm_post and vision_adapter); the rest of an encoder comes before its layers.
ENCODER_LAYER_LISTS = ("fullatt_block_indexes", "deepstack_visual_indexes")
"""vision_config keys that list an encoder's layers by index (Qwen2.5-VL, Qwen3-VL)."""
TEXT_LAYER_INDEX_LISTS = ("moe_layers", "mlp_only_layers")
"""Text config keys that list decoder layers by index, not one value per layer (Llama 4's
``moe_layers``, Qwen2-MoE/Qwen3-MoE's ``mlp_only_layers``): a frankenmerge rewrites them as the
output layers whose source layer was listed, however long the list is."""
TEXT_MODULE = "text_decoder"
_VOCAB = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|word_embeddings|lm_head|embed_out)\.weight$")

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""config.json keys that hold the layer count, in the order they are looked for."""


class LayerName(NamedTuple):
    """A layer tensor's name, split: ``model.layers`` + 3 + ``self_attn.q_proj.weight``."""

    stack: str
    index: int
    rest: str


class Stack(NamedTuple):
    """One stack of numbered layers: ``visual.blocks`` of the ``vision`` encoder, with the
    count the config gives at ``vision_config.depth``."""

    prefix: str
    role: str
    """``text`` (the decoder that ``layer_range`` addresses), ``vision`` or ``audio``."""
    key: str | None
    """The config key of its layer count, dotted when nested; None when the config has none."""
    count: int | None


def is_encoder_tensor(name: str) -> bool:
    """A tensor of a multimodal checkpoint's vision or audio encoder or projector."""
    return bool(_ENCODER.match(name))


def module_of(name: str) -> str:
    """The mergekit module a tensor of a multimodal checkpoint belongs to: ``text_decoder``,
    ``vision_tower`` (``vision_model`` for Llama 4's), ``audio_tower`` or ``multi_modal_projector``."""
    m = _ENCODER.match(name)
    if m is None:
        return TEXT_MODULE
    if _PROJECTOR.match(name) or m["module"] in ("embed_vision", "embed_audio"):
        return "multi_modal_projector"
    if m["module"] == "vision_model":
        return "vision_model"
    return "audio_tower" if "audio" in m["module"] else "vision_tower"


def module_names(names) -> list[str]:
    """The modules of a checkpoint with these tensors, text decoder first: ``default`` alone for
    a language model (as mergekit names its one module)."""
    found = {module_of(n) for n in names}
    if found <= {TEXT_MODULE}:
        return ["default"]
    return sorted(found, key=lambda m: (m != TEXT_MODULE, m))


def after_encoder_layers(name: str) -> bool:
    """An encoder tensor that comes after the encoder's layers (taken from the last slice's
    models when a ``modules:`` recipe slices the encoder)."""
    return bool(_AFTER_ENCODER_LAYERS.search(name))


def stack_layer_name(name: str) -> LayerName | None:
    """Like :func:`split_layer_name`, for a layer of any stack, an encoder's included."""
    m = _LAYER.match(name)
    return LayerName(m["prefix"], int(m["index"]), m["rest"]) if m else None


def layer_stacks(config: dict, names) -> list[Stack]:
    """Every layer stack among a checkpoint's tensor names, in order of first appearance, each
    with its role and the layer count its config gives (``text_config.num_hidden_layers``,
    ``vision_config.depth``, GPT-2's ``n_layer``, ...)."""
    stacks: dict[str, Stack] = {}
    for name in names:
        layer = stack_layer_name(name)
        if layer is None or layer.stack in stacks:
            continue
        m = _ENCODER.match(name)
        role = "text"
        if m:
            role = "audio" if "audio" in m["module"] else "vision"
        if role == "text":
            key = layer_count_key(config)
            stacks[layer.stack] = Stack(layer.stack, role, key, _get(config, key))
        else:
            section, keys = _ENCODER_CONFIGS[role]
            sub = config.get(section) if isinstance(config.get(section), dict) else {}
            key = next((k for k in keys if sub.get(k) is not None), None)
            stacks[layer.stack] = Stack(layer.stack, role, key and f"{section}.{key}", key and sub[key])
    return list(stacks.values())


def layer_count_key(config: dict) -> str | None:
    """The key of the text decoder's layer count: top-level first, then ``text_config``."""
    key = next((k for k in LAYER_KEYS if config.get(k) is not None), None)
    if key is None and isinstance(config.get("text_config"), dict):
        key = next((f"text_config.{k}" for k in LAYER_KEYS if config["text_config"].get(k) is not None), None)
    return key


def text_section(config: dict) -> dict:
    """The part of a config that describes the text decoder (its layer count, its per-layer
    lists such as ``layer_types``): ``text_config`` when the count is nested there, else the
    config itself."""
    key = layer_count_key(config)
    return config["text_config"] if key and key.startswith("text_config.") else config


def layer_lists(section: dict) -> dict:
    """A text config section with the per-layer settings it leaves to defaults spelled out, as
    transformers derives them: Llama 4's ``moe_layers`` (from ``interleave_moe_layer_step``),
    ``no_rope_layers`` (from ``no_rope_layer_interval``) and ``layer_types`` (chunked attention
    where RoPE is on). Hub configs (Llama-4-Scout's) leave them out; a frankenmerge must write
    them for its new layer order, since the defaults for a new layer count would differ."""
    out = dict(section)
    n = layer_count(section)
    if n is None or section.get("model_type") != "llama4_text":
        return out
    if out.get("moe_layers") is None:
        step = out.get("interleave_moe_layer_step", 1)
        out["moe_layers"] = list(range(step - 1, n, step))
    if not out.get("no_rope_layers"):
        interval = out.get("no_rope_layer_interval", 4)
        out["no_rope_layers"] = [int((i + 1) % interval != 0) for i in range(n)]
    if out.get("layer_types") is None:
        chunked = "attention_chunk_size" not in out or out["attention_chunk_size"] is not None  # transformers' default is 8192
        out["layer_types"] = ["chunked_attention" if no_rope and chunked else "full_attention" for no_rope in out["no_rope_layers"]]
    return out


def moe_rule(section: dict):
    """Which layers a text config's scalar rule makes MoE, as transformers builds them, or None
    for a config without one: DeepSeek-V2/V3 (and GLM-4-MoE, dots1) ``i >= first_k_dense_replace``;
    Qwen2-MoE/Qwen3-MoE ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``. A
    frankenmerge that moves a layer must keep it MoE or dense under the output's rule."""
    if section.get("first_k_dense_replace") is not None:
        k = section["first_k_dense_replace"]
        return lambda i: i >= k
    if section.get("decoder_sparse_step") is not None and section.get("num_experts"):
        step, dense = section["decoder_sparse_step"], set(section.get("mlp_only_layers") or ())
        return lambda i: i not in dense and (i + 1) % step == 0
    return None


def _get(config: dict, key: str | None):
    for part in key.split(".") if key else ():
        config = config.get(part) if isinstance(config, dict) else None
    return config if key else None


def split_layer_name(name: str) -> LayerName | None:
    """The stack, layer index and rest of a text decoder layer's name; None for any other
    tensor (an encoder's layers included: they are merged like the embeddings)."""
    return None if _ENCODER.match(name) else stack_layer_name(name)


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, None outside the layer stack."""
    layer = split_layer_name(name)
    return layer.index if layer else None


def comes_before_layers(name: str) -> bool:
    """A non-layer tensor that comes before the layers (token or position embeddings), which a
    frankenmerge takes from its first slice's models; every other non-layer tensor (final norm,
    LM head) comes after the layers, from the last slice's."""
    return bool(_BEFORE_LAYERS.search(name) or _ENCODER.match(name))


def is_vocab_tensor(name: str) -> bool:
    """A tensor with one row per token (input embeddings, LM head), re-indexed when the
    recipe merges vocabularies."""
    return bool(_VOCAB.search(name))


def layer_count(config: dict) -> int | None:
    """The text decoder's layer count a config.json states (the first of LAYER_KEYS that is
    set, at the top level or else in ``text_config``), or None."""
    return _get(config, layer_count_key(config))


def set_layer_count(config: dict, n: int) -> None:
    """Set the text decoder's layer count under the key the config already uses (``n_layer``
    for GPT-2, ``num_hidden_layers`` for Llama, ``text_config.num_hidden_layers`` for a
    VLM), ``num_hidden_layers`` when it has none; no other key is added."""
    *parents, last = (layer_count_key(config) or "num_hidden_layers").split(".")
    for part in parents:
        config = config[part]
    config[last] = n

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
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "LAYER_KEYS", "LayerName", "split_layer_name", "layer_index", "comes_before_layers", "is_vocab_tensor",
    "layer_count", "set_layer_count",
]  # fmt: skip

_LAYER = re.compile(r"^(?P<prefix>(?:.+?\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
# The first ``layers``/``h``/``blocks`` segment followed by a number is the stack, so an
# expert list inside a layer (``mlp.experts.3``) is not taken for a stack of its own.
_BEFORE_LAYERS = re.compile(r"(^|\.)(embed(?!_out)\w*|wte|wpe|word_embeddings)(\.|$)")
# (GPT-NeoX's ``embed_out`` is its LM head, after the layers.)
_VOCAB = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|word_embeddings|lm_head|embed_out)\.weight$")

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""config.json keys that hold the layer count, in the order they are looked for."""


class LayerName(NamedTuple):
    """A layer tensor's name, split: ``model.layers`` + 3 + ``self_attn.q_proj.weight``."""

    stack: str
    index: int
    rest: str


def split_layer_name(name: str) -> LayerName | None:
    """The stack, layer index and rest of a layer tensor's name; None for any other tensor."""
    m = _LAYER.match(name)
    return LayerName(m["prefix"], int(m["index"]), m["rest"]) if m else None


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, None outside the layer stack."""
    layer = split_layer_name(name)
    return layer.index if layer else None


def comes_before_layers(name: str) -> bool:
    """A non-layer tensor that comes before the layers (token or position embeddings), which a
    frankenmerge takes from its first slice's models; every other non-layer tensor (final norm,
    LM head) comes after the layers, from the last slice's."""
    return bool(_BEFORE_LAYERS.search(name))


def is_vocab_tensor(name: str) -> bool:
    """A tensor with one row per token (input embeddings, LM head), re-indexed when the
    recipe merges vocabularies."""
    return bool(_VOCAB.search(name))


def layer_count(config: dict) -> int | None:
    """The layer count a config.json states (the first of LAYER_KEYS that is set), or None."""
    return next((config[k] for k in LAYER_KEYS if config.get(k) is not None), None)


def set_layer_count(config: dict, n: int) -> None:
    """Set the layer count under the key the config already uses (``n_layer`` for GPT-2,
    ``num_hidden_layers`` for Llama), ``num_hidden_layers`` when it has none."""
    key = next((k for k in LAYER_KEYS if config.get(k) is not None), "num_hidden_layers")
    config[key] = n

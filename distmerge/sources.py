"""Find input checkpoints (local directories or hub repos) and read their headers.

Planning needs only names, dtypes, shapes and byte ranges, which live in the
safetensors headers; tensor data is read later, while merging. Configs are read as
JSON data: no model code is ever imported or run.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field

from distmerge.architecture import LAYER_KEYS, layer_count, layer_count_key
from distmerge.errors import MergeError
from distmerge.io import quantized
from distmerge.io.header import DTYPE_NAMES, TensorEntry, itemsize, read_header, read_small
from distmerge.io.zero import ZeroCheckpoint, find_tag, is_zero_checkpoint

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "consolidated.00.pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
"""What a hub download fetches: weights, configs, tokenizer files. Never code or pickles."""
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COUNT_KEYS = (*LAYER_KEYS, "vocab_size")
"""Config values the planner counts with: when present (and not null), whole numbers in [0, 2**63)."""
MAX_JSON_BYTES = 256 * 2**20
"""Largest JSON file read (configs, indexes, tokenizer configs are KBs to a few MB)."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One input tensor: which file of the checkpoint holds it, and where."""

    file: str
    """File name relative to the checkpoint directory."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    """Byte range in a safetensors file; for a pickle file (``--allow-pickle``) just
    [0, nbytes): such tensors are found by name."""
    lora: dict | None = None
    """A LoRA delta to add while reading (see ``attach_adapter``)."""
    quant: dict | None = None
    """A quantized tensor, dequantized while reading (``distmerge.io.quantized``): its format,
    block, and the data's and scales' (file, dtype, shape, begin, end); ``dtype`` and
    ``shape`` are then the dequantized tensor's, ``file``/``begin``/``end`` its data's."""


@dataclass(slots=True)
class Checkpoint:
    """A model as the plan sees it: its config and its tensors' headers."""

    ref: str
    """The model as the recipe names it (a path or a hub id)."""
    path: str
    """Local directory holding the files."""
    config: dict
    tensors: dict[str, TensorInfo] = field(repr=False)
    adapter_path: str | None = None
    """Local directory of a LoRA adapter applied on the fly (``model+adapter``)."""
    quant: dict | None = None
    """For a quantized checkpoint: its format, block and the scale tensors consumed to
    dequantize its tensors (``distmerge.io.quantized.fold``); None otherwise."""

    @property
    def num_layers(self) -> int | None:
        """The config's layer count (``load_checkpoint`` refuses one that is not a whole number)."""
        return layer_count(self.config)


def read_json(path: str, kind: str = "object") -> dict:
    """The JSON object in the regular file ``path``, read as UTF-8.

    Raises MergeError naming the file for anything else: missing or unreadable, a FIFO or
    device (never opened for blocking reads), larger than MAX_JSON_BYTES, not UTF-8, invalid
    or too deeply nested JSON, or a JSON value that is not an object.
    """
    try:
        raw = read_small(path, MAX_JSON_BYTES, f"a JSON {kind}")
    except OSError as e:
        raise MergeError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save or re-download it") from None
    except RecursionError:
        raise MergeError(f"{path}: its JSON is nested too deeply to be a {kind}; re-download it") from None
    except ValueError as e:  # JSONDecodeError, integers of too many digits
        raise MergeError(f"{path}: invalid JSON ({' '.join(str(e).split())}); re-download or fix it") from None
    if not isinstance(value, dict):
        raise MergeError(f"{path}: holds a JSON {_json_kind(value)}, not the JSON object a {kind} is; re-download or fix it")
    return value


def _json_kind(value: object) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def split_revision(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); mergekit's model reference syntax."""
    if "@" in ref and not os.path.exists(ref):
        name, _, rev = ref.rpartition("@")
        return name, rev or None
    return ref, None


def resolve(ref: str, base_dir: str = ".", local_only: bool = False) -> str:
    """A local directory for ``ref``: the directory itself, or a hub snapshot.

    Relative paths are taken relative to ``base_dir`` (the recipe's directory) first,
    then to the current directory, as users expect from either.
    """
    for candidate in (os.path.join(base_dir, ref), ref):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
        if os.path.exists(candidate):
            raise MergeError(f"model {ref!r}: {candidate} is a file; a model is a directory with config.json")
    name, revision = split_revision(ref)
    looks_local = ref.startswith((".", "/", "~")) or not REPO_ID.match(name)
    if looks_local:
        raise MergeError(f"model {ref!r}: no such directory (looked in {os.path.abspath(base_dir)} and {os.getcwd()})")
    return _download(name, revision, local_only)


def is_hub_ref(ref: str, base_dir: str = ".") -> bool:
    """True when ``ref`` names a hub repo rather than a local directory."""
    if os.path.exists(os.path.join(base_dir, ref)) or os.path.exists(ref):
        return False
    name, _ = split_revision(ref)
    return not ref.startswith((".", "/", "~")) and bool(REPO_ID.match(name))


def _download(repo_id: str, revision: str | None, local_only: bool = False) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=local_only)
    except LocalEntryNotFoundError:
        raise MergeError(
            f"model {repo_id!r}: not in the Hugging Face cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network); download it first with "
            f"`huggingface-cli download {repo_id}` or give a local path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise MergeError(f"model {repo_id!r}: cannot fetch it from the hub: {e}") from None


def is_pickle(file: str) -> bool:
    """True for tensors found by name in a pickle (``--allow-pickle``): a ``.bin``/``.pt``
    file, or a DeepSpeed ZeRO checkpoint, whose ``file`` is its tag directory (``global_step500/``)."""
    return file.endswith(PICKLE_SUFFIXES) or is_zero(file)


def is_zero(file: str) -> bool:
    return file.endswith("/")


def load_checkpoint(ref: str, base_dir: str = ".", allow_pickle: bool = False, local_only: bool = False) -> Checkpoint:
    """Resolve ``ref`` and read its config and every tensor header. No tensor data is read.

    Pickle checkpoints are refused unless ``allow_pickle``; even then they are opened with
    ``torch.load(weights_only=True)``, which rebuilds tensors but never runs pickled code.
    With ``local_only``, hub models come from the local cache only (another rank fetched them).
    ``model+adapter`` applies a PEFT LoRA adapter to the model's weights while they are read.
    """
    if "+" in ref and not os.path.exists(os.path.join(base_dir, ref)) and not os.path.exists(ref):
        model_ref, adapter_ref = ref.split("+", 1)
        ck = load_checkpoint(model_ref, base_dir, allow_pickle, local_only)
        ck.ref = ref
        return attach_adapter(ck, resolve(adapter_ref, base_dir, local_only))
    path = resolve(ref, base_dir, local_only)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise MergeError(f"model {ref!r}: {path} has no config.json; is it a Hugging Face model directory?")
    config = read_json(config_path, "model config")
    for key in COUNT_KEYS:
        value = config.get(key)
        if value is not None and (type(value) is not int or not 0 <= value < 2**63):
            raise MergeError(f"model {ref!r}: {config_path}: {key} is {value!r}, not a whole number; fix config.json")
    nested = layer_count(config)  # a VLM's text_config.num_hidden_layers
    if nested is not None and (type(nested) is not int or not 0 <= nested < 2**63):
        raise MergeError(f"model {ref!r}: {config_path}: {layer_count_key(config)} is {nested!r}, not a whole number; fix config.json")
    tensors: dict[str, TensorInfo] = {}
    files = _weight_files(ref, path, allow_pickle)
    if any(is_pickle(f) for f in files):
        tensors = _pickle_tensors(ref, path, files)
        _check_layer_count(ref, config_path, config, tensors)
        return Checkpoint(ref=ref, path=path, config=config, tensors=tensors)
    for file, names in files.items():
        entries, _ = read_header(os.path.join(path, file))
        missing = [n for n in names if n not in entries] if names is not None else []
        if missing:
            raise MergeError(
                f"model {ref!r}: {INDEX_FILE} puts {missing[0]!r} in {file}, but that file does not contain it"
            )
        for name in names if names is not None else entries:
            if name in tensors:
                raise MergeError(f"model {ref!r}: tensor {name!r} is stored twice ({tensors[name].file} and {file})")
            tensors[name] = _info(file, entries[name])
    tensors, quant = quantized.fold(ref, config, tensors)
    _check_layer_count(ref, config_path, config, tensors)
    return Checkpoint(ref=ref, path=path, config=config, tensors=tensors, quant=quant)


def _check_layer_count(ref: str, config_path: str, config: dict, tensors: dict) -> None:
    """Every layer has at least one tensor: a layer count beyond the tensor count is a
    corrupt config (and would have the planner walk through that many layers)."""
    n = layer_count(config)
    if n is not None and n > len(tensors):
        raise MergeError(
            f"model {ref!r}: {config_path} says {n} layers but the checkpoint holds only {len(tensors)} tensors; fix config.json"
        )


def attach_adapter(ck: Checkpoint, adapter_path: str) -> Checkpoint:
    """Attach a PEFT LoRA adapter: every targeted weight W is read as W + s·B·A, with
    s = lora_alpha / r (lora_alpha / √r with rslora), per module where the config has a
    rank_pattern or alpha_pattern, as PEFT's merge_and_unload computes it. An adapter that also
    holds whole tensors (modules_to_save) is refused: they are not applied here."""
    config_path = os.path.join(adapter_path, "adapter_config.json")
    config = read_json(config_path, "adapter config")
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if type(r) is not int or r < 1 or type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise MergeError(
            f"adapter {adapter_path}: {config_path} needs r (a positive integer) and lora_alpha (a number), "
            f"got r={r!r}, lora_alpha={alpha!r}"
        )
    if config.get("peft_type", "LORA") != "LORA" or config.get("fan_in_fan_out"):
        raise MergeError(f"adapter {adapter_path}: only plain LoRA adapters are supported (peft_type LORA, fan_in_fan_out false)")
    file = "adapter_model.safetensors"
    if not os.path.exists(os.path.join(adapter_path, file)):
        raise MergeError(f"adapter {adapter_path}: no {file} (pickled adapters are not read)")
    entries, _ = read_header(os.path.join(adapter_path, file))
    prefix = "base_model.model."
    pairs: dict[str, dict] = {}
    whole = []
    for key, e in entries.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        part = next((p for p in ("lora_A", "lora_B") if f".{p}." in name), None)
        if part is None:
            whole.append(name)
            continue
        target = name.replace(f".{part}.", ".").replace(".default.", ".")
        pairs.setdefault(target, {})[part] = [file, e.dtype, list(e.shape), e.begin, e.end]
    if whole:  # modules_to_save: whole tensors that replace the model's; not applied here
        raise MergeError(
            f"adapter {adapter_path}: {file} holds {len(whole)} whole tensor(s) besides LoRA pairs "
            f"({', '.join(sorted(whole)[:3])}{', ...' if len(whole) > 3 else ''}: modules_to_save), which distmerge's "
            "model+adapter input does not apply; merge the adapter into its model with PEFT first (merge_and_unload), "
            "or extract it with distmerge extract-lora --skip-full"
        )
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    tensors = dict(ck.tensors)
    for target, ab in sorted(pairs.items()):
        if target not in tensors or set(ab) != {"lora_A", "lora_B"}:
            raise MergeError(f"adapter {adapter_path}: {target!r} has no matching weight (or lacks lora_A/lora_B) in {ck.ref!r}")
        w = tensors[target]
        out, rank_b = ab["lora_B"][2]
        rank_a, inp = ab["lora_A"][2]
        if (out, inp) != tuple(w.shape) or rank_a != rank_b:
            raise MergeError(f"adapter {adapter_path}: B{[out, rank_b]}·A{[rank_a, inp]} does not fit {target!r} of shape {list(w.shape)}")
        module = target.removesuffix(".weight")
        r_t, alpha_t = _peft_pattern(rank_pattern, module, r), _peft_pattern(alpha_pattern, module, alpha)
        if rank_a != r_t:
            raise MergeError(f"adapter {adapter_path}: {target!r} has LoRA rank {rank_a}, but {config_path} gives it r={r_t}")
        scale = alpha_t / r_t**0.5 if config.get("use_rslora") else alpha_t / r_t
        lora = {"a": ab["lora_A"], "b": ab["lora_B"], "scale": scale}
        tensors[target] = TensorInfo(w.file, w.dtype, w.shape, w.begin, w.end, lora, w.quant)
    ck.tensors, ck.adapter_path = tensors, adapter_path
    return ck


def _peft_pattern(patterns: dict, module: str, default):
    """PEFT's per-module ``rank_pattern``/``alpha_pattern`` value for ``module``: the longest key
    (a name or regex) that matches the end of its dotted name; ``default`` when none does."""
    keys = [k for k in patterns if re.fullmatch(rf"(?:.*\.)?(?:{k})", module)]
    return patterns[max(keys, key=len)] if keys else default


def _info(file: str, e: TensorEntry) -> TensorInfo:
    return TensorInfo(file=file, dtype=e.dtype, shape=e.shape, begin=e.begin, end=e.end)


def load_pickled(path: str) -> dict:
    """A pickle checkpoint's tensors, memory-mapped, through the safe unpickler."""
    import torch

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block torch.load forever
            raise MergeError(f"{path}: not a regular file; distmerge reads only regular files")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except MergeError:
        raise
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise MergeError(f"{path}: cannot load it with torch.load(weights_only=True): {e}") from None


def _pickle_tensors(ref: str, path: str, files: dict[str, list[str] | None]) -> dict[str, TensorInfo]:
    tensors = {}
    for file in files:
        if is_zero(file):
            zero = ZeroCheckpoint(os.path.join(path, file))
            for name, (dtype, shape) in zero.tensors().items():
                tensors[name] = TensorInfo(file=file, dtype=dtype, shape=shape, begin=0, end=math.prod(shape) * itemsize(dtype))
            continue
        state = load_pickled(os.path.join(path, file))
        for name, t in state.items():
            if name in tensors:
                raise MergeError(f"model {ref!r}: tensor {name!r} is stored twice")
            nbytes = t.numel() * t.element_size()
            tensors[name] = TensorInfo(file=file, dtype=DTYPE_NAMES[t.dtype], shape=tuple(t.shape), begin=0, end=nbytes)
    return tensors


def _weight_files(ref: str, path: str, allow_pickle: bool = False) -> dict[str, list[str] | None]:
    """{file: tensor names it holds per the index, or None for "all of them"}."""
    index_path = os.path.join(path, INDEX_FILE)
    if not os.path.exists(index_path) and not os.path.exists(os.path.join(path, SINGLE_FILE)) and allow_pickle:
        index_path = os.path.join(path, PICKLE_INDEX)
        if not os.path.exists(index_path):
            pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(path, p))]
            if pickles:
                return {pickles[0]: None}
    if os.path.exists(index_path):
        weight_map = read_json(index_path, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise MergeError(
                f"model {ref!r}: {index_path}: weight_map is a {_json_kind(weight_map)}, not an object "
                "mapping tensor names to files; re-download the index"
            )
        files: dict[str, list[str] | None] = {}
        for name, file in sorted(weight_map.items()):
            if not isinstance(file, str) or not file or os.path.isabs(file) or ".." in file.replace("\\", "/").split("/"):
                raise MergeError(
                    f"model {ref!r}: {INDEX_FILE} names {file!r} for {name!r}, which is outside the model "
                    "directory; refusing to read it"
                )
            if not os.path.exists(os.path.join(path, file)):
                raise MergeError(f"model {ref!r}: shard {file!r} named by {INDEX_FILE} is missing")
            files.setdefault(file, []).append(name)
        return files
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return {SINGLE_FILE: None}
    if is_zero_checkpoint(path):
        tag = find_tag(path)
        if allow_pickle:
            return {tag + "/": None}
        raise MergeError(
            f"model {ref!r}: is a DeepSpeed ZeRO checkpoint ({tag}/), whose files are pickles; distmerge "
            "reads them only with --allow-pickle (then with torch.load(weights_only=True), which rebuilds "
            "tensors and never runs code from the file). Or convert it first with DeepSpeed's "
            "zero_to_fp32.py --safe_serialization"
        )
    pickles = [p for p in (*PICKLE_FILES, PICKLE_INDEX) if os.path.exists(os.path.join(path, p))]
    if pickles:
        raise MergeError(
            f"model {ref!r}: has only pickle weights ({pickles[0]}); distmerge reads safetensors by "
            "default, because unpickling can run arbitrary code. Convert the model to safetensors, or pass "
            "--allow-pickle to load it with torch.load(weights_only=True)"
        )
    raise MergeError(f"model {ref!r}: {path} has no {SINGLE_FILE} or {INDEX_FILE}")

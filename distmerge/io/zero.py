"""Read DeepSpeed ZeRO checkpoints (stages 1, 2 and 3) tensor by tensor.

This is what a DeepSpeed fine-tune leaves behind (a Hugging Face Trainer
``checkpoint-N/`` directory, or ``engine.save_checkpoint(DIR)``)::

    DIR/latest                              names the tag, e.g. "global_step500"
    DIR/global_step500/*_model_states.pt    parameter names and shapes, buffers, frozen params
    DIR/global_step500/*_optim_states.pt    one per data-parallel rank: that rank's slice
                                            of the float32 master weights (and Adam's moments)

The master weights are the fine-tune's real result (the bf16 module weights are their
rounding), so they are what distmerge merges, as DeepSpeed's own ``zero_to_fp32`` does.
The layout follows DeepSpeed's reconstruction (``deepspeed.utils.zero_to_fp32``):

- stage 1/2: for each parameter group, the ranks' partitions concatenated form one flat
  vector holding the group's parameters one after another (plus alignment padding);
- stage 3: every parameter is split on its own into ``ceil(numel / world)`` elements per
  rank (the last rank padded); each rank stores its pieces one after another.

Unlike ``zero_to_fp32``, nothing here unpickles arbitrary objects: files are opened with
``torch.load(weights_only=True, mmap=True)``, allowing only the few plain DeepSpeed classes
these files hold, and a tensor is assembled from its slices only when it is read, so memory
stays at one tensor (Adam's moments are mapped, never touched).
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass

import torch

from distmerge.errors import MergeError
from distmerge.io.header import DTYPE_NAMES

LATEST = "latest"
OPTIM_FILES = "*_optim_states.pt"
MODEL_FILES = "*_model_states.pt"


def is_zero_checkpoint(path: str) -> bool:
    """A directory DeepSpeed's ``save_checkpoint`` wrote (it has ``latest``, or a
    ``global_step*`` directory with optimizer state files)."""
    return os.path.isfile(os.path.join(path, LATEST)) or bool(_tag_dirs(path))


def _tag_dirs(path: str) -> list[str]:
    return sorted(os.path.basename(os.path.dirname(f)) for f in glob.glob(os.path.join(path, "*", OPTIM_FILES)))


def find_tag(path: str) -> str:
    """The checkpoint tag to read: the one ``latest`` names, else the only one there is."""
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not tag or os.path.isabs(tag) or ".." in tag.split("/"):
            raise MergeError(f"{latest}: names {tag!r}, which is not a checkpoint directory inside {path}")
        if not os.path.isdir(os.path.join(path, tag)):
            raise MergeError(f"{latest}: names {tag!r}, but {os.path.join(path, tag)} does not exist")
        return tag
    tags = sorted(set(_tag_dirs(path)))
    if len(tags) != 1:
        raise MergeError(
            f"{path}: holds ZeRO checkpoints {', '.join(tags)} and no {LATEST!r} file saying which to "
            f"read; write the tag to {latest}"
        )
    return tags[0]


def _natural(path: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", os.path.basename(path))]


def _safe_globals() -> list:
    """The DeepSpeed classes a ZeRO checkpoint pickles besides tensors and containers.
    They are rebuilt as plain objects (no code of the file's runs); any other class makes
    the load fail, naming it."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        raise MergeError(
            "reading DeepSpeed ZeRO checkpoints needs the deepspeed package: pip install 'distmerge[deepspeed]'"
        ) from None
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(file: str) -> dict:
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... for bad files
            raise MergeError(f"{file}: cannot load it safely with torch.load(weights_only=True): {e}") from None


def _pieces(flat: list[torch.Tensor], begin: int, end: int) -> list[torch.Tensor]:
    """Views of elements [begin, end) of the concatenation of ``flat``, without making it."""
    out, start = [], 0
    for t in flat:
        stop = start + t.numel()
        if begin < stop and end > start:
            out.append(t[max(begin - start, 0) : min(end, stop) - start])
        start = stop
    if sum(p.numel() for p in out) != end - begin:
        raise MergeError(f"ZeRO checkpoint: elements [{begin}, {end}) lie past the end of the saved partitions")
    return out


@dataclass(frozen=True, slots=True)
class _Param:
    shape: tuple[int, ...]
    group: int
    """Parameter group (stage 1/2); unused for stage 3."""
    offset: int
    """Stage 1/2: first element in the group's flat vector. Stage 3: first element of this
    parameter's piece in each rank's flat storage."""


class ZeroCheckpoint:
    """One ZeRO checkpoint tag directory: names, shapes and float32 values of its tensors."""

    def __init__(self, tag_dir: str):
        self.dir = tag_dir
        model_files = sorted(glob.glob(os.path.join(tag_dir, MODEL_FILES)), key=_natural)
        optim_files = sorted(glob.glob(os.path.join(tag_dir, OPTIM_FILES)), key=_natural)
        if not model_files or not optim_files:
            raise MergeError(f"{tag_dir}: no {MODEL_FILES} and {OPTIM_FILES} files; is it a ZeRO checkpoint?")
        models = [_load(f) for f in model_files]
        optims = [_load(f)["optimizer_state_dict"] for f in optim_files]
        try:
            self.stage = int(optims[0]["zero_stage"])
            world = optims[0]["partition_count"]
            self.world = max(world) if isinstance(world, list) else int(world)
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{optim_files[0]}: not a ZeRO optimizer state file (no zero_stage/partition_count)") from None
        if len(optims) != self.world:
            raise MergeError(
                f"{tag_dir}: a ZeRO checkpoint of {self.world} ranks needs {self.world} {OPTIM_FILES} files, "
                f"found {len(optims)}; was it saved completely?"
            )
        if self.stage not in (1, 2, 3):
            raise MergeError(f"{tag_dir}: ZeRO stage {self.stage} is not one distmerge can read (1, 2, 3)")
        state = models[0]
        key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        self._flat = [list(o[key]) if isinstance(o[key], (list, tuple)) else [o[key]] for o in optims]
        self._params: dict[str, _Param] = {}
        if self.stage <= 2:
            pads = optims[0].get("param_alignment_paddings")
            for g, shapes in enumerate(state["param_shapes"]):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    self._params[name] = _Param(tuple(shape), g, offset)
                    offset += math.prod(shape) + (pads[g][i] if pads is not None else 0)
        else:
            offset = 0
            for shapes in state["param_shapes"]:
                for name, shape in shapes.items():
                    self._params[name] = _Param(tuple(shape), 0, offset)
                    offset += math.ceil(math.prod(shape) / self.world)
        # Frozen parameters are saved whole (stage 1/2) or as one piece per rank (stage 3).
        self._frozen: dict[str, tuple[tuple[int, ...], list[torch.Tensor]]] = {}
        for name, shape in (state.get("frozen_param_shapes") or {}).items():
            frags = [m["frozen_param_fragments"][name] for m in (models[:1] if self.stage <= 2 else models)]
            self._frozen[name] = (tuple(shape), frags)
        self._buffers = {k: v for k, v in state["module"].items() if k in set(state.get("buffer_names") or ())}
        # Tied weights appear once, under the name their owner has (what save_pretrained keeps).
        shared = dict(state.get("shared_params") or {})
        for alias in shared:
            self._params.pop(alias, None)
            self._frozen.pop(alias, None)
            self._buffers.pop(alias, None)

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{name: (safetensors dtype, shape)} of everything :meth:`read` returns."""
        out = {name: ("F32", p.shape) for name, p in self._params.items()}
        out.update({name: ("F32", shape) for name, (shape, _) in self._frozen.items()})
        for name, b in self._buffers.items():
            out[name] = ("F32" if b.is_floating_point() else DTYPE_NAMES[b.dtype], tuple(b.shape))
        return out

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, assembled from the ranks' partitions (float32 for weights)."""
        if name in self._buffers:
            b = self._buffers[name]
            return b.float() if b.is_floating_point() else b.clone()
        if name in self._frozen:
            shape, frags = self._frozen[name]
            return torch.cat([f.reshape(-1) for f in frags])[: math.prod(shape)].float().view(shape)
        p = self._params[name]
        numel = math.prod(p.shape)
        if self.stage <= 2:
            group = [ranks[p.group] for ranks in self._flat]
            pieces = _pieces(group, p.offset, p.offset + numel)
        else:
            per_rank = math.ceil(numel / self.world)
            pieces = [x for ranks in self._flat for x in _pieces(ranks, p.offset, p.offset + per_rank)]
        return torch.cat(pieces)[:numel].view(p.shape)

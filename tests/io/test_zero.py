"""DeepSpeed ZeRO checkpoints as merge inputs.

The checkpoints are made for real: ``tests/io/zero_finetune.py`` fine-tunes the tiny Llama base
for two steps with DeepSpeed (ZeRO stages 2 and 3, on three ranks, bf16, torchrun on CPU,
``model.norm.weight`` frozen) and saves what a DeepSpeed job leaves behind. DeepSpeed's own
converter (``zero_to_fp32``) is the reference for what the checkpoint holds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distmerge.cli import main
from distmerge.io.zero import ZeroCheckpoint, find_tag
from tests.helpers import assert_same_tensors, load_state
from tests.helpers import REPO_ROOT, child_env
from tests.test_distributed import Proc
from tests.test_faults import Exploit

STAGES = (2, 3)
RANKS = 3
"""Ranks of the fine-tunes: with 3, both stages pad their flat partitions (4096 elements are
not a multiple of 3)."""


pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.slow,
    pytest.mark.needs("deepspeed", "transformers"),  # zero_finetune.py: DeepSpeed fine-tunes a transformers Llama
]
"""The first test here also pays for two real DeepSpeed fine-tunes (see ``zero_checkpoints``)."""


@pytest.fixture(scope="session")
def zero_checkpoints(llama_family, tmp_path_factory) -> dict[int, Path]:
    """{stage: checkpoint directory} of ZeRO fine-tunes of llama_family['base']."""
    root = tmp_path_factory.mktemp("zero")
    out = {stage: root / f"stage{stage}" for stage in STAGES}
    jobs = [str(x) for stage in STAGES for x in (out[stage], stage)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
           str(REPO_ROOT / "tests" / "io" / "zero_finetune.py"), str(llama_family["base"]), *jobs]  # fmt: skip
    # ~30 s alone; it has taken over 200 s beside the other xdist worker on a busy machine
    done = Proc(cmd, child_env({"DS_ACCELERATOR": "cpu"}), root / "finetune").wait(timeout=900)
    assert done.rc == 0, done.tail()
    return out


def deepspeed_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """What DeepSpeed's converter makes of the checkpoint (all float32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.contiguous() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt)).items()}


@pytest.mark.parametrize("stage", STAGES)
def test_zero_reader_gives_deepspeeds_own_reconstruction_tensor_for_tensor(zero_checkpoints, llama_family, stage):
    ckpt = zero_checkpoints[stage]
    zero = ZeroCheckpoint(str(ckpt / find_tag(str(ckpt))))
    ref = deepspeed_state(ckpt)
    base = load_state(llama_family["base"])
    assert (zero.stage, zero.world) == (stage, RANKS)
    assert set(zero.tensors()) == set(ref) == set(base)
    for name, want in ref.items():
        got = zero.read(name)
        assert zero.tensors()[name] == ("F32", tuple(want.shape))
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    # Two Adam steps at lr 1e-2 moved every trained weight; the frozen one kept the base's value.
    assert torch.equal(zero.read("model.norm.weight"), base["model.norm.weight"].float())
    assert not torch.equal(zero.read("model.layers.0.mlp.up_proj.weight"), base["model.layers.0.mlp.up_proj.weight"].float())


@pytest.mark.parametrize("stage", STAGES)
def test_merge_with_a_zero_input_equals_the_merge_of_its_converted_safetensors(zero_checkpoints, llama_family, tmp_path, stage):
    ckpt = zero_checkpoints[stage]
    converted = tmp_path / "converted"
    converted.mkdir()
    save_file(deepspeed_state(ckpt), converted / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(ckpt / "config.json", converted)

    def recipe(ft: Path) -> Path:
        path = tmp_path / f"{ft.name}.yml"
        path.write_text(
            f"merge_method: task_arithmetic\nbase_model: {llama_family['base']}\n"
            f"models:\n  - model: {ft}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {llama_family['ft1']}\n    parameters: {{weight: 0.5}}\n"
            "dtype: float32\nout_dtype: bfloat16\n"
        )
        return path

    main(["run", str(recipe(ckpt)), str(tmp_path / "from-zero"), "--quiet", "--allow-pickle"])
    main(["run", str(recipe(converted)), str(tmp_path / "from-converted"), "--quiet"])
    got, want = load_state(tmp_path / "from-zero"), load_state(tmp_path / "from-converted")
    assert set(got) == set(want) and len(got) == 39
    assert_same_tensors(got, want, atol=0, rtol=0)
    # and the fine-tune's delta is really in there
    assert not torch.equal(got["model.layers.1.self_attn.q_proj.weight"], load_state(llama_family["base"])["model.layers.1.self_attn.q_proj.weight"])


def test_zero_input_is_refused_without_allow_pickle(zero_checkpoints, llama_family, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {llama_family['base']}\n  - model: {zero_checkpoints[2]}\nparameters: {{weight: 1}}\n")
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe)])
    err = capsys.readouterr().err
    assert e.value.code != 0
    assert "DeepSpeed ZeRO checkpoint (global_step2/)" in err and "--allow-pickle" in err and "Traceback" not in err


def test_zero_checkpoint_with_a_code_running_pickle_is_refused_even_with_allow_pickle(zero_checkpoints, llama_family, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(zero_checkpoints[2], evil)
    target = "/tmp/distmerge-pwned"
    if os.path.exists(target):
        os.remove(target)
    optim = next((evil / "global_step2").glob("*rank_1*_optim_states.pt"))
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": 3, "boom": Exploit()}}, optim)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {llama_family['base']}\n  - model: {evil}\nparameters: {{weight: 1}}\n")
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe), "--allow-pickle"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "weights_only" in err and optim.name in err
    assert not os.path.exists(target), "unpickling ran the file's code"


def test_zero_checkpoint_missing_a_rank_file_is_a_clear_error(zero_checkpoints, tmp_path):
    from distmerge.errors import MergeError

    partial = tmp_path / "partial"
    shutil.copytree(zero_checkpoints[3], partial)
    next((partial / "global_step2").glob("*rank_1*_optim_states.pt")).unlink()
    with pytest.raises(MergeError, match="ZeRO checkpoint of 3 ranks needs 3 .* found 2; was it saved completely"):
        ZeroCheckpoint(str(partial / "global_step2"))

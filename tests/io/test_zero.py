"""DeepSpeed ZeRO checkpoints as merge inputs.

The checkpoints are made for real: ``tests/io/zero_finetune.py`` fine-tunes the tiny Llama base
for two steps with DeepSpeed (ZeRO stages 2 and 3, on two ranks, bf16, torchrun on CPU,
``lm_head.weight`` frozen) and saves what a DeepSpeed job leaves behind. DeepSpeed's own
converter (``zero_to_fp32``) is the reference for what the checkpoint holds.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distmerge.cli import main
from distmerge.demo import make_family
from distmerge.io.zero import ZeroCheckpoint, find_tag
from tests.helpers import assert_same_tensors, load_state
from tests.helpers import REPO_ROOT, child_env
from tests.test_distributed import Proc
from tests.test_faults import Exploit

STAGES = (2, 3)
LAYERS = 3
RANKS = 2
"""Ranks of the fine-tunes. Three ranks on two cores took 30-180 s (gloo ranks waiting on a
descheduled one), two take about 18 s."""


pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.slow,
    pytest.mark.needs("deepspeed", "transformers"),  # zero_finetune.py: DeepSpeed fine-tunes a transformers Llama
]
"""The first test here also pays for two real DeepSpeed fine-tunes (see ``zero_checkpoints``)."""


@pytest.fixture(scope="module")
def zero_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny bf16 Llama base and one fine-tune of odd width (hidden 65: 5 heads of 16, one KV
    head; 3 layers),
    so that neither stage's partitions divide evenly on 2 ranks: ZeRO-2 splits its flat group
    of 121095 trained elements (all but the frozen lm_head) into 60548 + 60547, ZeRO-3 pads
    each parameter of odd size (the norms, 65 elements) to 66."""
    return make_family(tmp_path_factory.mktemp("zero_family"), n_finetunes=1, seed=0, dtype=torch.bfloat16,
                       num_layers=LAYERS, hidden=65, heads=5, kv_heads=1, head_dim=16, shards={"base": 2})  # fmt: skip


@pytest.fixture(scope="module")
def zero_checkpoints(zero_family, tmp_path_factory) -> dict[int, Path]:
    """{stage: checkpoint directory} of ZeRO fine-tunes of zero_family['base']."""
    root = tmp_path_factory.mktemp("zero")
    out = {stage: root / f"stage{stage}" for stage in STAGES}
    jobs = [str(x) for stage in STAGES for x in (out[stage], stage)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
           str(REPO_ROOT / "tests" / "io" / "zero_finetune.py"), str(zero_family["base"]), *jobs]  # fmt: skip
    # ~18 s alone
    done = Proc(cmd, child_env({"DS_ACCELERATOR": "cpu"}), root / "finetune").wait(timeout=900)
    assert done.rc == 0, done.tail()
    return out


def deepspeed_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """What DeepSpeed's converter makes of the checkpoint (all float32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.contiguous() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt)).items()}


@pytest.mark.parametrize("stage", STAGES)
def test_zero_reader_gives_deepspeeds_own_reconstruction_tensor_for_tensor(zero_checkpoints, zero_family, stage):
    ckpt = zero_checkpoints[stage]
    zero = ZeroCheckpoint(str(ckpt / find_tag(str(ckpt))))
    ref = deepspeed_state(ckpt)
    base = load_state(zero_family["base"])
    assert (zero.stage, zero.world) == (stage, RANKS)
    assert set(zero.tensors()) == set(ref) == set(base)
    for name, want in ref.items():
        got = zero.read(name)
        assert zero.tensors()[name] == ("F32", tuple(want.shape))
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    # Two Adam steps at lr 1e-2 moved every trained weight; the frozen one kept the base's value.
    assert torch.equal(zero.read("lm_head.weight"), base["lm_head.weight"].float())
    # The partitions do not divide evenly (see zero_family): ZeRO-2's two ranks hold 60548 and
    # 60547 elements; ZeRO-3 pads each of the 7 norms (65 elements) by one.
    sizes = [sum(t.numel() for t in ranks) for ranks in zero._flat]
    trained = sum(math.prod(p.shape) for p in zero._params.values())
    assert (len(set(sizes)), sum(sizes) - trained) == ((2, 0) if stage == 2 else (1, 7))
    assert not torch.equal(zero.read("model.layers.0.mlp.up_proj.weight"), base["model.layers.0.mlp.up_proj.weight"].float())


@pytest.mark.parametrize("stage", STAGES)
def test_merge_with_a_zero_input_equals_the_merge_of_its_converted_safetensors(zero_checkpoints, zero_family, tmp_path, stage):
    ckpt = zero_checkpoints[stage]
    converted = tmp_path / "converted"
    converted.mkdir()
    save_file(deepspeed_state(ckpt), converted / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(ckpt / "config.json", converted)

    def recipe(ft: Path) -> Path:
        path = tmp_path / f"{ft.name}.yml"
        path.write_text(
            f"merge_method: task_arithmetic\nbase_model: {zero_family['base']}\n"
            f"models:\n  - model: {ft}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {zero_family['ft1']}\n    parameters: {{weight: 0.5}}\n"
            "dtype: float32\nout_dtype: bfloat16\n"
        )
        return path

    main(["run", str(recipe(ckpt)), str(tmp_path / "from-zero"), "--quiet", "--allow-pickle"])
    main(["run", str(recipe(converted)), str(tmp_path / "from-converted"), "--quiet"])
    got, want = load_state(tmp_path / "from-zero"), load_state(tmp_path / "from-converted")
    assert set(got) == set(want) and len(got) == 9 * LAYERS + 3
    assert_same_tensors(got, want, atol=0, rtol=0)
    # and the fine-tune's delta is really in there
    assert not torch.equal(got["model.layers.1.self_attn.q_proj.weight"], load_state(zero_family["base"])["model.layers.1.self_attn.q_proj.weight"])


def test_zero_input_is_refused_without_allow_pickle(zero_checkpoints, zero_family, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {zero_family['base']}\n  - model: {zero_checkpoints[2]}\nparameters: {{weight: 1}}\n")
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe)])
    err = capsys.readouterr().err
    assert e.value.code != 0
    assert "DeepSpeed ZeRO checkpoint (global_step2/)" in err and "--allow-pickle" in err and "Traceback" not in err


def test_zero_checkpoint_with_a_code_running_pickle_is_refused_even_with_allow_pickle(zero_checkpoints, zero_family, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(zero_checkpoints[2], evil)
    target = "/tmp/distmerge-pwned"
    if os.path.exists(target):
        os.remove(target)
    optim = next((evil / "global_step2").glob("*rank_1*_optim_states.pt"))
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": 2, "boom": Exploit()}}, optim)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {zero_family['base']}\n  - model: {evil}\nparameters: {{weight: 1}}\n")
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
    with pytest.raises(MergeError, match="ZeRO checkpoint of 2 ranks needs 2 .* found 1; was it saved completely"):
        ZeroCheckpoint(str(partial / "global_step2"))

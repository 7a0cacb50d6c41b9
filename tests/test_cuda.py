"""The CUDA path: staged uploads and downloads on streams of their own give the CPU path's bytes.

These need a GPU and are skipped (with this reason, under ``-ra``) where there is none; the
kernels' math is checked on CPU under TRITON_INTERPRET in test_kernels.py.
"""

from __future__ import annotations

import filecmp

import pytest
import torch

from distmerge.io.reader import TensorReader
from tests.test_merge_vs_mergekit import distmerge, models

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_uploader_gives_the_file_bytes_on_the_gpu(llama_family, io):
    from distmerge.io.staging import Downloader, Uploader

    path = str(next(llama_family["ft1"].glob("*.safetensors")))
    with TensorReader(io, pin=True) as reader:
        expected = reader.read(path, "U8", (4096,), 1024, 1024 + 4096).clone()
        up, down = Uploader("cuda"), Downloader("cuda")
        try:
            up.prefetch("a", lambda: reader.read(path, "U8", (4096,), 1024, 1024 + 4096))
            assert up.take("missing") is None
            x = up.take("a")
            assert x.is_cuda and torch.equal(x.cpu(), expected)
            host, wait = down.start(x * 2)
            wait()
            assert torch.equal(host, expected * 2)
        finally:
            up.close()


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_passthrough_on_cuda_writes_the_cpu_bytes(llama_family, tmp_path, io):
    f = llama_family
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(f["ft1"]), "layer_range": [0, 4], "parameters": {"scale": 0.5}}]}],
        "dtype": "bfloat16",
    }
    cpu = distmerge(recipe, tmp_path / "cpu", "--device", "cpu")
    gpu = distmerge(recipe, tmp_path / "gpu", "--device", "cuda", "--io", io)
    shards = sorted(p.name for p in cpu.glob("model-*.safetensors"))
    assert shards and all(filecmp.cmp(cpu / n, gpu / n, shallow=False) for n in shards)


def test_task_arithmetic_on_cuda_matches_cpu(llama_family, tmp_path):
    from tests.helpers import load_state

    f = llama_family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", {"weight": 0.6}), ("ft2", {"weight": -0.3})),
        "dtype": "float32",
    }
    cpu = load_state(distmerge(recipe, tmp_path / "cpu", "--device", "cpu"))
    gpu = load_state(distmerge(recipe, tmp_path / "gpu", "--device", "cuda"))
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-6)

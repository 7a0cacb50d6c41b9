"""Test helpers: run mergekit in-process, load and compare checkpoints, run the CLI.

Import as ``from tests.helpers import ...`` (tests/ is a package).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Mapping, Union

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distmerge import threads

REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def benchmark_script(name: str):
    """``benchmarks/NAME.py`` imported as the module NAME (the scripts are not a package), once,
    and registered in ``sys.modules`` (dataclasses look their module up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module

StateOrDir = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

# --------------------------------------------------------------------------- mergekit

#: recipe text (+ seed) -> output directory of the first run in this session
_MERGEKIT_CACHE: dict[tuple[str, int | None], Path] = {}


def recipe_text(recipe: dict | str) -> str:
    """The YAML text of a recipe given as a dict or as text (text is returned unchanged)."""
    if isinstance(recipe, str):
        return recipe
    return yaml.safe_dump(recipe, sort_keys=False)


def run_mergekit(recipe: dict | str, out_dir: str | os.PathLike, *, seed: int | None = None) -> Path:
    """Merge with mergekit 0.1.5 in this process, as ``mergekit-yaml RECIPE OUT`` would with
    OMP_NUM_THREADS=1: on one intra-op thread, as each distmerge rank merges (torch splits a
    whole-tensor reduction by its thread count, and so its bits).

    CPU only, lazy loading, tokenizer copied, output in one shard. Results are cached by
    recipe text and seed for the session: a repeated recipe copies the earlier output to
    ``out_dir`` instead of merging again. Returns ``out_dir`` as a Path.
    """
    pytest.importorskip("mergekit", reason="mergekit 0.1.5 (the test extra) is the reference merge")
    text = recipe_text(recipe)
    out_dir = Path(out_dir)
    key = (text, seed)
    cached = _MERGEKIT_CACHE.get(key)
    if cached is not None and cached.is_dir():
        if cached.resolve() != out_dir.resolve():
            shutil.copytree(cached, out_dir, dirs_exist_ok=True)
        return out_dir

    # Imported here: mergekit pulls in transformers, a few seconds on first import.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # mergekit uses numpy.core
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(
        cuda=False,
        device="cpu",
        copy_tokenizer=True,
        lazy_unpickle=True,
        low_cpu_memory=False,
        out_shard_size=10**15,  # one output file
        random_seed=seed,
        quiet=True,
        allow_crimes=False,
        trust_remote_code=False,
        multi_gpu=False,
        lora_merge_cache=str(out_dir.parent / (out_dir.name + "-lora-cache")),  # for model+adapter refs
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with threads.one():  # as distmerge's ranks: mergekit's reductions split by thread count too
        run_merge(config, str(out_dir), options=options, config_source=text)
    _MERGEKIT_CACHE[key] = out_dir
    return out_dir


# --------------------------------------------------------------------------- loading


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF checkpoint directory (from the index when there is one)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def load_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors checkpoint (one file or sharded with an index)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(model_dir):
        part = load_file(str(f))
        dup = state.keys() & part.keys()
        if dup:
            raise AssertionError(f"{model_dir}: tensors in more than one file: {sorted(dup)[:5]}")
        state.update(part)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        if set(weight_map) != set(state):
            missing = sorted(set(weight_map) - set(state))[:5]
            extra = sorted(set(state) - set(weight_map))[:5]
            raise AssertionError(
                f"{model_dir}: index and files disagree: in index only {missing}, in files only {extra}"
            )
    return state


def _as_state(x: StateOrDir) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(x, Mapping):
        return dict(x), "<state dict>"
    return load_state(x), str(x)


# --------------------------------------------------------------------------- comparing


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (float64): 2**(floor(log2|x|) - 7).

    Below the smallest normal (2**-126) it is the subnormal spacing 2**-133.
    """
    a = x.detach().to(torch.float64).abs().clamp_min(2.0**-126)
    a = torch.where(torch.isfinite(a), a, torch.ones_like(a))
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1): floor(log2 a) = exp - 1
    return torch.ldexp(torch.ones_like(a), (exp - 8).to(torch.float64))


def assert_same_tensors(
    a: StateOrDir,
    b: StateOrDir,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    ulps: float | None = None,
    check_dtype: bool = True,
) -> None:
    """Assert two checkpoints (directories or state dicts) hold the same tensors.

    Names, shapes and (with ``check_dtype``) dtypes must match; values are compared in
    float32 (exact for bf16/f16 inputs) elementwise:
    ``|a - b| <= atol + rtol * |b| + ulps * ulp_bf16(|b|)``; ``b`` is the reference.
    NaNs must sit at the same places; infinities must be equal. The message names every
    failing tensor with its max difference and where it is.
    """
    sa, na = _as_state(a)
    sb, nb = _as_state(b)
    problems: list[str] = []
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a:
        problems.append(f"{len(only_a)} tensors only in {na}: {only_a[:8]}")
    if only_b:
        problems.append(f"{len(only_b)} tensors only in {nb}: {only_b[:8]}")
    for name in sorted(set(sa) & set(sb)):
        ta, tb = sa[name], sb[name]
        if tuple(ta.shape) != tuple(tb.shape):
            problems.append(f"{name}: shape {tuple(ta.shape)} != {tuple(tb.shape)}")
            continue
        if check_dtype and ta.dtype != tb.dtype:
            problems.append(f"{name}: dtype {ta.dtype} != {tb.dtype}")
            continue
        fa, fb = ta.to(torch.float32), tb.to(torch.float32)
        nan_a, nan_b = torch.isnan(fa), torch.isnan(fb)
        if not torch.equal(nan_a, nan_b):
            problems.append(f"{name}: NaNs at different places ({int(nan_a.sum())} vs {int(nan_b.sum())})")
            continue
        ok = nan_a | (fa == fb)  # equal values, infinities included
        diff = (fa - fb).abs().to(torch.float64)
        allowed = atol + rtol * fb.abs().to(torch.float64)
        if ulps is not None:
            allowed = allowed + ulps * ulp_bf16(fb)
        ok = ok | (torch.isfinite(fa) & torch.isfinite(fb) & (diff <= allowed))
        if bool(ok.all()):
            continue
        bad = ~ok
        d = torch.where(bad & torch.isfinite(diff), diff, torch.zeros_like(diff))
        if bool(torch.isfinite(diff[bad]).any()):
            flat = int(d.flatten().argmax())
        else:
            flat = int(bad.flatten().nonzero()[0])
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(ta.shape))) if ta.dim() else ()
        ulps_there = float(diff.flatten()[flat] / ulp_bf16(fb.flatten()[flat]))
        problems.append(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; max |a-b| = "
            f"{float(diff.flatten()[flat]):.3g} at {list(idx)} "
            f"(a={float(fa.flatten()[flat])!r}, b={float(fb.flatten()[flat])!r}, "
            f"{ulps_there:.3g} bf16 ulps of b)"
        )
    if problems:
        head = f"{na} and {nb} differ (atol={atol}, rtol={rtol}, ulps={ulps}):\n  "
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AssertionError(head + "\n  ".join(shown) + more)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    *args: object,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: str | os.PathLike | None = None,
    input: str | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run the ``distmerge`` command (``distmerge.cli.entry``) in a process of its own.

    Returns the CompletedProcess (text stdout/stderr, the exit code not checked, -N for a
    signal); raises ``subprocess.TimeoutExpired`` after ``timeout`` s, the process killed.
    ``env`` is added to this process's environment; HF_HUB_OFFLINE=1 is set unless ``env``
    says otherwise, and the repository root is put on PYTHONPATH.

    The process is forked from a server that has imported torch once (``cli_forks``), which
    saves the 2-3 s of CPU that importing torch costs a new interpreter; it is a process as
    ``python -m distmerge.cli`` is (its own pid, exit code, signals and file descriptors)
    and reads the environment it is given. ``fresh=True`` starts a new interpreter
    (``python -m distmerge.cli``) instead, for what a fresh start is the point of.
    """
    full_env = dict(os.environ)
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    if env:
        full_env.update({k: str(v) for k, v in env.items()})
    argv = [str(a) for a in args]
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "distmerge.cli", *argv],
            env=full_env,
            cwd=cwd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="run-cli-") as io_dir:
        files = [os.path.join(io_dir, name) for name in ("stdin", "stdout", "stderr")]
        for path, text in zip(files, (input or "", "", "")):
            Path(path).write_text(text)
        proc = cli_forks().Process(target=_cli_child, args=(argv, full_env, str(cwd or os.getcwd()), *files), daemon=True)
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["distmerge", *argv], timeout)
        out, err = (Path(f).read_text(errors="replace") for f in files[1:])
    return subprocess.CompletedProcess(["distmerge", *argv], proc.exitcode, out, err)


@functools.lru_cache(maxsize=None)
def cli_forks():
    """A multiprocessing context whose processes fork from a server that imported torch
    (one server per test process, started on first use, gone with the test process).
    Only modules that read no environment variable at import are preloaded: each child
    sets its own environment before it imports distmerge (and huggingface_hub)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "safetensors.torch", "yaml", "click"])
    return ctx


def _cli_child(argv: list[str], env: dict[str, str], cwd: str, stdin: str, stdout: str, stderr: str) -> None:
    """In the forked process: become ``distmerge ARGV`` with ``env`` in ``cwd``, reading and
    writing the given files as fds 0, 1 and 2. SystemExit's code is the exit code."""
    import tempfile

    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR as ``env`` says
    os.chdir(cwd)
    for fd, path, flags in ((0, stdin, os.O_RDONLY), (1, stdout, os.O_WRONLY), (2, stderr, os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # multiprocessing gave the child /dev/null
    import faulthandler

    faulthandler.enable()  # a crash in native code (numba, torch) leaves its Python stack in stderr
    sys.argv = [str(REPO_ROOT / "distmerge" / "cli.py"), *argv]
    from distmerge.cli import entry

    entry(argv)


def run_main(*args: object, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``distmerge ARGS...`` through ``distmerge.cli.main`` in this process: what ``run_cli``
    returns (exit code, stdout, stderr as text) without starting Python and importing torch
    again (2-3 s a call). For calls that cannot hang; ``run_cli`` runs the others with a
    timeout. ``env`` is set for the call (TMPDIR included: tempfile's cache is reset)."""
    import contextlib
    import io
    import tempfile

    from distmerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    saved_tempdir, code = tempfile.tempdir, 0
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        tempfile.tempdir = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        tempfile.tempdir = saved_tempdir
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["distmerge", *map(str, args)], code, out.getvalue(), err.getvalue())


def numel_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Total bytes of a state dict's tensors."""
    return sum(t.numel() * t.element_size() for t in state.values())


# --------------------------------------------------------------------------- synthetic tensors


def synthetic_models(
    shape: int | tuple[int, ...],
    n: int,
    seed: int,
    *,
    spread: float = 0.1,
    shared: float = 0.0,
    dtype: torch.dtype = torch.float32,
    as_float32: bool = False,
    from_rounded_base: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A seeded base and ``n`` fine-tunes for tests of merge math: ``(base, [ft_1, ..., ft_n])``.

    ``base ~ N(0, 1)`` and ``ft_i = base + shared * S + spread * N_i`` with ``S, N_i ~ N(0, 1)``:
    ``S`` is one draw that every task vector shares (``shared > 0`` makes them correlated,
    cos θ ≈ shared² / (shared² + spread²)). One ``torch.Generator`` seeded with ``seed`` draws,
    in this order, the base, ``S`` (only when ``shared``), then ``N_1 ... N_n``: the same
    arguments give the same bits on every machine, and tests may pin values drawn from them.

    Every value is rounded to ``dtype`` (``torch.bfloat16`` makes exact ties: equal ``|τ|``,
    equal variances) and returned in ``dtype``, or as float32 holding ``dtype``'s values with
    ``as_float32``. ``from_rounded_base`` builds the fine-tunes on the rounded base (as a
    fine-tune of a stored checkpoint is) instead of on the exact draw.
    """
    g = torch.Generator().manual_seed(seed)

    def rounded(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        return x.float() if as_float32 else x

    base = torch.randn(shape, generator=g)
    if from_rounded_base:
        base = base.to(dtype).float()
    common = shared * torch.randn(shape, generator=g) if shared else None
    tunes = []
    for _ in range(n):
        start = base if common is None else base + common
        tunes.append(rounded(start + spread * torch.randn(shape, generator=g)))
    return rounded(base), tunes


__all__ = [
    "REPO_ROOT",
    "recipe_text",
    "run_mergekit",
    "safetensors_files",
    "load_state",
    "ulp_bf16",
    "assert_same_tensors",
    "free_port",
    "run_cli",
    "run_main",
    "numel_bytes",
    "synthetic_models",
]


# --------------------------------------------------------------------------- child processes

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "DISTMERGE_FAULT")


def launcher_free(environ) -> dict[str, str]:
    """``environ`` without anything a launcher sets (so a test run under srun/torchrun still works)."""
    return {
        k: v for k, v in environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "TORCH_ELASTIC_"))
    }  # fmt: skip


def child_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a distmerge child process: no launcher variables, this repository
    on PYTHONPATH, offline, one thread per process, plus ``extra``."""
    env = launcher_free(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env

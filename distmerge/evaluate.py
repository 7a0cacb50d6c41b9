"""Score a checkpoint: lm-evaluation-harness tasks, or any command that prints JSON; cached by content.

Two evaluators, one result (:class:`EvalResult`: every number found, and the one a soup or a
search maximises):

- ``tasks``: lm-evaluation-harness (``lm_eval``), the evaluator merge users already run, on
  its Hugging Face backend (CPU or one GPU) or its vLLM backend (tensor parallelism over
  several GPUs through ``model_args``). Local task YAML files come from ``include_path``.
- ``eval_cmd``: a shell command with ``{model}`` in it that prints a number or a JSON object.

Scores are cached under ``cache_dir`` by (what the evaluation is, what the checkpoint's bytes
are): a candidate merged twice, into two directories, is evaluated once. The checkpoint's
hash (:func:`model_hash`) comes from distmerge's manifest when the directory is a finished
merge that checks out, so a 100 GB merge is not read again to be hashed.

Nothing here imports torch or lm_eval at import time: ``distmerge --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import click

from distmerge.errors import MergeError

__all__ = ["EvalSpec", "EvalResult", "model_hash", "evaluate", "eval_options", "spec_from_options"]

CACHE_VERSION = 1
LM_EVAL_MISSING = "distmerge eval --tasks needs lm-evaluation-harness: pip install 'distmerge[eval]' (or use --eval-cmd)"
#: files that decide what a checkpoint computes: weights, config, generation config, tokenizer
HASHED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken", ".jinja")


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """What to evaluate a checkpoint with: lm-eval ``tasks`` or an ``eval_cmd``, exactly one."""

    tasks: tuple[str, ...] = ()
    """lm-eval task, group or tag names (local ones need ``include_path``)."""
    include_path: str | None = None
    """Folder of local lm-eval task YAML files (and the data they name)."""
    eval_cmd: str | None = None
    """Shell command with ``{model}`` (replaced by the shell-quoted checkpoint path); prints JSON."""
    metric: str | None = None
    """Which number is the score: a key of :attr:`EvalResult.metrics` ("task/metric"; "." works as "/")."""
    backend: str = "hf"
    """lm-eval model backend: "hf" (transformers) or "vllm"."""
    device: str = "cpu"
    """Device of the hf backend: "cpu", "cuda", "cuda:0"."""
    batch_size: int | str = 1
    """lm-eval batch size, or "auto" (lm-eval finds the largest that fits)."""
    limit: int | None = None
    """Evaluate only the first ``limit`` items of each task."""
    model_args: str = ""
    """Extra lm-eval ``--model_args`` ("k=v,k=v"): "dtype=bfloat16", "tensor_parallel_size=8" (vllm)."""
    cache_dir: str | None = None
    """Where scores are kept; default $DISTMERGE_CACHE/eval, else $XDG_CACHE_HOME/distmerge/eval,
    else ~/.cache/distmerge/eval."""

    def key(self) -> str:
        """sha256 of what decides the numbers: tasks and the bytes of every file under
        ``include_path``, the lm-eval version, command, metric, backend, limit, model_args.
        Device and batch size are left out: they decide how fast, not what is measured."""
        what = {k: v for k, v in asdict(self).items() if k not in ("device", "batch_size", "cache_dir", "include_path")}
        what["version"] = CACHE_VERSION
        if self.tasks:
            try:
                what["lm_eval"] = importlib.metadata.version("lm_eval")
            except importlib.metadata.PackageNotFoundError:  # evaluate() says what to install
                what["lm_eval"] = None
            what["task_files"] = _folder_digest(self.include_path) if self.include_path else None
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        if os.environ.get("DISTMERGE_CACHE"):
            return Path(os.environ["DISTMERGE_CACHE"]) / "eval"
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distmerge" / "eval"


@dataclass
class EvalResult:
    score: float
    """The one number a soup or a search maximises (see :func:`evaluate` for which)."""
    metrics: dict[str, float]
    """Every number found, flattened: "task/metric" -> value."""
    cached: bool
    """Read from the cache: nothing ran."""
    model_hash: str
    """:func:`model_hash` of the checkpoint evaluated."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- hashing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_digest(path: Path) -> str:
    """The manifest's ``sha256_tree`` of a safetensors file: sha256 over the sha256 of its
    header and of each tensor in file order. The same number distmerge records as it writes
    a shard, so a finished merge and a plain copy of it hash alike. A file that is not
    header + tensors back to back (gaps, trailing bytes) gets its plain sha256."""
    from distmerge.io.header import read_header
    from distmerge.verify import _sha256_range

    try:
        entries, _ = read_header(path)
    except MergeError:
        return "file:" + _sha256_file(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        spans = sorted((e.begin, e.end) for e in entries.values())
        if 8 + n + sum(e - b for b, e in spans) != os.path.getsize(path):
            return "file:" + _sha256_file(path)
        digests = [_sha256_range(f, 0, 8 + n)] + [_sha256_range(f, b, e) for b, e in spans]
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()


def _from_manifest(model_dir: Path, names: list[str]) -> dict[str, str] | None:
    """Each file's digest from ``.distmerge/manifest.json``, when ``model_dir`` is a finished
    merge that verifies (cheaply: sizes and headers), holds no file the manifest lacks, and
    no file changed after the manifest was written (mtime); otherwise None."""
    from distmerge.state import MANIFEST_FILE, read_manifest, state_path
    from distmerge.verify import verify

    entries = read_manifest(str(model_dir))
    if entries is None:
        return None
    digests = {e["name"]: e.get("sha256_tree") or e["sha256"] for e in entries}
    written = os.stat(state_path(str(model_dir), MANIFEST_FILE)).st_mtime_ns
    if any(n not in digests or (model_dir / n).stat().st_mtime_ns > written for n in names) or verify(str(model_dir)):
        return None
    return {n: digests[n] for n in names}


def model_hash(model_dir: str | os.PathLike) -> str:
    """Content hash of a checkpoint directory: sha256 over (name, digest) of each top-level
    weight, config and tokenizer file (:data:`HASHED_SUFFIXES`; a model card or recipe is
    left out). Digests come from distmerge's manifest when it can be trusted (see
    :func:`_from_manifest`), else from reading the files; both give the same hash."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MergeError(f"{model_dir}: no such directory (give a checkpoint directory: config.json and weights)")
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name.endswith(HASHED_SUFFIXES))
    if not names:
        raise MergeError(f"{model_dir}: no weight, config or tokenizer files in it; is it a checkpoint directory?")
    digests = _from_manifest(model_dir, names)
    if digests is None:
        digests = {n: _safetensors_digest(model_dir / n) if n.endswith(".safetensors") else _sha256_file(model_dir / n) for n in names}
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def _folder_digest(folder: str) -> str:
    """sha256 over every file's relative path and bytes under ``folder`` (task YAMLs and data)."""
    root = Path(folder)
    if not root.is_dir():
        raise MergeError(f"--include-path {folder}: no such directory (a folder of lm-eval task YAML files)")
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(f"{p.relative_to(root)}\0{_sha256_file(p)}\0".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- scores


def _flatten(obj, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value, by "/"-joined path (booleans are not numbers)."""
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix or "score": float(obj)}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}/{key}" if prefix else str(key)).items()}
    return {}


def _pick(metrics: dict[str, float], metric: str | None, where: str) -> float | None:
    """``metrics[metric]`` ("." read as "/"), or None when no metric is named."""
    if metric is None:
        return None
    for name in (metric, metric.replace(".", "/")):
        if name in metrics:
            return metrics[name]
    shown = ", ".join(list(metrics)[:8]) + (", ..." if len(metrics) > 8 else "")
    raise MergeError(f"--metric {metric}: {where} has no such number; it has: {shown or 'none'}")


def score_of_json(obj, metric: str | None, where: str) -> tuple[float, dict[str, float]]:
    """(score, metrics) of what an --eval-cmd printed. The score: a bare number; else the
    number ``metric`` names; else the only number there is; else the mean of the top-level
    numbers (nested objects' numbers are kept in metrics, not averaged)."""
    metrics = _flatten(obj)
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj), metrics
    picked = _pick(metrics, metric, where)
    if picked is not None:
        return picked, metrics
    if len(metrics) == 1:
        return next(iter(metrics.values())), metrics
    top = [float(v) for v in (obj.values() if isinstance(obj, dict) else []) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not top:
        raise MergeError(f"{where} printed {len(metrics)} numbers, none at the top level; name the score with --metric (one of: {', '.join(list(metrics)[:8])})")
    return sum(top) / len(top), metrics


def _run(cmd: list[str] | str, what: str, log, env=None) -> str:
    """Run ``cmd`` (a shell command when a str), return its stdout. Its stderr goes on to ours
    as it comes (when ``log``); a non-zero exit is a MergeError with the last stderr line."""
    proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    tail: deque[str] = deque(maxlen=1)
    for raw in iter(proc.stderr.readline, b""):
        line = raw.decode(errors="replace")
        if log is not None:
            sys.stderr.write(line)
        for part in line.replace("\r", "\n").splitlines():  # progress bars redraw with \r
            if part.strip():
                tail.append(part.strip())
    code = proc.wait()
    reader.join()
    if code != 0:
        raise MergeError(f"{what} failed (exit status {code}): {tail[0] if tail else 'it printed nothing on stderr'}")
    return b"".join(out).decode(errors="replace")


def _run_eval_cmd(model_dir: Path, spec: EvalSpec, log) -> tuple[float, dict[str, float]]:
    cmd = spec.eval_cmd.replace("{model}", shlex.quote(str(model_dir)))
    what = f"--eval-cmd {cmd!r}"
    text = _run(cmd, what, log)
    lines = [line for line in text.splitlines() if line.strip()]
    for candidate in (text, lines[-1] if lines else ""):  # the whole output, or its last line
        try:
            return score_of_json(json.loads(candidate), spec.metric, what)
        except ValueError:
            continue
    first = lines[0][:200] if lines else "(no output)"
    raise MergeError(f"{what} printed no JSON (first line: {first!r}); it must print a number or a JSON object of numbers")


def _run_lm_eval(model_dir: Path, spec: EvalSpec, log) -> tuple[float, dict[str, float]]:
    """lm-eval in a child process (``python -m distmerge.evaluate``, below). A child, not this
    process, because vLLM's tensor-parallel workers and the GPU memory a model holds are only
    given back when their process ends: a soup evaluates dozens of candidates in a row, from
    a process that may also be a merge rank; and lm-eval sets logging and seeds globally."""
    model_args = {"pretrained": str(model_dir)} | ({"dtype": "auto"} if spec.backend == "hf" else {})
    request = {"model": spec.backend, "model_args": model_args, "extra_model_args": spec.model_args, "tasks": list(spec.tasks),
               "include_path": spec.include_path, "device": spec.device, "batch_size": spec.batch_size, "limit": spec.limit}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="distmerge-eval-") as tmp:
        req, out = Path(tmp, "request.json"), Path(tmp, "results.json")
        req.write_text(json.dumps(request))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        _run([sys.executable, "-m", "distmerge.evaluate", str(req), str(out)], f"lm-eval on {model_dir}", log, env=env)
        results = json.loads(out.read_text())
    return score_of_lm_eval(results, spec.metric)


def score_of_lm_eval(results: dict, metric: str | None) -> tuple[float, dict[str, float]]:
    """(score, metrics) of lm-eval's ``results``: metrics are "task/metric" (",none", the
    default filter, dropped; stderr entries dropped); the score is ``metric``, else the mean
    over tasks (groups' aggregates left out) of each task's first metric."""
    metrics, firsts = {}, []
    for task, row in results["results"].items():
        numbers = [(k, v) for k, v in row.items() if "," in k and "_stderr," not in k and isinstance(v, (int, float))]
        for k, v in numbers:
            metrics[f"{task}/{k.removesuffix(',none')}"] = float(v)
        if numbers and not results["group_subtasks"].get(task):
            firsts.append(float(numbers[0][1]))
    picked = _pick(metrics, metric, "lm-eval's result")
    if picked is not None:
        return picked, metrics
    if not firsts:
        raise MergeError(f"lm-eval reported no numbers for tasks {', '.join(results['results']) or '(none)'}")
    return sum(firsts) / len(firsts), metrics


def _lm_eval_child(request_path: str, out_path: str) -> int:
    """The child's side: call lm_eval's Python API with a TaskManager over include_path, write
    the results as JSON. Errors are one line on stderr (the parent shows the last line)."""
    import logging

    request = json.loads(Path(request_path).read_text())
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import simple_parse_args_string

        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        model_args = request["model_args"] | simple_parse_args_string(request["extra_model_args"] or "")
        task_manager = TaskManager(include_path=request["include_path"])
        unknown = [t for t in request["tasks"] if t not in task_manager.all_tasks]
        if unknown:
            raise MergeError(f"unknown lm-eval task(s) {', '.join(unknown)}" + ("" if request["include_path"] else " (local tasks need --include-path)"))
        res = lm_eval.simple_evaluate(
            model=request["model"], model_args=model_args, tasks=request["tasks"], device=request["device"],
            batch_size=request["batch_size"], limit=request["limit"], task_manager=task_manager,
            log_samples=False, bootstrap_iters=0,
        )  # fmt: skip
    except Exception as e:  # one line for the parent's message
        what = str(e) if isinstance(e, MergeError) else f"{type(e).__name__}: {e}"
        print(" ".join(what.split())[:300], file=sys.stderr)
        return 2
    Path(out_path).write_text(json.dumps({"results": res["results"], "group_subtasks": res.get("group_subtasks") or {}}, default=str))
    return 0


# --------------------------------------------------------------------------- evaluate + cache


def evaluate(model_dir: str | os.PathLike, spec: EvalSpec, *, log: Callable[[str], None] | None = _stderr) -> EvalResult:
    """Score the checkpoint ``model_dir`` as ``spec`` says, or return the cached score of the
    same evaluation of the same bytes. ``log`` gets a line saying which (None: silent, and
    the evaluator's own stderr is not passed on)."""
    if spec.tasks:  # refused before any work
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise MergeError(LM_EVAL_MISSING)
        if "trust_remote_code" in spec.model_args:
            raise MergeError("--model-args trust_remote_code is refused: distmerge eval runs no code that comes with a checkpoint")
    model_dir = Path(model_dir)
    digest = model_hash(model_dir)
    path = spec.cache_root() / f"{spec.key()[:32]}-{digest[:32]}.json"
    try:
        hit = json.loads(path.read_text())
        result = EvalResult(score=float(hit["score"]), metrics=dict(hit["metrics"]), cached=True, model_hash=digest)
        if log is not None:
            log(f"cached score for {model_dir} (hash {digest[:12]}): {result.score:.4f}")
        return result
    except (OSError, ValueError, KeyError, TypeError):  # no entry, or one cut short: evaluate
        pass
    if log is not None:
        log(f"evaluating {model_dir} (hash {digest[:12]}) with {spec.eval_cmd or 'lm-eval ' + ','.join(spec.tasks)}")
    t0 = time.perf_counter()
    score, metrics = (_run_eval_cmd if spec.eval_cmd else _run_lm_eval)(model_dir, spec, log)
    if not math.isfinite(score):
        raise MergeError(f"the score of {model_dir} is {score}: the evaluator returned no usable number")
    entry = {"score": score, "metrics": metrics, "model_hash": digest, "model": str(model_dir), "spec": asdict(spec),
             "seconds": round(time.perf_counter() - t0, 3), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f, indent=1)
    os.replace(tmp, path)  # readers see the whole entry or none
    return EvalResult(score=score, metrics=metrics, cached=False, model_hash=digest)


# --------------------------------------------------------------------------- command-line options

OPTIONS = ("tasks", "include_path", "eval_cmd", "metric", "backend", "eval_device", "batch_size", "limit", "model_args", "cache_dir")


def eval_options(f):
    """The options of an evaluation (``distmerge eval``, ``distmerge soup``); pass the keyword
    arguments they give to :func:`spec_from_options`."""
    for decl in reversed([
        click.option("--tasks", default=None, help="lm-eval tasks, groups or tags, comma-separated (local ones: with --include-path)."),
        click.option("--include-path", default=None, type=click.Path(file_okay=False), help="Folder of local lm-eval task YAML files."),
        click.option("--eval-cmd", default=None, help="Instead of lm-eval: a shell command with {model} in it that prints a number or a JSON object."),
        click.option("--metric", default=None, help="The number that is the score, e.g. skills_reverse/exact_match  [default: see README]"),
        click.option("--backend", default="hf", show_default=True, type=click.Choice(["hf", "vllm"]), help="lm-eval model backend."),
        click.option("--eval-device", default="cpu", show_default=True, help="Device of the hf backend: cpu, cuda, cuda:0."),
        click.option("--batch-size", default="1", show_default=True, help="lm-eval batch size, or auto."),
        click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N items of each task."),
        click.option("--model-args", default="", help="Extra lm-eval model_args: dtype=bfloat16, tensor_parallel_size=8 (vllm)."),
        click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Where scores are cached  [default: ~/.cache/distmerge/eval]"),
    ]):  # fmt: skip
        f = decl(f)
    return f


def spec_from_options(**kw) -> EvalSpec:
    """The EvalSpec of :func:`eval_options`' keyword arguments (all of them, nothing else)."""
    missing, extra = set(OPTIONS) - set(kw), set(kw) - set(OPTIONS)
    if missing or extra:
        raise TypeError(f"spec_from_options: missing {sorted(missing)}, unexpected {sorted(extra)}")
    tasks = tuple(t.strip() for t in (kw.pop("tasks") or "").split(",") if t.strip())
    eval_cmd = kw.pop("eval_cmd")
    if bool(tasks) == bool(eval_cmd):
        raise MergeError("give either --tasks (lm-eval tasks) or --eval-cmd (a command that prints a score), " + ("not both" if tasks else "one of them"))
    if eval_cmd and "{model}" not in eval_cmd:
        raise MergeError(f"--eval-cmd {eval_cmd!r} has no {{model}}: write where the checkpoint's path goes, e.g. 'my-scorer --json {{model}}'")
    batch = str(kw.pop("batch_size")).strip()
    if not (batch == "auto" or batch.isdigit() and int(batch) > 0):
        raise MergeError(f"--batch-size {batch}: a positive integer or auto")
    return EvalSpec(
        tasks=tasks, eval_cmd=eval_cmd, include_path=kw.pop("include_path"), metric=kw.pop("metric"), backend=kw.pop("backend"),
        device=kw.pop("eval_device"), batch_size=batch if batch == "auto" else int(batch), limit=kw.pop("limit"),
        model_args=kw.pop("model_args") or "", cache_dir=kw.pop("cache_dir"),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(_lm_eval_child(*sys.argv[1:3]))

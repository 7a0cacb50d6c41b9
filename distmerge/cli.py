"""The ``distmerge`` command: plan, run, methods."""

from __future__ import annotations

import gc
import json
import re
import sys

import click

from distmerge import __version__
from distmerge.errors import MergeError, Stopped
from distmerge.evaluate import eval_options

UNITS = {"": 1, "b": 10**9, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; also MB, GiB, plain byte counts, 1e9, and mergekit-yaml's forms
    (5B = 5 billion, 500M, 100K: like mergekit, counted in bytes; a B alone is never bytes)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    try:
        value = int(float(m[1]) * UNITS[m[2].lower()])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise click.BadParameter("the size must be positive")
    return value


def _scaled(n: float, unit: str, prefixes: tuple[str, ...]) -> str:
    """``n`` in ``unit`` with the largest decimal prefix that keeps it under 1000 (the last one
    for anything larger): 512 B, 1.23 GB."""
    for prefix in prefixes:
        if abs(n) < 1000 or prefix == prefixes[-1]:
            return f"{n:.0f} {unit}" if not prefix else f"{n:.2f} {prefix}{unit}"
        n /= 1000
    return str(n)


def human(n: float) -> str:
    """Bytes for people: 1.23 GB."""
    return _scaled(n, "B", ("", "K", "M", "G", "T"))


def flops(n: float) -> str:
    """Floating-point operations for people: 1.23 TFLOP."""
    return _scaled(n, "FLOP", ("", "k", "M", "G", "T", "P"))


def duration(seconds: float) -> str:
    """An estimated time for people: 0.004 s, 12.3 s, 4.5 min, 2.1 h."""
    if seconds < 1:
        return f"{seconds:.2g} s"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


keep_option = click.option(
    "--keep-intermediates", metavar="DIR", type=click.Path(file_okay=False),
    help="Multi-stage recipes: also write every named stage into DIR/NAME (from the same pass, as mergekit-multi's -I does).",
)  # fmt: skip
shard_option = click.option("--out-shard-size", default="5GB", show_default=True, help="Largest output file (bytes of tensor data).")
pickle_option = click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt checkpoints, with torch.load(weights_only=True).")
seed_option = click.option("--random-seed", default=0, show_default=True, type=int, help="Seed of the randomized methods (DARE, DELLA).")


@click.group()
@click.version_option(__version__, prog_name="distmerge")
def cli():
    """Merge large language models from mergekit recipes, on one machine or many."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@shard_option
@seed_option
@pickle_option
@click.option("--world-size", default=1, show_default=True, type=click.IntRange(min=1), help="Show how the files split over this many ranks.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan as JSON.")
@click.option("--tensors", "per_tensor", is_flag=True, help="Also list every output tensor with its inputs and parameters.")
@keep_option
def plan(recipe, out_shard_size, random_seed, allow_pickle, world_size, as_json, per_tensor, keep_intermediates):
    """Show what a run of RECIPE will do, read, write and need, without reading tensor data."""
    from distmerge.plan import CPU_FLOPS_PER_S, IO_BYTES_PER_S, assign_tensors, imbalance, rank_work
    from distmerge.recipe import recipe_warnings

    for line in recipe_warnings(recipe):
        click.echo(f"warning: {line}", err=True)
    graph = _graph(recipe, out_shard_size, random_seed, allow_pickle, keep_intermediates)
    if not graph.single:
        click.echo(json.dumps(graph.to_dict(), indent=1) if as_json else describe_graph(graph, world_size, per_tensor, keep_intermediates))
        return
    p = graph.targets[0].plan
    shares = assign_tensors(p, world_size)
    if as_json:
        d = p.to_dict()
        d["assignment"] = [
            {"rank": r, "tensors": s, "bytes": w.bytes, "flops": w.flops, "seconds": w.seconds, "peak_memory": w.peak_memory}
            for r, (s, w) in enumerate(zip(shares, rank_work(p, shares)))
        ]
        d["balanced_by"] = {"estimated": "seconds", "io_bytes_per_s": IO_BYTES_PER_S, "cpu_flops_per_s": CPU_FLOPS_PER_S}
        d["imbalance"] = imbalance(p, shares)
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(describe(p, world_size, per_tensor))


def _graph(recipe_path: str, out_shard_size: str, seed: int, allow_pickle: bool, keep_intermediates: str | None = None):
    from distmerge.job import JobOptions, make_graph

    options = JobOptions(out_shard_bytes=parse_size(out_shard_size), seed=seed, allow_pickle=allow_pickle, keep_intermediates=keep_intermediates)
    return make_graph(recipe_path, options)


def describe_graph(graph, world_size: int = 1, per_tensor: bool = False, keep_dir: str | None = None) -> str:
    """A multi-stage or multi-output recipe for people: its stages and what each reads, its
    outputs and where they go, the bytes read once and saved; then each output's plan."""
    from distmerge.graph import INTERMEDIATE, bytes_saved, read_bytes

    plans = {p.fingerprint: (name, p) for t in graph.targets for name, p in _named_stages(t.plan)}
    lines = []
    if graph.stages:
        lines.append(f"stages ({len(graph.stages)}), computed in the same pass as the outputs that read them:")
        for fp, (name, p) in plans.items():
            kept = any(t.plan.fingerprint == fp for t in graph.targets if t.role == INTERMEDIATE)
            reads = ", ".join(m.ref + (" (stage)" if m.stage else "") for m in p.models)
            lines.append(f"  {name}: {p.method} of {reads}; {len(p.tensors)} tensors, {human(p.write_bytes)}" + (" (kept)" if kept else " (not written)"))
    lines.append(f"outputs ({len(graph.targets)}):")
    for t in graph.targets:
        where = t.out_dir("OUT", keep_dir or "KEEP")
        lines.append(f"  {t.name or '(final)'} -> {where}: {t.plan.method}, {len(t.plan.tensors)} tensors, writes {human(t.plan.write_bytes)}")
    lines.append(
        f"reads {human(read_bytes(graph))} once for all outputs; writes {human(sum(t.plan.write_bytes for t in graph.targets))}; "
        f"peak working memory per rank ~{human(graph.peak_memory)}"
    )
    saved = bytes_saved(graph)
    if saved:
        lines.append(f"saves {human(saved)} of I/O against writing each intermediate stage and reading it back (mergekit-multi)")
    for t in graph.targets:
        lines += ["", f"== {t.name or '(final)'} ==", describe(t.plan, world_size, per_tensor)]
    return "\n".join(lines)


def _named_stages(plan) -> list:
    """(name, plan) of every stage ``plan`` reads, innermost first."""
    out = []
    for name, stage in plan.stages.items():
        out += [*_named_stages(stage), (name, stage)]
    return out


def describe(p, world_size: int = 1, per_tensor: bool = False) -> str:
    """The plan for people: summary, what is left out, layer map, files, ranks; with
    ``per_tensor`` every output tensor too."""
    from distmerge.architecture import layer_count
    from distmerge.plan import CPU_FLOPS_PER_S, IO_BYTES_PER_S, assign_tensors, imbalance, rank_work

    lines = [
        f"method: {p.method}   dtype: {p.dtype or 'as inputs'}   seed: {p.seed}   fingerprint: {p.fingerprint[:16]}",
        "models:",
        *[f"  [{i}] {m.ref}  ({m.num_layers} layers)  {m.path}" for i, m in enumerate(p.models)],
        f"output: {len(p.tensors)} tensors, {layer_count(p.config)} layers, {len(p.files)} files",
        f"reads {human(p.read_bytes)}, writes {human(p.write_bytes)}, "
        f"peak working memory per rank ~{human(p.peak_memory)} (largest tensor's inputs in float32 + result)",
        *describe_stacks(p),
        *describe_quantized(p),
    ]
    reindexed = [t.name for t in p.tensors if t.vocab is not None]
    vocab_size = p.config.get("vocab_size")
    lines.append(
        f"tokenizer: from [{p.tokenizer_source}] {p.models[p.tokenizer_source].ref}"
        + (f" + {len(p.added_tokens)} added tokens" if p.added_tokens else "")
        + f"; vocab_size {vocab_size}"
        + (f"; rows re-indexed to it in {', '.join(reindexed)}" if reindexed else "")
    )
    lines += describe_left_out(p)
    if p.layer_map:
        lines.append("layer map (output layers <- model:layers):")
        for first, last, sources in layer_runs(p.layer_map):
            out = f"{first}" if first == last else f"{first}-{last}"
            span = last - first
            lines.append(f"  {out:>9} <- " + ", ".join(f"{m}:{k}" if not span else f"{m}:{k}-{k + span}" for m, k in sources))
    lines.append(f"files ({len(p.files)}):")
    shown = p.files if len(p.files) <= 8 or per_tensor else [*p.files[:3], None, p.files[-1]]
    lines += [f"  {f.name}  {human(f.nbytes)}  {len(f.tensors)} tensors  reads {human(f.read_bytes)}" if f else "  ..." for f in shown]
    shares = assign_tensors(p, world_size)
    contiguous = all(share == list(range(share[0], share[-1] + 1)) for share in shares if share)
    how = "a contiguous run of tensors" if contiguous else "the largest tensors first, spread over all ranks"
    lines.append(
        f"ranks ({world_size}): each merges {how}, balanced by estimated time: bytes read + written at "
        f"{human(IO_BYTES_PER_S)}/s + the merges' operations at {flops(CPU_FLOPS_PER_S)}/s (rough rates of one CPU thread)"
    )
    for r, (share, w) in enumerate(zip(shares, rank_work(p, shares))):
        first = p.tensors[share[0]].name if share else "-"
        lines.append(
            f"  rank {r}: {len(share)} tensors from {first}, moves {human(w.bytes)}, computes {flops(w.flops)}, "
            f"~{duration(w.seconds)}, peak working memory ~{human(w.peak_memory)}"
        )
    lines.append(f"imbalance: the busiest rank's estimated time is {imbalance(p, shares) * 100:.1f}% more than the mean")
    if not per_tensor:
        lines.append(f"({len(p.tensors)} tensors: --tensors lists each with its inputs and parameters, --json gives the whole plan)")
        return "\n".join(lines)
    lines.append("tensors:")
    for t in p.tensors:
        srcs = ([f"base={p.models[t.base.model].ref}:{t.base.name}"] if t.base else []) + [f"{p.models[r.model].ref}:{r.name}" for r in t.inputs]
        params = {**t.params, **t.input_params}
        lines.append(f"  {t.name} {t.dtype}{t.shape} <- " + ", ".join(srcs) + (f"  {params}" if params else ""))
    return "\n".join(lines)


def describe_stacks(p) -> list[str]:
    """A line per layer stack of the output: its prefix, its role, its layer count and the
    config key that count is written at."""
    from distmerge.architecture import layer_stacks, stack_layer_name

    names = [t.name for t in p.tensors]
    lines = []
    for s in sorted(layer_stacks(p.config, names), key=lambda s: s.role != "text"):  # the text decoder first
        found = {split.index for n in names if (split := stack_layer_name(n)) and split.stack == s.prefix}
        count = s.count if s.count is not None else len(found)
        at = f"config {s.key}" if s.key else "no config key"
        lines.append(f"  {s.prefix}.N ({s.role}): {count} layers, {at}")
    return [f"layer stacks ({len(lines)}):", *lines] if lines else ["layer stacks: none (no numbered layers)"]


def describe_quantized(p) -> list[str]:
    """A line per quantized input model and format: how many of its tensors are dequantized
    while read, and what they become."""
    groups: dict[tuple[int, str, str], dict[str, set]] = {}
    for t in p.tensors:
        for r in t.all_inputs:
            if r.quant:
                block = "x".join(map(str, r.quant["block"]))
                g = groups.setdefault((r.model, r.quant["format"], block), {"names": set(), "out": set()})
                g["names"].add(r.name)
                g["out"].add(t.dtype)
    if not groups:
        return []
    kinds = {"fp8": "block-scaled fp8", "mxfp4": "mxfp4"}
    lines = [f"quantized inputs ({len(groups)}):"]
    for (model, fmt, block), g in sorted(groups.items()):
        lines.append(
            f"  [{model}] {p.models[model].ref}: {len(g['names'])} tensors {kinds.get(fmt, fmt)} (block {block}), "
            f"dequantized to float32 while read, merged in float32, written as {', '.join(sorted(g['out']))}"
        )
    return lines


def layer_runs(layer_map) -> list[tuple[int, int, list]]:
    """The layer map as runs of output layers whose sources all advance by one layer:
    [(first output layer, last, [(model, its first layer), ...]), ...]."""
    runs: list[tuple[int, int, list]] = []
    for i, sources in enumerate(layer_map):
        if runs:
            first, last, start = runs[-1]
            step = i - first
            if last == i - 1 and [(m, k - step) for m, k in sources] == [tuple(x) for x in start]:
                runs[-1] = (first, i, start)
                continue
        runs.append((i, i, [tuple(x) for x in sources]))
    return runs


def describe_left_out(p) -> list[str]:
    """The input tensors the run will not merge (not read, or read only to dequantize others), a
    line per model and reason."""
    from distmerge.architecture import layer_index
    from distmerge.plan import layer_ranges

    if not p.left_out:
        return ["left out: nothing (every input tensor is read)"]
    lines = [f"left out (not merged): {sum(len(g.tensors) for g in p.left_out)} input tensors"]
    for g in p.left_out:
        layers = {i for n in g.tensors if (i := layer_index(n)) is not None}
        what = f"layers {layer_ranges(layers)}" if layers else ", ".join(g.tensors[:3]) + (", ..." if len(g.tensors) > 3 else "")
        lines.append(f"  [{g.model}] {p.models[g.model].ref}: {len(g.tensors)} tensors ({what}): {g.reason}")
    return lines


def mergekit_options(f):
    """mergekit-yaml's own options, accepted and hidden from --help (README: "mergekit-yaml's
    options"): typed from habit, they translate or are ignored with a warning."""
    from distmerge.mergekit_cli import FOREIGN, SHORT, keyword

    for o in reversed(list(FOREIGN.values())):
        decls = {"bool": [f"--{o.flag}/--no-{o.flag}"], "flag": [f"--{o.flag}"], "count": ["-v"]}.get(o.kind, [f"--{o.flag}"])
        extra = {"bool": {"default": None}, "flag": {"is_flag": True}, "count": {"count": True}, "int": {"type": int}}.get(o.kind, {})
        f = click.option(*decls, *([SHORT[o.flag]] if o.flag in SHORT else []), keyword(o.flag), hidden=True, **extra)(f)
    return f


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@shard_option
@seed_option
@pickle_option
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto (cuda when available).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory's merge (deletes only the files distmerge wrote).")
@click.option("--hash-inputs", is_flag=True, help="Also record and, on resume, check a sha256 of every input file's content (reads every input at setup and at each resume: 1-2 s per GB, measured).")
@click.option("--allow-nonfinite", is_flag=True, help="Keep tensors that come out with NaN or Inf.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds a silent rank is tolerated before the job stops.")
@click.option("--report-json", type=click.Path(dir_okay=False), help="Write the run report (phases, GB/s, memory per rank) here.")
@click.option("--log-every", default=30.0, show_default=True, help="Seconds between progress lines when stderr is not a terminal.")
@click.option("--io", "io", type=click.Choice(["mmap", "pread"]), default="mmap", show_default=True, help="Read inputs memory-mapped, or with pread (network file systems).")
@click.option("--buffered-writes", is_flag=True, help="Write outputs through the page cache, not around it (O_DIRECT): for file systems where direct writes are slow.")
@click.option("--push-to-hub", "push_to", metavar="REPO", help="Upload the verified output to this hub repo when done.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@keep_option
@mergekit_options
def run(recipe, out, out_shard_size, random_seed, allow_pickle, device, overwrite, hash_inputs, allow_nonfinite, quiet, timeout, report_json, log_every, io, buffered_writes, push_to, private, keep_intermediates, **mergekit):
    """Merge RECIPE into the directory OUT (alone, or as one rank under torchrun or srun).

    mergekit-yaml's options are accepted too: --cuda means --device cuda; the others are not
    needed here and are ignored with a warning saying why."""
    from distmerge.dist import detect
    from distmerge.job import JobOptions, run_job
    from distmerge.mergekit_cli import keyword, warnings
    from distmerge.recipe import recipe_warnings

    cuda = mergekit.pop(keyword("cuda"))
    if cuda is not None:
        wanted = "cuda" if cuda else "cpu"
        if device not in ("auto", wanted):
            raise click.UsageError(f"--{'' if cuda else 'no-'}cuda (mergekit's spelling of --device {wanted}) contradicts --device {device}")
        device = wanted
    if detect().rank == 0:
        for line in warnings(mergekit):
            click.echo(line, err=True)
        for line in recipe_warnings(recipe):
            click.echo(f"warning: {line}", err=True)

    options = JobOptions(
        out_shard_bytes=parse_size(out_shard_size), seed=random_seed, device=device, overwrite=overwrite, hash_inputs=hash_inputs,
        allow_nonfinite=allow_nonfinite, quiet=quiet, timeout_s=timeout, allow_pickle=allow_pickle,
        report_json=report_json, log_seconds=log_every, io=io, direct_writes=not buffered_writes,
        keep_intermediates=keep_intermediates,
    )  # fmt: skip
    if push_to and _outputs(recipe, keep_intermediates) > 1:
        raise click.UsageError("--push-to-hub takes a recipe with one output; push each output with `distmerge push DIR REPO` after the run")
    result = run_job(recipe, out, options)
    if not result.graph.single:
        n = len(result.graph.targets)
        if result.rank == 0 and not quiet and result.complete:
            click.echo(f"all {n} outputs are already complete: an earlier run merged every tensor; nothing to merge, their files are finished and verified")
        elif result.rank == 0 and not quiet:
            for t in result.graph.targets:
                p = t.plan
                click.echo(f"wrote {t.out_dir(out, keep_intermediates)}: {len(p.files)} files, {len(p.tensors)} tensors, {human(p.write_bytes)}")
            again = f" (resumed: kept {result.kept} tensors from the earlier run)" if result.resumed else ""
            click.echo(f"{n} output{'s' if n > 1 else ''}{again} on {result.world_size} rank(s) in {result.seconds:.1f}s, peak RSS {human(result.peak_rss)} (rank 0)")
        return
    if result.rank == 0 and not quiet and result.complete:
        click.echo(f"{out} is already complete: all {result.kept} tensors were merged by an earlier run; nothing to merge, its files are finished and verified")
    elif result.rank == 0 and not quiet:
        p = result.plan
        again = f" (resumed): kept {result.kept} of {len(p.tensors)} tensors from the earlier run, merged {len(p.tensors) - result.kept} now;" if result.resumed else ":"
        click.echo(
            f"wrote {out}{again} {len(p.files)} files, {len(p.tensors)} tensors, {human(p.write_bytes)} "
            f"on {result.world_size} rank(s) in {result.seconds:.1f}s, peak RSS {human(result.peak_rss)} (rank 0)"
        )
        r = result.report
        seconds = r["ranks"][0]["seconds"]
        if result.kept < len(p.tensors):  # rates of this run's work (none when an earlier run merged it all)
            click.echo(
                f"  {r['gb_per_s'] or 0:.2f} GB/s moved; rank 0 time in read {seconds['read']:.1f}s, merge "
                f"{seconds['merge']:.1f}s, write {seconds['write']:.1f}s, sync {seconds['sync']:.1f}s; "
                f"imbalance between ranks {r['imbalance'] * 100:.0f}%"
            )
        if any("triton" in path or "self-check" in path for path in r.get("kernels", {}).values()):  # on a GPU
            click.echo("  kernels: " + "; ".join(f"{m}: {path}" for m, path in r["kernels"].items()))
    if result.rank == 0 and push_to:
        from distmerge.hub import push

        url = push(out, push_to, private=private)
        if not quiet:
            click.echo(f"pushed to {push_to}: {url}")


def _outputs(recipe_path: str, keep_intermediates: str | None) -> int:
    """How many outputs the recipe file writes, from its text alone (0 if it cannot be read:
    the run says why)."""
    from distmerge.recipe import load_recipes, sweep_variants

    try:
        recipes = load_recipes(recipe_path)
    except MergeError:
        return 0
    final = next((r for r in recipes if not r.name), recipes[-1])
    named = sum(1 for r in recipes if r.name and r is not final) if keep_intermediates else 0
    return named + (len(sweep_variants(final)) if final.sweep else 1)


@cli.command("push")
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private.")
def push_command(out, repo, private):
    """Verify the merge in OUT and upload it to the hub repo REPO."""
    from distmerge.hub import push

    click.echo(f"pushed to {repo}: {push(out, repo, private=private)}")


@cli.command("verify")
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@click.option("--full", is_flag=True, help="Also re-hash every byte of every file against the manifest (reads everything).")
def verify_command(out, full):
    """Check the merged checkpoint in OUT against its manifest (every file distmerge wrote), index and config."""
    from distmerge.verify import verify

    problems = verify(out, full=full)
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        raise SystemExit(1)
    click.echo(f"{out}: OK ({'every byte of every file matches its recorded sha256' if full else 'sizes and headers check out'})")


@cli.command("eval")
@click.argument("model", type=click.Path(file_okay=False))
@eval_options
@click.option("--json", "as_json", is_flag=True, help="Print the result (score, metrics, cached, model_hash) as JSON.")
def eval_command(model, as_json, **options):
    """Score the checkpoint MODEL with lm-evaluation-harness tasks or a command (--eval-cmd).

    Scores are cached by the checkpoint's content: the same bytes are evaluated once."""
    from dataclasses import asdict

    from distmerge.evaluate import evaluate, spec_from_options

    result = evaluate(model, spec_from_options(**options))
    if as_json:
        click.echo(json.dumps(asdict(result), indent=1))
        return
    for name, value in result.metrics.items():
        click.echo(f"{name:40s} {value:.4f}")
    click.echo(f"{'score':40s} {result.score:.4f}{'  (cached)' if result.cached else ''}")


@cli.command("soup")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("ingredients", nargs=-1)
@click.option("--ingredients-file", type=click.File(), help="Also the ingredients listed in this file, one path a line.")
@click.option("--greedy", is_flag=True, help="Greedy soup: add each ingredient, best first, only if the score does not drop.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="dtype of the final checkpoint  [default: the ingredients']")
@eval_options
@shard_option
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto (cuda when available) for the merges.")
@click.option("--quiet", is_flag=True, help="No progress bars for the merges.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds a silent rank is tolerated before the job stops.")
def soup_command(out, ingredients, ingredients_file, greedy, dtype, out_shard_size, device, quiet, timeout, **eval_kw):
    """Average fine-tunes of one base (INGREDIENTS) into OUT: the uniform soup, or with --greedy
    the greedy soup (Wortsman et al. 2022). Alone, or as one rank under torchrun or srun;
    rerunning the same command resumes."""
    from distmerge.dist import detect
    from distmerge.evaluate import spec_from_options
    from distmerge.job import JobOptions
    from distmerge.soup import SoupOptions, run_soup

    listed = [line.strip() for line in ingredients_file or [] if line.strip() and not line.startswith("#")]
    spec = spec_from_options(**eval_kw) if eval_kw["tasks"] or eval_kw["eval_cmd"] else None
    job = JobOptions(out_shard_bytes=parse_size(out_shard_size), device=device, quiet=quiet, timeout_s=timeout)
    say = (lambda line: click.echo(line, err=True)) if detect().rank == 0 else (lambda line: None)
    run_soup(out, [*ingredients, *listed], spec, SoupOptions(greedy=greedy, dtype=dtype, job=job), say)


@cli.command("evolve")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False), required=False)
@shard_option
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto (cuda when available) for the merges.")
@click.option("--quiet", is_flag=True, help="No progress bars for the merges.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds a silent rank is tolerated before the job stops.")
def evolve_command(config, out, out_shard_size, device, quiet, timeout):
    """Search a merge recipe by evolution (CMA-ES over a recipe's numbers, or a GA over a layer
    path) as CONFIG says, into OUT (default: the config's out:). Alone, or as one rank under
    torchrun or srun; rerunning the same command resumes."""
    from distmerge.dist import detect
    from distmerge.evolve import load_config, run_evolve
    from distmerge.job import JobOptions

    cfg = load_config(config)
    out = out or cfg.out
    if not out:
        raise MergeError(f"{config}: no output directory; give OUT after the config, or out: in it")
    job = JobOptions(out_shard_bytes=parse_size(out_shard_size), device=device, quiet=quiet, timeout_s=timeout)
    say = (lambda line: click.echo(line, err=True)) if detect().rank == 0 else (lambda line: None)
    run_evolve(cfg, out, job, say)


@cli.command("extract-lora")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--base", "base", required=True, help="The base model B (directory or hub id).")
@click.option("--model", "model", required=True, help="The fine-tune M of B to extract.")
@click.option("--rank", default=16, show_default=True, type=int, help="Rank of every decomposed weight.")
@click.option("--module-rank", "module_ranks", multiple=True, metavar="MODULE=RANK", help="Rank for the modules MODULE names (mlp, self_attn.q_proj, layers.0.mlp); repeatable, the longest match wins.")
@click.option("--rank-by-energy", "energy", type=float, default=None, metavar="FRACTION", help="Instead of a fixed rank: per tensor the smallest rank keeping FRACTION of the squared singular values.")
@click.option("--dtype", default=None, help="dtype of the adapter's tensors (float32, bfloat16, float16)  [default: the model's]")
@click.option("--skip-full", is_flag=True, help="Leave out the embeddings, LM head, norms and other tensors that are not 2-D linear weights, instead of saving them whole (modules_to_save).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, or auto (cuda when available): where the SVDs run.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds a silent rank is tolerated before the job stops.")
def extract_lora_command(out, base, model, rank, module_ranks, energy, dtype, skip_full, device, timeout):
    """Write a PEFT LoRA adapter into OUT that turns BASE into MODEL: truncated SVDs of
    MODEL - BASE per 2-D linear weight. Alone, or as one rank under torchrun or srun;
    rerunning the same command resumes."""
    from distmerge.dist import detect
    from distmerge.extract_lora import ExtractOptions, extract, modules_pattern

    options = ExtractOptions(
        rank=rank, module_ranks=[modules_pattern(t) for t in module_ranks], energy=energy, dtype=dtype,
        skip_full=skip_full, device=device, timeout_s=timeout,
    )  # fmt: skip
    result = extract(base, model, out, options)
    if detect().rank != 0:
        return
    lora = [i for i in result.items if i.kind == "lora"]
    ranks = sorted({result.config["rank_pattern"].get(i.name.rsplit(".", 1)[0], result.config["r"]) for i in lora})
    again = f" (resumed: {result.kept} tensors kept from the earlier run)" if result.kept else ""
    click.echo(
        f"wrote {out}{again}: {len(lora)} weights as LoRA factors (rank {ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else "")
        + f"), {len(result.config['modules_to_save'] or [])} modules whole, in {result.seconds:.1f}s"
    )
    by_reason: dict[str, list[str]] = {}
    for name, reason in result.left_out:
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        click.echo(f"left out: {len(names)} tensor(s) ({shown}): {reason}", err=True)


@cli.command("align")
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--to", "reference", required=True, help="The reference model whose unit order MODEL is permuted to match.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the order in which the permutations are updated (weight matching).")
@click.option("--data", type=click.Path(dir_okay=False), help="A text file: match activations on its tokens (residual stream rotated, MLP units and heads permuted, values and query/key planes rotated) instead of weights.")
@click.option("--rows", default=256, show_default=True, type=click.IntRange(min=1), help="With --data: at most this many windows of its tokens.")
@click.option("--length", default=64, show_default=True, type=click.IntRange(min=2), help="With --data: tokens per window (at most max_position_embeddings).")
def align_command(model, out, reference, seed, data, rows, length):
    """Align MODEL's hidden units (residual stream, MLP units, attention heads) to REFERENCE
    and write the aligned checkpoint, which computes the same function, into OUT, with
    align.json: Git Re-Basin weight matching, or with --data activation matching (README,
    "Git Re-Basin"). Llama-shaped checkpoints only."""
    from distmerge.align import align

    r = align(model, reference, out, seed=seed, data=data, rows=rows, length=length)
    moved = sum(1 for v in r.moved.values() if v)
    how = f"in {r.iterations} passes" if r.method == "weights" else "matching activations, residual stream " + ("rotated" if "residual" not in r.perms else "permuted")
    click.echo(
        f"wrote {out}: {moved} of {len(r.moved)} permutations moved units; Σ<W_ref, W> "
        f"{r.objective_before:.4g} -> {r.objective_after:.4g} {how}, {r.seconds:.1f}s"
    )


@cli.command("methods")
@click.option("--markdown", is_flag=True, help="Print the README's table of methods.")
def list_methods(markdown):
    """List the merge methods and their parameters."""
    from distmerge.methods import METHODS, markdown_table

    if markdown:
        click.echo(markdown_table(), nl=False)
        return
    for m in sorted(METHODS.values(), key=lambda m: m.name):
        params = ", ".join(f"{p.name}{'' if p.required else '=' + repr(p.default)}" for p in m.params)
        click.echo(f"{m.name:18s} base {m.base:8s} {m.summary}\n{'':18s} parameters: {params or 'none'}")


@cli.command("slurm")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- RUN_OPTIONS...]")
@click.option("--nodes", required=True, type=click.IntRange(min=1), help="Nodes to run on.")
@click.option("--gpus-per-node", required=True, type=click.IntRange(min=1), help="Ranks (GPUs) per node.")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time", "time_limit", default="04:00:00", show_default=True, help="Slurm time limit (a rerun resumes).")
@click.option("--account", default=None, help="Slurm account.")
@click.option("--cpus-per-task", default=None, type=click.IntRange(min=1), help="CPU cores per node's task  [default: 4 per GPU]")
@click.option("--job-name", default="distmerge", show_default=True)
@click.option("--out-shard-size", default=None, help="Passed to `distmerge run` (default there: 5GB).")
@click.option("--random-seed", default=None, type=int, help="Passed to `distmerge run`.")
@click.option("--evolve", is_flag=True, help="RECIPE is a `distmerge evolve` config: the script runs the search on every rank.")
def slurm_command(recipe, out, run_args, nodes, gpus_per_node, partition, time_limit, account, cpus_per_task, job_name, out_shard_size, random_seed, evolve):
    """Print an sbatch script that merges RECIPE into OUT with srun + torchrun.

    RECIPE is planned first, as `distmerge plan` does (hub models are downloaded into the
    cache): a recipe that cannot run is refused here, not after the job waited in the queue.
    Options after `--` go to `distmerge run` as they are (`-- --io pread --log-every 60`).
    """
    import os

    from distmerge.job import JobOptions, make_graph
    from distmerge.slurm import sbatch_script

    if evolve:
        return _slurm_evolve(recipe, out, run_args, nodes, gpus_per_node, partition, time_limit, account, cpus_per_task, job_name, out_shard_size, random_seed)
    passed = [*(["--out-shard-size", out_shard_size] if out_shard_size is not None else []),
              *(["--random-seed", str(random_seed)] if random_seed is not None else []), *run_args]  # fmt: skip
    try:  # refuse a typo now, not on the cluster
        args = run.make_context("run", [recipe, out, *passed]).params
        options = JobOptions(
            out_shard_bytes=parse_size(args["out_shard_size"]), seed=args["random_seed"], allow_pickle=args["allow_pickle"],
            keep_intermediates=args["keep_intermediates"],
        )  # fmt: skip
    except click.ClickException as e:
        raise click.UsageError(f"{e.format_message()} (in the options for `distmerge run`)") from None
    graph = make_graph(recipe, options)
    plans = [t.plan for t in graph.targets]
    what = plans[0].method if graph.single else f"{len(plans)} outputs"
    click.echo(
        f"checked {recipe}: {what}, {sum(len(p.tensors) for p in plans)} tensors in {sum(len(p.files) for p in plans)} files; "
        f"reads {human(sum(p.read_bytes for p in plans))}, writes {human(sum(p.write_bytes for p in plans))}; "
        f"peak working memory per rank ~{human(graph.peak_memory)}",
        err=True,
    )
    click.echo(
        sbatch_script(
            os.path.abspath(recipe), os.path.abspath(out), nodes=nodes, gpus_per_node=gpus_per_node,
            cpus_per_task=cpus_per_task, time=time_limit, partition=partition, account=account,
            job_name=job_name, out_shard_size=out_shard_size, random_seed=random_seed, extra_args=run_args,
        ),  # fmt: skip
        nl=False,
    )


def _slurm_evolve(config, out, run_args, nodes, gpus_per_node, partition, time_limit, account, cpus_per_task, job_name, out_shard_size, random_seed):
    """`distmerge slurm --evolve`: the config checked here (as `distmerge evolve` reads it), then the script."""
    import os

    from distmerge.evolve import load_config
    from distmerge.slurm import sbatch_script

    if random_seed is not None:
        raise click.UsageError("--random-seed is for merges; a search takes its seed from the config (seed: N)")
    passed = [*(["--out-shard-size", out_shard_size] if out_shard_size is not None else []), *run_args]
    try:  # refuse a typo now, not on the cluster
        evolve_command.make_context("evolve", [config, out, *passed])
    except click.ClickException as e:
        raise click.UsageError(f"{e.format_message()} (in the options for `distmerge evolve`)") from None
    cfg = load_config(config)
    click.echo(f"checked {config}: search {cfg.search}, {cfg.dim} genes, {cfg.population} candidates x {cfg.generations} generations", err=True)
    click.echo(
        sbatch_script(
            os.path.abspath(config), os.path.abspath(out), nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
            time=time_limit, partition=partition, account=account, job_name=job_name, out_shard_size=out_shard_size,
            extra_args=run_args, evolve=True,
        ),  # fmt: skip
        nl=False,
    )


def main(argv=None) -> None:
    """Entry point. Exit codes: 0 done; 1 ``verify`` found problems; 2 a user error
    (MergeError: one line, no traceback; or a click usage error); 3 an internal error (a
    bug): one line naming it, the traceback saved to a new ``distmerge-crash-*.log`` in
    $TMPDIR (the line gives its path); 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (a run
    says what it kept and that rerunning the same command resumes)."""

    def who(message: str) -> str:  # "rank N: " when this is one rank of several
        from distmerge.dist import detect

        env = detect()
        return f"rank {env.rank}: " if env.world_size > 1 and not message.startswith(("rank ", "stopping: ")) else ""

    try:
        cli.main(args=argv, prog_name="distmerge", standalone_mode=False)
    except MergeError as e:
        click.echo(f"error: {who(str(e))}{e}", err=True)
        sys.exit(2)
    except Stopped as e:  # Ctrl-C or SIGTERM during a run: say what was kept and how to resume
        click.echo(f"stopped: {who(str(e))}{e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: one line for the user, the traceback kept for the report
        import tempfile
        import traceback

        text = traceback.format_exc()
        try:
            fd, path = tempfile.mkstemp(prefix="distmerge-crash-", suffix=".log")
            with open(fd, "w") as f:
                f.write(f"distmerge {__version__}\nargs: {sys.argv[1:] if argv is None else argv}\n\n{text}")
            where = f"the traceback is in {path}"
        except OSError as log_error:  # nowhere to keep it: show it rather than lose it
            sys.stderr.write(text)
            where = f"the traceback is above (it could not be saved: {log_error.strerror or log_error})"
        what = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        click.echo(f"internal error: {who(what)}{what}, please report it at https://github.com/distmerge/distmerge/issues; {where}", err=True)
        sys.exit(3)


def entry(argv=None) -> None:
    """The ``distmerge`` command (and ``python -m distmerge.cli``): ``main``, then an exit
    without the interpreter's last garbage collections. Those walk every object torch made
    at import, to no purpose at exit: 0.4-0.6 s of every command's wall time on this
    project's machines (a passthrough merge of 2.5 GB: 3.2-3.7 s against 3.9-4.3 s). Frozen
    objects are still freed when their last reference goes; only cycles among them are
    left to the operating system, and everything a command writes is closed and synced
    before ``main`` returns. Not in ``main`` itself, which tests call in their own process."""
    try:
        main(argv)
    finally:
        gc.freeze()


if __name__ == "__main__":
    entry()

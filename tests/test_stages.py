"""Multi-stage recipes (mergekit-multi's format), fused into one pass: the specification.

A recipe file of several YAML documents: each may have a ``name``; a later document uses an
earlier name as a model; the unnamed document (else the last) is the final output, written
to OUT. distmerge computes each final tensor in one pass from its whole expression and never
writes an intermediate, but rounds every intermediate tensor to its stage's output dtype as
a written checkpoint would hold it. So the result must be BYTE-IDENTICAL to the staged run:
each stage merged alone by distmerge into a directory named as the stage, next to the recipe
files of the documents that read it. (A model reference resolves relative to its recipe
file's directory, and DARE/DELLA seeds derive from the reference's text: the staged recipes
name each intermediate by the very text the multi-document file uses.)

``--keep-intermediates DIR`` also writes every named stage to DIR/NAME from the same pass.
mergekit-multi (mergekit 0.1.5) is the reference for the format and, on float32 recipes,
for the values.
"""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from distmerge.cli import human
from tests.helpers import REPO_ROOT, assert_same_tensors, load_state, numel_bytes, run_cli, run_main
from tests.test_tokenizer import vocab_family  # noqa: F401  (fixture: tiny models whose vocabularies differ)

FINAL = "final"
"""The staged run's directory (and recipe file name) for the final document."""

SMALL_FILES = ("--out-shard-size", "60KB")
"""Several output files per checkpoint (a tiny model is ~330 KB in bf16)."""

NOT_COMPARED = {"README.md", "distmerge_config.yml"}
"""Files that quote the recipe text, which differs between the fused and the staged runs."""


# ---------------------------------------------------------------- running both ways


def stage_refs(doc, names: set[str]) -> set[str]:
    """The stage names a document uses (any string value equal to a name)."""
    if isinstance(doc, dict):
        return set().union(*(stage_refs(v, names) for k, v in doc.items() if k != "name"))
    if isinstance(doc, list):
        return set().union(*(stage_refs(v, names) for v in doc))
    return {doc} & names if isinstance(doc, str) else set()


def final_doc(docs: list[dict]) -> dict:
    return next((d for d in docs if "name" not in d), docs[-1])


def run_staged(docs: list[dict], root: Path, *options: object) -> dict[str, Path]:
    """Each document merged alone with distmerge, every stage before the documents that read
    it: ROOT/NAME.yml (the document without its ``name``) into ROOT/NAME. Returns name ->
    directory, the final document's under FINAL as well."""
    root.mkdir(parents=True)
    names = {d["name"] for d in docs if "name" in d}
    done: dict[str, Path] = {}
    pending = list(docs)
    while pending:
        doc = next(d for d in pending if stage_refs(d, names) <= done.keys())
        pending.remove(doc)
        name = doc.get("name", FINAL)
        recipe = root / f"{name}.yml"
        recipe.write_text(yaml.safe_dump({k: v for k, v in doc.items() if k != "name"}, sort_keys=False))
        r = run_main("run", recipe, root / name, "--quiet", *options)
        assert r.returncode == 0, f"staged {name}: {r.stderr}"
        done[name] = root / name
    done[FINAL] = done[final_doc(docs).get("name", FINAL)]
    return done


def write_stages(docs: list[dict], root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    recipe = root / "stages.yml"
    recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return recipe


def run_fused(docs: list[dict], root: Path, *options: object, env: dict | None = None) -> Path:
    """The multi-document file ROOT/stages.yml run in one pass into ROOT/out."""
    recipe = write_stages(docs, root)
    r = run_main("run", recipe, root / "out", "--quiet", *options, env=env)
    assert r.returncode == 0, r.stderr
    return root / "out"


def assert_identical(ours: Path, staged: Path) -> None:
    """The same files with the same bytes (shards, index, config, generation config, tokenizer
    files), but those that quote the recipe."""
    files = sorted(p.name for p in staged.iterdir() if p.is_file() and p.name not in NOT_COMPARED)
    assert [n for n in files if n.startswith("model-")], f"no shards in {staged}"
    assert files == sorted(p.name for p in ours.iterdir() if p.is_file() and p.name not in NOT_COMPARED)
    for name in files:
        if not filecmp.cmp(ours / name, staged / name, shallow=False):
            if name.endswith(".safetensors"):
                assert_same_tensors(ours, staged)  # names the tensors that differ
            raise AssertionError(f"{name} differs between {ours} and {staged}")


# ---------------------------------------------------------------- the chains


def m(path, **params) -> dict:
    return {"model": str(path), "parameters": params} if params else {"model": str(path)}


def slerp_ties(f) -> list[dict]:
    """Two stages, bf16: a slerp with a gradient, then TIES over the stage and a fine-tune."""
    return [
        {"name": "s1", "merge_method": "slerp", "base_model": str(f["base"]), "models": [m(f["base"]), m(f["ft1"])],
         "parameters": {"t": [0.1, 0.6, 0.3]}, "dtype": "bfloat16"},
        {"merge_method": "ties", "base_model": str(f["base"]), "dtype": "bfloat16",
         "models": [m("s1", weight=0.6, density=0.5), m(f["ft2"], weight=0.4, density=0.7)]},
    ]  # fmt: skip


def slerp_passthrough_task_arithmetic(f) -> list[dict]:
    """Three stages, bf16, 8 layers: the middle stage remaps layers (its output layer i is the
    first stage's layer i + 2), so the final reads the first stage through a layer map."""
    return [
        {"name": "s1", "merge_method": "slerp", "base_model": str(f["base"]), "models": [m(f["base"]), m(f["ft1"])],
         "parameters": {"t": 0.4}, "dtype": "bfloat16"},
        {"name": "s2", "merge_method": "passthrough", "dtype": "bfloat16",
         "slices": [{"sources": [{"model": "s1", "layer_range": [2, 6]}]}, {"sources": [{"model": str(f["ft2"]), "layer_range": [0, 4]}]}]},
        {"merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "bfloat16",
         "models": [m("s2", weight=0.7), m(f["ft1"], weight=0.3)]},
    ]  # fmt: skip


def linear_ties_passthrough_f32(f) -> list[dict]:
    """Three stages on float32 models: a linear stage computed in float32 but written in bf16
    (out_dtype: its tensors are rounded to bf16 before TIES reads them), TIES in float32, and
    a final passthrough of slices of the TIES stage and of a fine-tune (6 layers)."""
    return [
        {"name": "s1", "merge_method": "linear", "models": [m(f["ft1"], weight=0.5), m(f["ft2"], weight=0.5)],
         "dtype": "float32", "out_dtype": "bfloat16"},
        {"name": "s2", "merge_method": "ties", "base_model": str(f["base"]), "dtype": "float32",
         "models": [m("s1", weight=1.0, density=0.5), m(f["ft3"], weight=0.5, density=0.5)]},
        {"merge_method": "passthrough", "dtype": "float32",
         "slices": [{"sources": [{"model": "s2", "layer_range": [0, 3]}]}, {"sources": [{"model": str(f["ft3"]), "layer_range": [1, 4]}]}]},
    ]  # fmt: skip


def dare_ties_chain(f) -> list[dict]:
    """Randomized methods in both documents: DARE-TIES over fine-tunes, then over that stage."""
    return [
        {"name": "s1", "merge_method": "dare_ties", "base_model": str(f["base"]), "dtype": "bfloat16",
         "models": [m(f["ft1"], weight=0.5, density=0.5), m(f["ft2"], weight=0.5, density=0.5)]},
        {"merge_method": "dare_ties", "base_model": str(f["base"]), "dtype": "bfloat16",
         "models": [m("s1", weight=0.7, density=0.6), m(f["ft3"], weight=0.3, density=0.6)]},
    ]  # fmt: skip


def union_tokenizer_chain(f) -> list[dict]:
    """Different vocabularies (tests/test_tokenizer.py's family: base 128 tokens, ft1 and ft2
    add different specials): a union stage (131 tokens), then a final that merges the stage
    with ft1 under a tokenizer: block that takes <tool>'s row from the stage, adds a zero
    <new> token and pads: the final's tokenizer merge reads the stage's tokenizer."""
    return [
        {"name": "t1", "merge_method": "linear", "models": [m(f["ft1"], weight=0.5), m(f["ft2"], weight=0.5)],
         "tokenizer_source": "union", "dtype": "bfloat16"},
        {"merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "bfloat16",
         "models": [m("t1", weight=0.6), m(f["ft1"], weight=0.4)],
         "tokenizer": {"source": "union", "pad_to_multiple_of": 8,
                       "tokens": {"<tool>": {"source": "t1", "force": True}, "<new>": {"source": {"kind": "zero"}}}}},
    ]  # fmt: skip


def diamond(f) -> list[dict]:
    """One stage read by a later stage and by the final; the final comes first in the file
    (mergekit-multi takes the documents in any order)."""
    return [
        {"merge_method": "linear", "dtype": "bfloat16", "models": [m("s1", weight=0.5), m("s2", weight=0.5)]},
        {"name": "s1", "merge_method": "slerp", "base_model": str(f["base"]), "models": [m(f["base"]), m(f["ft1"])],
         "parameters": {"t": 0.5}, "dtype": "bfloat16"},
        {"name": "s2", "merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "bfloat16",
         "models": [m("s1", weight=0.8), m(f["ft3"], weight=0.5)]},
    ]  # fmt: skip


def stage_as_base_all_named(f) -> list[dict]:
    """A stage as the base model and tokenizer source of TIES; every document is named, so
    the last one is the final."""
    return [
        {"name": "s1", "merge_method": "slerp", "base_model": str(f["base"]), "models": [m(f["base"]), m(f["ft1"])],
         "parameters": {"t": 0.7}, "dtype": "bfloat16"},
        {"name": "last", "merge_method": "ties", "base_model": "s1", "dtype": "bfloat16", "tokenizer_source": "s1",
         "models": [m(f["ft2"], weight=0.5, density=0.5), m(f["ft3"], weight=0.5, density=0.5)]},
    ]  # fmt: skip


CHAINS = {  # id -> (family fixture, recipe documents, run options)
    "slerp-ties-bf16": ("llama_family", slerp_ties, SMALL_FILES),
    "slerp-passthrough-task_arithmetic-bf16": ("llama_deep", slerp_passthrough_task_arithmetic, ()),
    "linear-ties-passthrough-f32": ("llama_family_f32", linear_ties_passthrough_f32, SMALL_FILES),
    "dare_ties-dare_ties-bf16": ("llama_family", dare_ties_chain, ("--random-seed", "7")),
    "union-tokenizer-bf16": ("vocab_family", union_tokenizer_chain, ()),
    "diamond-bf16": ("llama_family", diamond, SMALL_FILES),
    "stage-as-base-all-named-bf16": ("llama_family", stage_as_base_all_named, ()),
}


@pytest.fixture(scope="module")
def staged(request, tmp_path_factory):
    """chain id -> (documents, options, the staged run's directories), made once per module."""
    cache: dict[str, tuple[list[dict], tuple, dict[str, Path]]] = {}

    def get(chain: str):
        if chain not in cache:
            family, build, options = CHAINS[chain]
            docs = build(request.getfixturevalue(family))
            cache[chain] = (docs, options, run_staged(docs, tmp_path_factory.mktemp("staged") / chain, *options))
        return cache[chain]

    return get


# ---------------------------------------------------------------- fused == staged, byte for byte


@pytest.mark.parametrize("chain", list(CHAINS))
def test_fused_run_is_byte_identical_to_the_stages_run_one_by_one(staged, chain, tmp_path):
    """Every shard, the index, config.json and the tokenizer files: the staged run's bytes.
    Nothing of a stage is written (only OUT appears next to the recipe)."""
    docs, options, stages = staged(chain)
    out = run_fused(docs, tmp_path, *options)
    assert_identical(out, stages[FINAL])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stages.yml"]
    assert run_main("verify", out, "--full").returncode == 0


def test_the_chains_test_what_they_claim(staged):
    """The chains above are not vacuous: the layer remapping, the bf16 rounding of a float32
    stage, the 6-layer final passthrough and the union vocabulary are in the staged outputs."""
    _, _, deep = staged("slerp-passthrough-task_arithmetic-bf16")
    s1, s2 = load_state(deep["s1"]), load_state(deep["s2"])
    assert torch.equal(s2["model.layers.0.self_attn.q_proj.weight"], s1["model.layers.2.self_attn.q_proj.weight"])
    assert json.loads((deep["s2"] / "config.json").read_text())["num_hidden_layers"] == 8
    _, _, f32 = staged("linear-ties-passthrough-f32")
    assert {t.dtype for t in load_state(f32["s1"]).values()} == {torch.bfloat16}
    assert {t.dtype for t in load_state(f32[FINAL]).values()} == {torch.float32}
    assert json.loads((f32[FINAL] / "config.json").read_text())["num_hidden_layers"] == 6
    _, _, vocab = staged("union-tokenizer-bf16")
    assert load_state(vocab["t1"])["model.embed_tokens.weight"].shape[0] == 131
    assert load_state(vocab[FINAL])["model.embed_tokens.weight"].shape[0] == 136  # 132 tokens, padded to 8


def test_randomized_chain_depends_on_the_seed(staged, tmp_path):
    """DARE's masks really are drawn: another --random-seed gives other bytes (so the
    byte-identity of the dare_ties chain is not that of a deterministic merge)."""
    docs, _, stages = staged("dare_ties-dare_ties-bf16")
    out = run_fused(docs, tmp_path, "--random-seed", "8")
    a, b = load_state(out), load_state(stages[FINAL])
    assert not torch.equal(a["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_a_stage_name_wins_over_a_directory_of_that_name(staged, llama_family, tmp_path):
    """As in mergekit-multi, a name defined in the file is the stage, even where a model
    directory of that name lies next to the recipe."""
    import shutil

    docs, options, stages = staged("slerp-ties-bf16")
    shutil.copytree(llama_family["ft3"], tmp_path / "s1")
    out = run_fused(docs, tmp_path, *options)
    assert_identical(out, stages[FINAL])


# ---------------------------------------------------------------- --keep-intermediates


@pytest.mark.parametrize(
    "chain", ["linear-ties-passthrough-f32", "slerp-passthrough-task_arithmetic-bf16", "diamond-bf16", "stage-as-base-all-named-bf16"]
)
def test_keep_intermediates_writes_every_stage_as_its_staged_run_does(staged, chain, tmp_path):
    """Every named stage goes to DIR/NAME; a named final document goes to OUT only."""
    docs, options, stages = staged(chain)
    keep = tmp_path / "keep"
    out = run_fused(docs, tmp_path, *options, "--keep-intermediates", keep)
    assert_identical(out, stages[FINAL])
    names = [d["name"] for d in docs if "name" in d and d is not final_doc(docs)]
    assert sorted(p.name for p in keep.iterdir()) == sorted(names)
    for name in names:
        assert_identical(keep / name, stages[name])
        r = run_main("verify", keep / name, "--full")
        assert r.returncode == 0, r.stderr


def test_keep_intermediates_writes_a_stage_the_final_does_not_use(llama_family, tmp_path):
    """Without --keep-intermediates an unused stage is an error (test_errors); with it, the
    stage is merged and written, and the final is unchanged."""
    f = llama_family
    docs = [
        {"name": "side", "merge_method": "linear", "models": [m(f["ft1"], weight=0.3), m(f["ft3"], weight=0.7)], "dtype": "bfloat16"},
        *slerp_ties(f),
    ]
    keep = tmp_path / "keep"
    out = run_fused(docs, tmp_path / "fused", "--keep-intermediates", keep)
    stages = run_staged(docs, tmp_path / "staged")
    assert sorted(p.name for p in keep.iterdir()) == ["s1", "side"]
    for name in ("s1", "side"):
        assert_identical(keep / name, stages[name])
    assert_identical(out, stages[FINAL])


# ---------------------------------------------------------------- mergekit-multi


def mergekit_multi(recipe: Path, out: Path, intermediates: Path) -> None:
    """``mergekit-multi RECIPE --out-path OUT -I INTERMEDIATES`` on the CPU, in a subprocess."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mergekit.scripts.multimerge", str(recipe), "--out-path", str(out), "-I", str(intermediates),
           "--no-cuda", "--lazy-unpickle", "--copy-tokenizer", "--out-shard-size", "1000000000"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.needs("mergekit")
def test_final_and_intermediates_equal_mergekit_multi_on_float32(llama_family_f32, tmp_path):
    """float32 recipes of deterministic methods: linear, slerp over that stage, then TIES
    over the slerp stage and task arithmetic's settings. mergekit-multi writes each stage
    and reads it back; distmerge fuses them. In float32 distmerge's linear, slerp and TIES
    are mergekit's bit for bit (tests/test_merge_vs_mergekit.py) and a float32 checkpoint
    stores a float32 stage exactly, so fusing must change nothing: exact equality."""
    f = llama_family_f32
    docs = [
        {"name": "lin", "merge_method": "linear", "models": [m(f["ft1"], weight=0.7), m(f["ft2"], weight=0.3)], "dtype": "float32"},
        {"name": "sl", "merge_method": "slerp", "base_model": str(f["base"]), "models": [m(f["base"]), m("lin")],
         "parameters": {"t": [0.2, 0.7]}, "dtype": "float32"},
        {"merge_method": "ties", "base_model": str(f["base"]), "dtype": "float32",
         "models": [m("sl", weight=0.8, density=0.6), m(f["ft3"], weight=-0.3, density=0.4)], "parameters": {"normalize": False}},
    ]  # fmt: skip
    keep = tmp_path / "keep"
    ours = run_fused(docs, tmp_path / "fused", "--keep-intermediates", keep)
    recipe = write_stages(docs, tmp_path / "mk")
    mergekit_multi(recipe, tmp_path / "mk" / "out", tmp_path / "mk" / "inter")
    assert sorted(p.name for p in (tmp_path / "mk" / "inter").iterdir()) == ["lin", "sl"]
    for name in ("lin", "sl"):
        assert_same_tensors(keep / name, tmp_path / "mk" / "inter" / name)
    assert_same_tensors(ours, tmp_path / "mk" / "out")
    theirs = json.loads((tmp_path / "mk" / "out" / "config.json").read_text())
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == theirs["num_hidden_layers"] == 4


# ---------------------------------------------------------------- errors at plan time


def error_cases(f) -> dict[str, tuple[list[dict], tuple, list[str]]]:
    """id -> (documents, options, what the one line of error says)."""
    s1 = slerp_ties(f)[0]
    ft = str(f["ft2"])
    return {
        "close name": ([s1, {"merge_method": "linear", "models": [m("s1", weight=1), m("s1x", weight=1)]}],
                       (), ["s1x", "did you mean the stage 's1'?"]),
        "typo of the only reference": ([s1, {"merge_method": "linear", "models": [m("s1x", weight=1), m(ft, weight=1)]}],
                                       (), ["s1x", "did you mean the stage 's1'?"]),
        "unknown model": ([s1, {"merge_method": "linear", "models": [m("s1", weight=1), m("/nowhere/model", weight=1)]}],
                          (), ["/nowhere/model"]),
        "cycle": ([{"name": "a", "merge_method": "linear", "models": [m("b", weight=1), m(ft, weight=1)]},
                   {"name": "b", "merge_method": "linear", "models": [m("a", weight=1), m(ft, weight=1)]},
                   {"merge_method": "linear", "models": [m("a", weight=1), m(ft, weight=1)]}],
                  (), ["'a' -> 'b' -> 'a'", "form a cycle"]),
        "self cycle": ([{"name": "a", "merge_method": "linear", "models": [m("a", weight=1), m(ft, weight=1)]},
                        {"merge_method": "linear", "models": [m("a", weight=1), m(ft, weight=1)]}],
                       (), ["'a'", "form a cycle"]),
        "revision": ([s1, {"merge_method": "linear", "models": [m("s1@main", weight=1), m(ft, weight=1)]}],
                     (), ["'s1@main'", "a stage is named by its name alone"]),
        "adapter": ([s1, {"merge_method": "linear", "models": [m("s1+lora", weight=1), m(ft, weight=1)]}],
                    (), ["'s1+lora'", "a stage is named by its name alone"]),
        "unused stage": ([s1, {"name": "side", "merge_method": "linear", "models": [m(ft, weight=1)]},
                          {"merge_method": "linear", "models": [m("s1", weight=1), m(ft, weight=1)]}],
                         (), ["does not use the stage(s) 'side'", "--keep-intermediates"]),
        "misaligned stage": ([{"name": "short", "merge_method": "passthrough", "slices": [{"sources": [{"model": ft, "layer_range": [0, 2]}]}]},
                              {"name": "bad", "merge_method": "linear", "models": [m("short", weight=1), m(ft, weight=1)]},
                              {"merge_method": "linear", "models": [m("bad", weight=1), m(ft, weight=1)]}],
                             (), ["stage 'bad': "]),
    }  # fmt: skip


ERRORS = ["close name", "typo of the only reference", "unknown model", "cycle", "self cycle",
          "revision", "adapter", "unused stage", "misaligned stage"]  # fmt: skip


@pytest.mark.parametrize("case", ERRORS)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_errors_are_one_line_exit_2_before_anything_is_written(llama_family, tmp_path, case, command):
    docs, options, says = error_cases(llama_family)[case]
    recipe = write_stages(docs, tmp_path)
    out, keep = tmp_path / "out", tmp_path / "keep"
    if command == "run":
        r = run_main("run", recipe, out, "--quiet", *options)
    else:
        r = run_main("plan", recipe, *options)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in says:
        assert part in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and not keep.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.yml"]


def test_a_name_far_from_every_stage_gets_no_stage_hint(llama_family, tmp_path):
    docs, _, _ = error_cases(llama_family)["unknown model"]
    r = run_main("plan", write_stages(docs, tmp_path))
    assert r.returncode == 2 and "did you mean the stage" not in r.stderr


# ---------------------------------------------------------------- plan


def three_stage_plan_docs(f) -> list[dict]:
    """Every input model read in full, so the bytes read once are exactly 4 models' tensors."""
    return [
        {"name": "s1", "merge_method": "slerp", "base_model": str(f["base"]), "models": [m(f["base"]), m(f["ft1"])],
         "parameters": {"t": 0.3}, "dtype": "bfloat16"},
        {"name": "s2", "merge_method": "ties", "base_model": str(f["base"]), "dtype": "bfloat16",
         "models": [m("s1", weight=0.6, density=0.5), m(f["ft2"], weight=0.4, density=0.7)]},
        {"merge_method": "linear", "dtype": "bfloat16", "models": [m("s2", weight=0.5), m(f["ft3"], weight=0.5)]},
    ]  # fmt: skip


def test_plan_lists_stages_reads_once_and_the_bytes_saved(llama_family, tmp_path):
    f = llama_family
    docs = three_stage_plan_docs(f)
    recipe = write_stages(docs, tmp_path / "fused")
    r = run_main("plan", recipe, *SMALL_FILES)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    stages = run_staged(docs, tmp_path / "staged", *SMALL_FILES)
    size = {name: sum(p.stat().st_size for p in stages[name].glob("model-*.safetensors")) for name in ("s1", "s2", FINAL)}

    assert re.search(r"^stages \(2\)", text, re.M)
    s1_line = next(line for line in text.splitlines() if line.startswith("  s1: "))
    s2_line = next(line for line in text.splitlines() if line.startswith("  s2: "))
    assert s1_line == f"  s1: slerp of {f['base']}, {f['ft1']}; 39 tensors, {human(size['s1'])} (not written)"
    assert s2_line == f"  s2: ties of {f['base']}, s1 (stage), {f['ft2']}; 39 tensors, {human(size['s2'])} (not written)"
    assert text.index("  s1: ") < text.index("  s2: ")  # in the order they are computed
    assert re.search(r"^outputs \(1\):\n  \(final\) -> OUT: linear, 39 tensors, writes " + re.escape(human(size[FINAL])), text, re.M)
    model_bytes = numel_bytes(load_state(f["base"]))  # base, ft1, ft2, ft3: the same tensors
    assert f"reads {human(4 * model_bytes)} once for all outputs; writes {human(size[FINAL])};" in text
    saved = 2 * (size["s1"] + size["s2"])  # each intermediate written, then read back
    assert f"saves {human(saved)} of I/O against writing each intermediate stage and reading it back (mergekit-multi)" in text
    assert "== (final) ==" in text

    # The JSON says the same, in bytes: the final plan holds the stages' plans.
    g = json.loads(run_main("plan", recipe, "--json", *SMALL_FILES).stdout)
    (target,) = g["targets"]
    assert g["stages"] == ["s1", "s2"] and target["role"] == "final"
    stage_files = {name: sum(fl["nbytes"] for fl in p["files"]) for name, p in all_stage_plans(target["plan"])}
    assert stage_files == {"s1": size["s1"], "s2": size["s2"]}


def all_stage_plans(plan: dict) -> list[tuple[str, dict]]:
    out = []
    for name, stage in plan["stages"].items():
        out += [*all_stage_plans(stage), (name, stage)]
    return out


def test_plan_reads_a_stages_inputs_only_where_the_final_reads_the_stage(llama_family_f32, tmp_path):
    """The final passthrough takes the TIES stage's embeddings and layers 0-2 only: the
    stages' inputs (base, ft1, ft2) are read for those tensors alone; ft3 (read by the final
    and by the TIES stage) is read in full, once."""
    f = llama_family_f32
    r = run_main("plan", write_stages(linear_ties_passthrough_f32(f), tmp_path))
    assert r.returncode == 0, r.stderr
    state = load_state(f["base"])
    used = [n for n in state if n == "model.embed_tokens.weight" or (n.startswith("model.layers.") and int(n.split(".")[2]) < 3)]
    expected = 3 * numel_bytes({n: state[n] for n in used}) + numel_bytes(state)
    assert f"reads {human(expected)} once for all outputs;" in r.stdout, r.stdout[:800]


def test_plan_with_keep_intermediates_writes_the_stages_and_saves_nothing(llama_family, tmp_path):
    """Kept stages are written either way: no bytes saved, three outputs, where each goes."""
    recipe = write_stages(three_stage_plan_docs(llama_family), tmp_path)
    r = run_main("plan", recipe, "--keep-intermediates", tmp_path / "keep")
    assert r.returncode == 0, r.stderr
    assert "saves" not in r.stdout
    assert "outputs (3):" in r.stdout
    assert f"  s1 -> {tmp_path / 'keep' / 's1'}: slerp" in r.stdout and f"  s2 -> {tmp_path / 'keep' / 's2'}: ties" in r.stdout
    assert r.stdout.count("(kept)") == 2
    assert not (tmp_path / "keep").exists()  # plan writes nothing


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("where", ["40", "index"])
def test_interrupted_fused_run_resumes_to_the_same_bytes(staged, tmp_path, monkeypatch, where):
    """A run of the three-stage chain with its intermediates kept (78 tensors written in all),
    failed after some tensors or before the first output's index, then rerun: the
    same bytes as the staged run, for the final and for every kept stage."""
    from distmerge.state import Journal

    monkeypatch.setattr(Journal, "COMMIT_SECONDS", 0.0)  # journal every tensor: the rerun keeps them
    docs, options, stages = staged("linear-ties-passthrough-f32")
    recipe = write_stages(docs, tmp_path)
    out, keep = tmp_path / "out", tmp_path / "keep"
    args = ("run", recipe, out, "--quiet", "--keep-intermediates", keep, *options)
    r = run_main(*args, env={"DISTMERGE_FAULT": f"0:{where}:raise"})
    assert r.returncode != 0 and f"injected fault at {where}" in r.stderr, r.stderr
    assert not (out / "model.safetensors.index.json").exists()
    journaled = sum(len(p.read_text().splitlines()) for p in tmp_path.glob("**/.distmerge/journal/rank-*.jsonl"))
    assert 0 < journaled <= (int(where) if where.isdigit() else 135)  # what the rerun keeps (3 outputs, 135 tensors)
    r = run_main(*args)
    assert r.returncode == 0, r.stderr
    assert_identical(out, stages[FINAL])
    for name in ("s1", "s2"):
        assert_identical(keep / name, stages[name])
    assert not list(out.glob("*.partial")) and not list(keep.glob("*/*.partial"))


def test_a_changed_stage_cannot_resume_the_output_of_another(staged, tmp_path):
    """The final's plan holds its stages' plans: a stage's recipe edited between two runs
    into the same OUT is a different recipe, refused before anything is written."""
    import copy

    docs, options, _ = staged("slerp-ties-bf16")
    out = run_fused(docs, tmp_path, *options)
    before = {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")}
    edited = copy.deepcopy(docs)
    edited[0]["parameters"]["t"] = [0.1, 0.6, 0.4]  # the stage only; the final document is unchanged
    r = run_main("run", write_stages(edited, tmp_path), out, "--quiet", *options)
    assert r.returncode == 2 and "holds a run of a different recipe or options" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")} == before


@pytest.mark.slow
def test_killed_fused_run_resumes_to_the_same_bytes(staged, tmp_path):
    """SIGKILL mid-run (a subprocess): the rerun keeps the journaled tensors and finishes
    byte-identical to the staged run."""
    docs, options, stages = staged("slerp-ties-bf16")
    recipe = write_stages(docs, tmp_path)
    out, keep = tmp_path / "out", tmp_path / "keep"
    args = ("run", recipe, out, "--quiet", "--keep-intermediates", keep, *options)
    r = run_cli(*args, env={"DISTMERGE_FAULT": "0:50:kill"})
    assert r.returncode == -9, r.stderr
    assert not (out / "model.safetensors.index.json").exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert_identical(out, stages[FINAL])
    assert_identical(keep / "s1", stages["s1"])


# ---------------------------------------------------------------- several ranks


@pytest.mark.slow
def test_fused_run_on_two_ranks_is_byte_identical_to_the_staged_run(staged, tmp_path):
    """torchrun, 2 ranks (gloo on CPU): the units of work (one tensor name across the final
    and its kept stages) split over the ranks; every output is the staged run's, byte for byte."""
    import os
    import subprocess
    import sys

    docs, options, stages = staged("linear-ties-passthrough-f32")
    recipe = write_stages(docs, tmp_path)
    out, keep = tmp_path / "out", tmp_path / "keep"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "distmerge.cli",
           "run", str(recipe), str(out), "--quiet", "--keep-intermediates", str(keep), *options]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, start_new_session=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert_identical(out, stages[FINAL])
    for name in ("s1", "s2"):
        assert_identical(keep / name, stages[name])


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("chain", ["linear-ties-passthrough-f32", "dare_ties-dare_ties-bf16", "union-tokenizer-bf16"])
def test_fused_run_on_cuda_is_byte_identical_to_the_staged_run_on_cuda(staged, chain, tmp_path):
    """On the GPU, the stages' tensors stay on the device between the stages of the
    expression; rounded there to each stage's dtype, they give the staged run's bytes."""
    docs, options, _ = staged(chain)
    stages = run_staged(docs, tmp_path / "staged", *options, "--device", "cuda")
    out = run_fused(docs, tmp_path / "fused", *options, "--device", "cuda", "--keep-intermediates", tmp_path / "keep")
    assert_identical(out, stages[FINAL])
    for name in (d["name"] for d in docs if "name" in d and d is not final_doc(docs)):
        assert_identical(tmp_path / "keep" / name, stages[name])

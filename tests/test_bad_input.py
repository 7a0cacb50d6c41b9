"""Bad input gets one line saying what is wrong and where, exit 2, and nothing left behind:
never a hang, never a traceback (issue 13, "No silent corruption"). An unexpected exception
(a bug) gets one line, exit 3, and its traceback in a log file."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest
import yaml

from distmerge.errors import MergeError
from distmerge.io.header import read_header
from distmerge.sources import load_checkpoint
from tests.helpers import REPO_ROOT, run_cli, run_main

TIMEOUT = 60
"""Seconds a CLI call may take: ~10 s on a loaded machine; a hang fails instead of blocking."""

LAUGHS = "".join(["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)])
"""A "billion laughs" block: l9 expands to 9**10 values (a few hundred bytes of YAML)."""


def linear(*models, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], **extra}


def write_recipe(tmp_path, recipe: dict | str | bytes):
    path = tmp_path / "recipe.yml"
    if isinstance(recipe, dict):
        recipe = yaml.safe_dump(recipe, sort_keys=False)
    path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    return path


def copy_model(src, tmp_path, name="bad"):
    return shutil.copytree(src, tmp_path / name)


def replace_file(path, content) -> None:
    """Put ``content`` at ``path``: bytes, a JSON value, or "FIFO" for a named pipe."""
    if os.path.lexists(path):
        os.remove(path)
    if content == "FIFO":
        os.mkfifo(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def assert_refused(tmp_path, recipe_path, *fragments, commands=("plan", "run")):
    """Each command exits 2 with one line on stderr, ``error: ...`` holding ``fragments``;
    no output directory, no crash log."""
    out = tmp_path / "out"
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    for command in commands:
        args = ("plan", recipe_path) if command == "plan" else ("run", recipe_path, out, "--quiet", "--device", "cpu")
        # plan in this process (no 2-3 s start-up; pytest-timeout bounds a hang), run as a real one
        r = run_main(*args, env={"TMPDIR": tmpdir}) if command == "plan" else run_cli(*args, timeout=TIMEOUT, env={"TMPDIR": tmpdir})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, f"{command}: exit {r.returncode}\n{r.stderr}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{command}:\n{r.stderr}"
        assert "Traceback" not in r.stderr
        for fragment in fragments:
            assert fragment in lines[0], f"{command}: {fragment!r} not in {lines[0]!r}"
        assert not out.exists(), f"{command} left {sorted(os.listdir(out))} behind"
    assert not list(tmpdir.iterdir()), "a crash log was written for a user error"
    return lines[0]


# --- 1, 2, 3: the recipe file ---


@pytest.mark.slow
def test_billion_laughs_recipe_is_refused_quickly(llama_family, tmp_path):
    text = LAUGHS + yaml.safe_dump(linear(llama_family["ft1"], llama_family["ft2"])).replace("weight: 1.0", "weight: *l9")
    line = assert_refused(tmp_path, write_recipe(tmp_path, text), "recipe.yml", "YAML aliases", "more than 100,000 values", "write the values out")
    assert "under 'l9'" in line or "under 'models'" in line


@pytest.mark.slow
@pytest.mark.parametrize("nest", [lambda n: "[" * n + "0.5" + "]" * n, lambda n: "{a: " * n + "0.5" + "}" * n], ids=["lists", "mappings"])
def test_recipe_nested_thousands_deep_is_refused(llama_family, tmp_path, nest):
    text = yaml.safe_dump(linear(llama_family["ft1"])).replace("weight: 1.0", f"weight: {nest(5000)}")
    assert_refused(tmp_path, write_recipe(tmp_path, text), "recipe.yml", "nested more than 64 levels deep (at line")


@pytest.mark.slow
@pytest.mark.parametrize(
    "encode, byte",
    [(lambda t: t.encode("utf-16"), "0xff on line 1"), (lambda t: ("name: caf\xe9\n" + t).encode("latin-1"), "0xe9 on line 1")],
    ids=["utf16", "latin1"],
)
def test_recipe_that_is_not_utf8_is_refused(llama_family, tmp_path, encode, byte):
    text = yaml.safe_dump(linear(llama_family["ft1"]))
    assert_refused(tmp_path, write_recipe(tmp_path, encode(text)), "recipe.yml: not UTF-8 text", byte, "save the recipe as UTF-8")


# --- 4, 5: config.json and the shard index ---


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, fragment",
    [
        ([1, 2, 3], "config.json: holds a JSON list, not the JSON object a model config is"),
        ('{"model_type": "caf\xe9"}'.encode("latin-1"), "config.json: not UTF-8 text (byte 0xe9"),
        ("FIFO", "config.json: it is a FIFO; distmerge reads only regular files"),
    ],
    ids=["list", "latin1", "fifo"],
)
def test_bad_config_json_is_refused_naming_it(llama_family, tmp_path, content, fragment):
    bad = copy_model(llama_family["ft1"], tmp_path)
    replace_file(bad / "config.json", content)
    assert_refused(tmp_path, write_recipe(tmp_path, linear(bad, llama_family["ft2"])), str(bad), fragment)


@pytest.mark.slow
def test_config_layer_count_that_is_not_a_number_is_refused(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path)
    config = json.loads((bad / "config.json").read_text())
    replace_file(bad / "config.json", {**config, "num_hidden_layers": "four"})
    assert_refused(
        tmp_path, write_recipe(tmp_path, linear(bad, llama_family["ft2"])),
        f"{bad}/config.json: num_hidden_layers is 'four', not a whole number; fix config.json",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"metadata": {}, "weight_map": ["model-00001-of-00002.safetensors"]}, "weight_map is a list, not an object"),
        ({"weight_map": "model-00001-of-00002.safetensors"}, "weight_map is a string, not an object"),
        ([{"weight_map": {}}], "holds a JSON list, not the JSON object a shard index is"),
        (b'{"weight_map": {"caf\xe9": "x"}}', "not UTF-8 text (byte 0xe9"),
        ("FIFO", "it is a FIFO; distmerge reads only regular files"),
    ],
    ids=["weight-map-list", "weight-map-string", "list", "latin1", "fifo"],
)
def test_bad_shard_index_is_refused_naming_it(llama_family, tmp_path, content, fragment):
    bad = copy_model(llama_family["base"], tmp_path)  # base: 2 shards + index
    replace_file(bad / "model.safetensors.index.json", content)
    assert_refused(tmp_path, write_recipe(tmp_path, linear(bad, llama_family["ft1"])), f"{bad}/model.safetensors.index.json", fragment)


# --- 6: safetensors headers ---


@pytest.mark.slow
@pytest.mark.parametrize(
    "header",
    [b"[" * 100_000 + b"]" * 100_000, b'{"w": {"dtype": "F32", "shape": ' + b"[" * 100_000 + b"]" * 100_000 + b', "data_offsets": [0, 0]}}'],
    ids=["array", "in-shape"],
)
def test_safetensors_header_nested_too_deeply_is_refused(llama_family, tmp_path, header):
    bad = copy_model(llama_family["ft1"], tmp_path)
    replace_file(bad / "model.safetensors", struct.pack("<Q", len(header)) + header)
    assert_refused(tmp_path, write_recipe(tmp_path, linear(bad, llama_family["ft2"])), f"{bad}/model.safetensors: not a safetensors file: its header JSON is nested too deeply")


@pytest.mark.slow
def test_safetensors_file_that_is_a_fifo_is_refused(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path)
    replace_file(bad / "model.safetensors", "FIFO")
    assert_refused(tmp_path, write_recipe(tmp_path, linear(bad, llama_family["ft2"])), f"{bad}/model.safetensors: cannot read: it is a FIFO")


# --- 7: chat_template: auto reads tokenizer_config.json ---


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, fragment",
    [("FIFO", "tokenizer_config.json: it is a FIFO"), (["{{ messages }}"], "tokenizer_config.json: holds a JSON list, not the JSON object")],
    ids=["fifo", "list"],
)
def test_chat_template_auto_with_bad_tokenizer_config_is_refused(llama_family, tmp_path, content, fragment):
    bad = copy_model(llama_family["ft1"], tmp_path)
    replace_file(bad / "tokenizer_config.json", content)
    recipe = write_recipe(tmp_path, linear(bad, llama_family["ft2"], chat_template="auto"))
    assert_refused(tmp_path, recipe, str(bad), fragment)


# --- the same class: other files, values and YAML that must not hang or crash ---


@pytest.mark.slow
def test_recipe_larger_than_16_mib_is_refused_before_it_is_read(tmp_path):
    """A large file given as the recipe (a checkpoint, a log) is refused, not parsed."""
    big = tmp_path / "recipe.yml"
    big.write_bytes(b"# " + b"x" * 16 * 2**20 + b"\n")
    assert_refused(tmp_path, big, f"cannot read recipe {big}: larger than 16 MiB, too large for a recipe; is this the right file?")


def test_recipe_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "recipe.yml")
    assert_refused(tmp_path, tmp_path / "recipe.yml", "cannot read recipe", "it is a FIFO", commands=("plan",))


@pytest.mark.parametrize(
    "setting, fragment",
    [
        (".nan", "parameters.weight: nan is not a finite number"),
        ("[0.5, .inf]", "parameters.weight: inf is not a finite number"),
        ("0x" + "f" * 40, "integer too large"),
        ("!!python/object/apply:os.system ['touch {pwned}']", "could not determine a constructor for the tag"),
    ],
    ids=["nan", "inf-in-gradient", "huge-int", "python-tag"],
)
def test_hostile_parameter_values_are_refused(llama_family, tmp_path, setting, fragment):
    setting = setting.format(pwned=tmp_path / "pwned")
    text = yaml.safe_dump(linear(llama_family["ft1"], llama_family["ft2"])) + f"parameters:\n  weight: {setting}\n"
    assert_refused(tmp_path, write_recipe(tmp_path, text), "recipe.yml", fragment, commands=("plan",))
    assert not (tmp_path / "pwned").exists()


def test_files_are_checked_in_process_too(llama_family, tmp_path):
    """load_checkpoint and read_header, without the CLI: each bad file is a MergeError naming it."""
    ck = load_checkpoint(str(llama_family["ft1"]))
    assert ck.num_layers == 4
    bad = copy_model(llama_family["ft1"], tmp_path)
    config = json.loads((bad / "config.json").read_text())
    for value, fragment in [(True, "num_hidden_layers is True"), (-1, "is -1"), (10**12, "says 1000000000000 layers but the checkpoint holds only")]:
        replace_file(bad / "config.json", {**config, "num_hidden_layers": value})
        with pytest.raises(MergeError, match="not a whole number|holds only") as e:
            load_checkpoint(str(bad))
        assert fragment in str(e.value) and str(bad) in str(e.value)
    replace_file(bad / "config.json", {**config, "vocab_size": "128"})
    with pytest.raises(MergeError, match="vocab_size is '128', not a whole number"):
        load_checkpoint(str(bad))
    replace_file(bad / "config.json", {**config, "num_hidden_layers": None})  # null: counted from the tensors
    assert load_checkpoint(str(bad)).num_layers is None
    dev = tmp_path / "dev.safetensors"
    dev.symlink_to("/dev/zero")
    with pytest.raises(MergeError, match="dev.safetensors: cannot read: it is not a regular file"):
        read_header(dev)


# --- 8: the backstop for bugs ---


def _crash(*args, **kwargs):
    raise RuntimeError("planner exploded\nsecond line")


def test_internal_error_is_one_line_exit_3_and_a_log_with_the_traceback(llama_family, tmp_path, monkeypatch, capsys):
    import distmerge.job
    from distmerge.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(distmerge.job, "make_graph", _crash)
    recipe = write_recipe(tmp_path, linear(llama_family["ft1"]))
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe)])
    assert e.value.code == 3
    err = capsys.readouterr().err
    logs = list(tmp_path.glob("distmerge-crash-*.log"))
    assert len(logs) == 1
    assert err == (
        "internal error: RuntimeError: planner exploded second line, please report it at "
        f"https://github.com/distmerge/distmerge/issues; the traceback is in {logs[0]}\n"
    )
    log = logs[0].read_text()
    assert "Traceback (most recent call last)" in log and "in _crash" in log and "RuntimeError: planner exploded" in log
    assert f"args: ['plan', '{recipe}']" in log


def test_interrupt_and_user_errors_keep_their_exit_codes(llama_family, tmp_path, monkeypatch, capsys):
    import distmerge.job
    from distmerge.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    recipe = write_recipe(tmp_path, linear(llama_family["ft1"]))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def user_error(*args, **kwargs):
        raise MergeError("recipe.yml: something the user can fix")

    for fake, code, message in [(interrupt, 130, "aborted"), (user_error, 2, "error: recipe.yml: something the user can fix")]:
        monkeypatch.setattr(distmerge.job, "make_graph", fake)
        with pytest.raises(SystemExit) as e:
            main(["plan", str(recipe)])
        assert e.value.code == code
        assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not list(tmp_path.glob("distmerge-crash-*.log"))


@pytest.mark.slow
def test_internal_error_in_a_real_process_exits_3(llama_family, tmp_path):
    """The same through a process of its own (a patched function, not a switch in distmerge)."""
    recipe = write_recipe(tmp_path, linear(llama_family["ft1"]))
    code = (
        "import sys, distmerge.job, distmerge.cli\n"
        "def boom(*a, **k): raise ZeroDivisionError('division by zero')\n"
        "distmerge.job.make_graph = boom\n"
        "distmerge.cli.main(sys.argv[1:])\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-c", code, "plan", str(recipe)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error: ZeroDivisionError: division by zero, please report it at "), r.stderr
    (log,) = tmp_path.glob("distmerge-crash-*.log")
    assert lines[0].endswith(f"the traceback is in {log}") and "ZeroDivisionError" in log.read_text()

"""Tokenizer inputs that would fail the merge or ``finish`` are refused by ``plan``, before the
output directory exists: exit 2, one line naming the file or recipe entry and the fix.

The models are test_tokenizer.py's ``vocab_family`` (base: 128 tokens and rows; ft1 and ft2:
130, each with two added tokens) and conftest's ``llama_family``. ``assert_refused`` runs
``plan`` and ``run`` through the CLI and checks that ``run`` left no output directory.
"""

from __future__ import annotations

import json
import os

import pytest
try:  # the test extra
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    pytest.skip("hypothesis is not installed (property-based tests); pip install -e '.[test]'", allow_module_level=True)

from distmerge import vocab
from distmerge.errors import MergeError
from tests.helpers import run_main
from tests.test_bad_input import assert_refused, copy_model, linear, replace_file, write_recipe
from tests.test_tokenizer import vocab_family  # noqa: F401 (a fixture)

PLAN = ("plan",)


def union(*models, **tokenizer) -> dict:
    """A linear merge of ``models`` (the first is the base) with a union vocabulary."""
    block = {"tokenizer": {"source": "union", **tokenizer}} if tokenizer else {"tokenizer_source": "union"}
    return {**linear(*models), "base_model": str(models[0]), **block}


def model_token(model, **which) -> dict:
    return {"source": {"kind": "model_token", "model": str(model), **which}}


def edit_json(path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def plans(tmp_path, recipe: dict) -> bool:
    return run_main("plan", write_recipe(tmp_path, recipe)).returncode == 0


# --- 1: model_token sources and ids past a model's embedding rows ---


@pytest.mark.slow
def test_token_id_past_the_models_embedding_rows_is_refused(vocab_family, tmp_path):
    fam = vocab_family
    recipe = union(fam["base"], fam["ft1"], tokens={"<new>": model_token(fam["ft1"], token_id=130)})
    assert_refused(tmp_path, write_recipe(tmp_path, recipe),
                   "tokenizer.tokens['<new>'].source: token_id 130 is past the 130 rows of", f"in model '{fam['ft1']}'", "use an id below 130")  # fmt: skip


def test_token_id_of_the_last_row_is_accepted(vocab_family, tmp_path):
    fam = vocab_family
    assert plans(tmp_path, union(fam["base"], fam["ft1"], tokens={"<new>": model_token(fam["ft1"], token_id=129)}))


@pytest.mark.slow
def test_token_named_by_text_whose_id_is_past_the_rows_is_refused(vocab_family, tmp_path):
    bad = copy_model(vocab_family["ft1"], tmp_path)  # 130 rows; "<far>" gets id 140 in its tokenizer
    edit_json(bad / "tokenizer.json", lambda t: t["added_tokens"].append({**t["added_tokens"][-1], "id": 140, "content": "<far>"}))
    recipe = union(vocab_family["base"], bad, tokens={"<new>": model_token(bad, token="<far>")})
    assert_refused(tmp_path, write_recipe(tmp_path, recipe), "token '<far>' (id 140 in its tokenizer) is past the 130 rows of", str(bad))


@pytest.mark.slow
def test_tokenizer_ids_past_the_embedding_rows_are_refused(vocab_family, tmp_path):
    bad = copy_model(vocab_family["ft1"], tmp_path)  # config says 140 tokens, the tensors have 130 rows
    edit_json(bad / "config.json", lambda c: c.update(vocab_size=140))
    edit_json(bad / "tokenizer.json", lambda t: t["added_tokens"].extend({**t["added_tokens"][-1], "id": 130 + k, "content": f"<a{k}>"} for k in range(10)))
    assert_refused(tmp_path, write_recipe(tmp_path, union(vocab_family["base"], bad)),
                   f"model '{bad}': token '<a0>' has id 130 in its tokenizer, past the 130 rows of", "set vocab_size to 130 in its config.json")  # fmt: skip


# --- 2: tokenizer.json: a regular UTF-8 file, a JSON object, the fields distmerge reads ---


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, fragment",
    [
        ([1, 2], "tokenizer.json: holds a JSON list, not the JSON object a tokenizer.json is"),
        (b'{"model": {"type": "BPE", "vocab": {"caf\xe9": 0}}}', "tokenizer.json: not UTF-8 text (byte 0xe9 at offset 40)"),
        ("FIFO", "tokenizer.json: it is a FIFO; distmerge reads only regular files"),
    ],
    ids=["list", "latin1", "fifo"],
)
def test_tokenizer_json_that_is_not_a_json_object_file_is_refused(vocab_family, tmp_path, content, fragment):
    bad = copy_model(vocab_family["ft1"], tmp_path)
    replace_file(bad / "tokenizer.json", content)
    assert_refused(tmp_path, write_recipe(tmp_path, union(vocab_family["base"], bad)), f"{bad}/{fragment}")


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda t: t.update(model=[]), "'model' is a list, not the JSON object of a tokenizer model"),
        (lambda t: t["model"].update(vocab=[["a", 0.0]]), "a 'BPE' model without a vocabulary distmerge can read (model.vocab is a list)"),
        (lambda t: t["model"]["vocab"].update({"<s>": "1"}), "model.vocab['<s>'] is '1', not a token id (a whole number >= 0)"),
        (lambda t: t["model"]["vocab"].update({"<s>": -1}), "model.vocab['<s>'] is -1, not a token id"),
        (lambda t: t.update(added_tokens={"128": "<|im_start|>"}), "'added_tokens' is an object, not a list"),
        (lambda t: t["added_tokens"].append({"id": 131}), "is {'id': 131}, not an object with a string 'content'"),
        (lambda t: t["added_tokens"][-1].update(id=True), "].id is True, not a token id"),
        (lambda t: t["added_tokens"][-1].update(content="\ud800"), "token '\\ud800' holds an unpaired surrogate"),
    ],
    ids=["model-list", "bpe-vocab-list", "id-string", "id-negative", "added-object", "added-no-content", "added-id-bool", "surrogate"],
)
def test_tokenizer_json_fields_distmerge_reads_are_checked(vocab_family, tmp_path, change, fragment):
    bad = copy_model(vocab_family["ft1"], tmp_path)
    edit_json(bad / "tokenizer.json", change)
    assert_refused(tmp_path, write_recipe(tmp_path, union(vocab_family["base"], bad)), f"{bad}/tokenizer.json: ", fragment, commands=PLAN)


# --- 3: the files finish reads and edits are checked at plan time ---


@pytest.mark.slow
@pytest.mark.parametrize("template, commands", [("chatml", ("plan", "run")), ("{{ messages }}", PLAN)], ids=["named", "literal"])
def test_chat_template_with_a_tokenizer_config_that_is_a_list_is_refused(llama_family, tmp_path, template, commands):
    bad = copy_model(llama_family["ft1"], tmp_path)  # the first model: its tokenizer files go to the output
    replace_file(bad / "tokenizer_config.json", ["{{ messages }}"])
    recipe = write_recipe(tmp_path, linear(bad, llama_family["ft2"], chat_template=template))
    assert_refused(tmp_path, recipe, f"{bad}/tokenizer_config.json: holds a JSON list, not the JSON object distmerge edits", commands=commands)


def test_chat_template_with_a_tokenizer_config_that_is_not_utf8_is_refused(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path)
    replace_file(bad / "tokenizer_config.json", '{"x": "caf\xe9"}'.encode("latin-1"))
    recipe = write_recipe(tmp_path, linear(bad, llama_family["ft2"], chat_template="chatml"))
    assert_refused(tmp_path, recipe, f"{bad}/tokenizer_config.json: not UTF-8 text (byte 0xe9 at offset 10)", commands=PLAN)


@pytest.mark.slow
@pytest.mark.parametrize(
    "file, content, fragment",
    [
        ("tokenizer_config.json", {"added_tokens_decoder": []}, "tokenizer_config.json: 'added_tokens_decoder' is a list, not the object"),
        ("tokenizer_config.json", "a string", "tokenizer_config.json: holds a JSON string, not the JSON object distmerge edits"),
    ],
    ids=["decoder-list", "config-string"],
)
def test_added_tokens_into_tokenizer_files_of_the_wrong_shape_are_refused(vocab_family, tmp_path, file, content, fragment):
    bad = copy_model(vocab_family["base"], tmp_path)  # the base: its files get the union's added tokens
    replace_file(bad / file, content)
    assert_refused(tmp_path, write_recipe(tmp_path, union(bad, vocab_family["ft1"])), f"{bad}/{fragment}")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name, commands",
    [("tokenizer.model", ("plan", "run")), ("special_tokens_map.json", PLAN), ("generation_config.json", PLAN)],
)
def test_a_fifo_among_the_files_finish_copies_is_refused(llama_family, tmp_path, name, commands):
    bad = copy_model(llama_family["ft1"], tmp_path)  # donor and tokenizer source: a FIFO here hung run
    replace_file(bad / name, "FIFO")
    assert_refused(tmp_path, write_recipe(tmp_path, linear(bad, llama_family["ft2"])), f"cannot read {bad}/{name}: it is a FIFO", commands=commands)


def test_a_directory_or_dangling_link_among_the_files_finish_copies_is_refused(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path)
    os.mkdir(bad / "merges.txt")
    recipe = write_recipe(tmp_path, linear(bad, llama_family["ft2"]))
    assert_refused(tmp_path, recipe, f"cannot read {bad}/merges.txt: it is a directory", commands=PLAN)
    os.rmdir(bad / "merges.txt")
    os.symlink(tmp_path / "gone.json", bad / "vocab.json")
    assert_refused(tmp_path, recipe, f"cannot read {bad}/vocab.json: it is a link to {tmp_path / 'gone.json'}, which is missing", commands=PLAN)


# --- 4: pad_to_multiple_of ---


@pytest.mark.slow
def test_huge_pad_to_multiple_of_is_refused(vocab_family, tmp_path):
    recipe = union(vocab_family["base"], vocab_family["ft1"], pad_to_multiple_of=10**12)
    assert_refused(tmp_path, write_recipe(tmp_path, recipe),
                   "tokenizer.pad_to_multiple_of 1000000000000 would pad the 130-token vocabulary to 1000000000000 rows",
                   "at most 16x the vocabulary and 2^24 rows (here 2080)", "use a multiple such as 8, 64 or 128")  # fmt: skip


def test_padding_up_to_16_times_the_vocabulary_is_accepted(vocab_family, tmp_path):
    fam = vocab_family  # union of base and ft1: 130 tokens
    assert plans(tmp_path, union(fam["base"], fam["ft1"], pad_to_multiple_of=2080))
    assert not plans(tmp_path, union(fam["base"], fam["ft1"], pad_to_multiple_of=2081))


# --- 5: text UTF-8 cannot write (unpaired surrogate escapes, valid in JSON and YAML) ---


@pytest.mark.slow
def test_recipe_chat_template_with_an_unpaired_surrogate_is_refused(llama_family, tmp_path):
    text = json.dumps(linear(llama_family["ft1"], llama_family["ft2"], chat_template="{{ messages }}\ud800"))  # JSON is YAML
    assert_refused(tmp_path, write_recipe(tmp_path, text), "the recipe's chat_template holds an unpaired surrogate ('\\ud800' at character 14)")


def test_auto_template_with_an_unpaired_surrogate_is_refused(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path)
    edit_json(bad / "tokenizer_config.json", lambda c: c.update(chat_template="{{ messages }}\ud800"))
    recipe = write_recipe(tmp_path, linear(bad, llama_family["ft2"], chat_template="auto"))
    assert_refused(tmp_path, recipe, f"chat_template auto: {bad}/tokenizer_config.json: its chat_template holds an unpaired surrogate", commands=PLAN)


def test_recipe_token_with_an_unpaired_surrogate_is_refused(vocab_family, tmp_path):
    text = json.dumps(union(vocab_family["base"], vocab_family["ft1"], tokens={"\ud800": {"source": {"kind": "zero"}}}))
    assert_refused(tmp_path, write_recipe(tmp_path, text), "tokenizer.tokens: token '\\ud800' holds an unpaired surrogate", "fix the recipe", commands=PLAN)


def test_tokenizer_source_file_that_utf8_cannot_write_back_is_refused(vocab_family, tmp_path):
    bad = copy_model(vocab_family["base"], tmp_path)  # union: tokens are added to its tokenizer.json
    edit_json(bad / "tokenizer.json", lambda t: t.update(note="\ud800"))
    assert_refused(tmp_path, write_recipe(tmp_path, union(bad, vocab_family["ft1"])),
                   f"{bad}/tokenizer.json: the output's tokenizer.json would hold an unpaired surrogate", commands=PLAN)  # fmt: skip


# --- the class: any JSON in the tokenizer files ends in a result or one clear MergeError ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False) | st.sampled_from(["a", "<s>", "\ud800", "Unigram", "BPE"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["model", "type", "vocab", "added_tokens", "content", "id", "special", "added_tokens_decoder", "a"]), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(tok=st.dictionaries(st.sampled_from(["model", "added_tokens", "x"]), json_values, max_size=3), config=json_values)
def test_any_tokenizer_json_gives_a_vocabulary_or_one_clear_error(tok, config):
    """vocabulary() and the finish edits, on JSON of any shape: a result or a MergeError naming the file."""
    try:
        vocab.vocabulary(tok, "m/tokenizer.json")
    except MergeError as e:
        assert str(e).startswith("m/tokenizer.json: ") and "\n" not in str(e)
    files = {"tokenizer.json": json.dumps(tok).encode(), "tokenizer_config.json": json.dumps(config).encode()}
    added = [{"id": 7, "content": "<x>", "special": True}]
    try:
        vocab.add_tokens(files, added, "m")
        vocab.set_chat_template(files, "{{ messages }}", "m")
    except MergeError as e:
        assert str(e).startswith(("m/tokenizer.json: ", "m/tokenizer_config.json: ")) and "\n" not in str(e)
    else:
        assert all(isinstance(json.loads(files[n]), dict) for n in ("tokenizer.json", "tokenizer_config.json"))

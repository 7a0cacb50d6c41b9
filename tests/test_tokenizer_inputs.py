"""Tokenizer inputs that would fail the merge or ``finish`` are refused by ``plan``, before the
output directory exists: exit 2, one line naming the file or recipe entry and the fix.

The models are test_tokenizer.py's ``vocab_family`` (base: 128 tokens and rows; ft1 and ft2:
130, each with two added tokens) and conftest's ``llama_family``. ``assert_refused`` runs
``plan`` and ``run`` through the CLI and checks that ``run`` left no output directory.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli
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
    return run_cli("plan", write_recipe(tmp_path, recipe), timeout=60).returncode == 0


# --- 1: model_token sources and ids past a model's embedding rows ---


def test_token_id_past_the_models_embedding_rows_is_refused(vocab_family, tmp_path):
    fam = vocab_family
    recipe = union(fam["base"], fam["ft1"], tokens={"<new>": model_token(fam["ft1"], token_id=130)})
    assert_refused(tmp_path, write_recipe(tmp_path, recipe),
                   "tokenizer.tokens['<new>'].source: token_id 130 is past the 130 rows of", f"in model '{fam['ft1']}'", "use an id below 130")  # fmt: skip


def test_token_id_of_the_last_row_is_accepted(vocab_family, tmp_path):
    fam = vocab_family
    assert plans(tmp_path, union(fam["base"], fam["ft1"], tokens={"<new>": model_token(fam["ft1"], token_id=129)}))


def test_token_named_by_text_whose_id_is_past_the_rows_is_refused(vocab_family, tmp_path):
    bad = copy_model(vocab_family["ft1"], tmp_path)  # 130 rows; "<far>" gets id 140 in its tokenizer
    edit_json(bad / "tokenizer.json", lambda t: t["added_tokens"].append({**t["added_tokens"][-1], "id": 140, "content": "<far>"}))
    recipe = union(vocab_family["base"], bad, tokens={"<new>": model_token(bad, token="<far>")})
    assert_refused(tmp_path, write_recipe(tmp_path, recipe), "token '<far>' (id 140 in its tokenizer) is past the 130 rows of", str(bad))


def test_tokenizer_ids_past_the_embedding_rows_are_refused(vocab_family, tmp_path):
    bad = copy_model(vocab_family["ft1"], tmp_path)  # config says 140 tokens, the tensors have 130 rows
    edit_json(bad / "config.json", lambda c: c.update(vocab_size=140))
    edit_json(bad / "tokenizer.json", lambda t: t["added_tokens"].extend({**t["added_tokens"][-1], "id": 130 + k, "content": f"<a{k}>"} for k in range(10)))
    assert_refused(tmp_path, write_recipe(tmp_path, union(vocab_family["base"], bad)),
                   f"model '{bad}': token '<a0>' has id 130 in its tokenizer, past the 130 rows of", "set vocab_size to 130 in its config.json")  # fmt: skip


# --- 2: tokenizer.json: a regular UTF-8 file, a JSON object, the fields distmerge reads ---


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


# --- 4: pad_to_multiple_of ---


def test_huge_pad_to_multiple_of_is_refused(vocab_family, tmp_path):
    recipe = union(vocab_family["base"], vocab_family["ft1"], pad_to_multiple_of=10**12)
    assert_refused(tmp_path, write_recipe(tmp_path, recipe),
                   "tokenizer.pad_to_multiple_of 1000000000000 would pad the 130-token vocabulary to 1000000000000 rows",
                   "at most 16x the vocabulary and 2^24 rows (here 2080)", "use a multiple such as 8, 64 or 128")  # fmt: skip


def test_padding_up_to_16_times_the_vocabulary_is_accepted(vocab_family, tmp_path):
    fam = vocab_family  # union of base and ft1: 130 tokens
    assert plans(tmp_path, union(fam["base"], fam["ft1"], pad_to_multiple_of=2080))
    assert not plans(tmp_path, union(fam["base"], fam["ft1"], pad_to_multiple_of=2081))

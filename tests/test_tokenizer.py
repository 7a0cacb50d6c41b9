"""Different vocabularies: tokenizer_source (base, a model, union) and tokenizer: blocks.

The family: a base with 128 tokens; ft1 adds the specials <|im_start|> (128) and <|im_end|>
(129); ft2 adds <tool> (128) and <|im_end|> (129 there too, but after <tool>, so the two
fine-tunes disagree on which id is which token only through the output vocabulary). Each
added token gets its own random embedding and lm_head row. So, in a union:
<|im_start|> is only in ft1 (its row is copied to the others), <|im_end|> is in ft1 and
ft2 but not the base (the others get the mean of their rows), <tool> only in ft2.

mergekit 0.1.5 is the reference. Its ids for the union's new tokens follow set and hash-map
iteration order, so rows are compared token by token through each output's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.cli import main
from distmerge.demo import make_family
from tests.helpers import load_state, recipe_text, run_mergekit

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
ADDED = {"ft1": ["<|im_start|>", "<|im_end|>"], "ft2": ["<tool>", "<|im_end|>"]}


def _add_tokens(model: Path, tokens: list[str], seed: int) -> None:
    """Append special tokens to a model's tokenizer, rows to its embeddings, and grow vocab_size."""
    tok = json.loads((model / "tokenizer.json").read_text())
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    config = json.loads((model / "config.json").read_text())
    first = config["vocab_size"]
    for k, content in enumerate(tokens):
        entry = {"id": first + k, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}  # fmt: skip
        tok["added_tokens"].append(entry)
        cfg["added_tokens_decoder"][str(first + k)] = {k2: v for k2, v in entry.items() if k2 != "id"}
    config["vocab_size"] = first + len(tokens)
    (model / "tokenizer.json").write_text(json.dumps(tok))
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "config.json").write_text(json.dumps(config))
    (file,) = model.glob("*.safetensors")
    state = load_file(file)
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB:
        w = state[name]
        state[name] = torch.cat([w, torch.randn(len(tokens), w.shape[1], generator=g).to(w.dtype)])
    save_file(state, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory) -> dict[str, Path]:
    fam = make_family(tmp_path_factory.mktemp("vocab"), n_finetunes=2, seed=3, dtype=torch.bfloat16, num_layers=2)
    for i, (name, tokens) in enumerate(ADDED.items()):
        _add_tokens(fam[name], tokens, seed=10 + i)
    return fam


def vocab_of(model: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).get_vocab()


def merge_both(recipe: dict, tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "recipe.yml"
    path.write_text(recipe_text(recipe))
    main(["run", str(path), str(tmp_path / "distmerge"), "--quiet"])
    return tmp_path / "distmerge", run_mergekit(recipe, tmp_path / "mergekit")


def assert_same_by_token(ours: Path, theirs: Path) -> dict[str, int]:
    """Same vocabulary (as sets of tokens), same rows for every token, same other tensors,
    same vocab_size. Returns our vocabulary."""
    a, b = load_state(ours), load_state(theirs)
    va, vb = vocab_of(ours), vocab_of(theirs)
    assert set(va) == set(vb)
    assert set(a) == set(b)
    for name in b:
        if name in VOCAB:
            assert a[name].shape == b[name].shape, name
            for token, i in vb.items():
                assert torch.equal(a[name][va[token]], b[name][i]), (name, token)
            extra = range(len(vb), b[name].shape[0])  # padding rows
            assert torch.equal(a[name][len(va) :], b[name][extra.start :]), name
        else:
            assert torch.equal(a[name], b[name]), name
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert cfg_a["vocab_size"] == cfg_b["vocab_size"] == a["model.embed_tokens.weight"].shape[0]
    return va


def models(fam, weights) -> list[dict]:
    return [{"model": str(fam[n]), "parameters": {"weight": w}} for n, w in weights.items()]


@pytest.mark.needs("transformers")
@pytest.mark.slow
def test_union_has_every_models_tokens_and_equals_mergekit_token_by_token(vocab_family, tmp_path):
    recipe = {"merge_method": "linear", "base_model": str(vocab_family["base"]),
              "models": models(vocab_family, {"base": 0.2, "ft1": 0.5, "ft2": 0.3}),
              "tokenizer_source": "union"}  # fmt: skip
    ours, theirs = merge_both(recipe, tmp_path)
    vocab = assert_same_by_token(ours, theirs)
    # New tokens get ids after the base's, in recipe order, the same on every run.
    assert [vocab[t] for t in ("<|im_start|>", "<|im_end|>", "<tool>")] == [128, 129, 130]
    emb = load_state(ours)["model.embed_tokens.weight"].float()
    fts = {n: load_state(vocab_family[n])["model.embed_tokens.weight"].float() for n in ("ft1", "ft2")}
    # <|im_end|> is missing from the base only: the base's stand-in row is the mean of ft1's and ft2's.
    mean = ((fts["ft1"][129].bfloat16() + fts["ft2"][129].bfloat16()) / 2).float()
    torch.testing.assert_close(emb[129], (0.2 * mean + 0.5 * fts["ft1"][129] + 0.3 * fts["ft2"][129]).bfloat16().float(), atol=0, rtol=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ours)
    assert tok("<tool><|im_start|>hi").input_ids[1:3] == [130, 128]


@pytest.mark.needs("transformers")
@pytest.mark.slow
def test_tokenizer_source_base_drops_added_tokens_like_mergekit(vocab_family, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(vocab_family["base"]),
              "models": models(vocab_family, {"ft1": 0.6, "ft2": 0.4}),
              "dtype": "float32", "out_dtype": "bfloat16", "tokenizer_source": "base"}  # fmt: skip
    ours, theirs = merge_both(recipe, tmp_path)
    vocab = assert_same_by_token(ours, theirs)
    assert len(vocab) == 128 and "<tool>" not in vocab


@pytest.mark.needs("transformers")
@pytest.mark.slow
def test_tokenizer_source_model_takes_that_models_vocabulary(vocab_family, tmp_path):
    recipe = {"merge_method": "slerp", "base_model": str(vocab_family["base"]),
              "models": [{"model": str(vocab_family["base"])}, {"model": str(vocab_family["ft2"])}],
              "parameters": {"t": 0.4}, "tokenizer_source": str(vocab_family["ft2"])}  # fmt: skip
    ours, theirs = merge_both(recipe, tmp_path)
    vocab = assert_same_by_token(ours, theirs)
    assert vocab == vocab_of(vocab_family["ft2"])


@pytest.mark.needs("transformers")
@pytest.mark.slow
def test_tokenizer_block_token_sources_force_and_padding_equal_mergekit(vocab_family, tmp_path):
    recipe = {
        "merge_method": "linear", "base_model": str(vocab_family["base"]),
        "models": models(vocab_family, {"base": 0.2, "ft1": 0.5, "ft2": 0.3}),
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 8,
            "tokens": {
                "<|im_start|>": {"source": {"kind": "model_token", "model": str(vocab_family["base"]), "token": "<s>"}},
                "<tool>": {"source": {"kind": "zero"}},
                "<s>": {"source": str(vocab_family["ft2"]), "force": True},
                "<new>": {"source": {"kind": "model_token", "model": str(vocab_family["ft1"]), "token_id": 5}},
            },
        },
    }  # fmt: skip
    ours, theirs = merge_both(recipe, tmp_path)
    vocab = assert_same_by_token(ours, theirs)
    emb = load_state(ours)["model.embed_tokens.weight"]
    assert len(vocab) == 132 and emb.shape[0] == 136  # <new> added; 132 padded to 136
    ft2 = load_state(vocab_family["ft2"])["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[vocab["<s>"]], ft2[vocab_of(vocab_family["ft2"])["<s>"]], atol=0, rtol=0)  # forced for all
    # padding rows are the mean of the vocabulary's rows
    assert torch.equal(emb[132], emb[135])


@pytest.mark.needs("transformers")
def test_merged_vocabulary_loads_in_transformers(vocab_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text({"merge_method": "linear", "models": models(vocab_family, {"ft1": 1, "ft2": 1}),
                                   "tokenizer": {"pad_to_multiple_of": 64}}))  # fmt: skip
    main(["run", str(recipe), str(tmp_path / "out"), "--quiet"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == 192 and len(tok) == 131
    ids = tok("<|im_start|>hello<|im_end|><tool>", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 192)
    main(["verify", str(tmp_path / "out")])


def test_different_vocabularies_without_a_tokenizer_setting_name_the_remedy(vocab_family, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text({"merge_method": "linear", "models": models(vocab_family, {"base": 1, "ft1": 1})}))
    with pytest.raises(SystemExit):
        main(["plan", str(recipe)])
    err = capsys.readouterr().err
    assert "model.embed_tokens.weight" in err and "[128, 64]" in err and "[130, 64]" in err and "tokenizer_source" in err


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ({"source": "union", "colour": 1}, "tokenizer: unknown key 'colour'"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive integer"),
        ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}, "exactly one of token_id or token"),
        ({"tokens": {"<x>": {"source": {"kind": "random"}}}}, "must be a model, {kind: zero} or"),
        ({"tokens": {"<x>": {"force": "maybe"}}}, "force must be true or false"),  # "yes" is true, as in mergekit
    ],
)
def test_bad_tokenizer_blocks_are_clear_errors(vocab_family, tmp_path, capsys, tokenizer, message):
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text({"merge_method": "linear", "models": models(vocab_family, {"ft1": 1, "ft2": 1}), "tokenizer": tokenizer}))
    with pytest.raises(SystemExit):
        main(["plan", str(recipe)])
    assert message in capsys.readouterr().err


def test_token_source_must_be_a_model_of_the_merge(vocab_family, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text({"merge_method": "linear", "models": models(vocab_family, {"ft1": 1, "ft2": 1}),
                                   "tokenizer": {"tokens": {"<|im_start|>": {"source": str(vocab_family["base"]), "force": True}}}}))  # fmt: skip
    with pytest.raises(SystemExit):
        main(["plan", str(recipe)])
    assert "takes its row from" in capsys.readouterr().err

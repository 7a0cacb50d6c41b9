"""chat_template in recipes: a Jinja template, a named one, or auto."""

import json
import os
import re

import pytest
import yaml

from distmerge.cli import main
from distmerge.errors import MergeError
from distmerge.templates import CHAT_TEMPLATES, resolve


def merged_tokenizer(fam, tmp_path, chat_template, name="out"):
    import transformers

    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "chat_template": chat_template,
                                      "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 1}}, {"model": str(fam["ft2"]), "parameters": {"weight": 1}}]}))  # fmt: skip
    main(["run", str(recipe), str(tmp_path / name), "--quiet"])
    return transformers.AutoTokenizer.from_pretrained(tmp_path / name)


@pytest.mark.needs("transformers")
def test_named_chatml_template_is_applied(llama_family, tmp_path):
    tok = merged_tokenizer(llama_family, tmp_path, "chatml")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.needs("transformers")
def test_literal_template_and_auto(llama_family, tmp_path):
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok = merged_tokenizer(llama_family, tmp_path, literal, "literal")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    # auto: the template the inputs carry (here: the merged output above, used as an input)
    import shutil

    fam = {"ft1": tmp_path / "literal", "ft2": shutil.copytree(llama_family["ft2"], tmp_path / "ft2")}
    tok = merged_tokenizer(fam, tmp_path, "auto", "auto")
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}], tokenize=False) == "[user] yo\n"


def test_unknown_template_name_is_refused_up_front(llama_family, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "chat_template": "chatmll", "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1}}]}))
    with pytest.raises(SystemExit):
        main(["plan", str(recipe)])
    err = capsys.readouterr().err
    assert "chatmll" in err and "chatml" in err and "llama3" in err


def test_templates_are_valid_jinja():
    import jinja2

    for name, text in CHAT_TEMPLATES.items():
        out = jinja2.Environment().from_string(text).render(messages=[{"role": "user", "content": "x"}], add_generation_prompt=True, bos_token="<s>")
        assert "x" in out and "assistant" in out, name
    assert json.dumps(CHAT_TEMPLATES)


# --- auto reads the models' files: only regular files, and only JSON objects ---


def _model_dir(tmp_path, tokenizer_config=None, jinja=None):
    d = tmp_path / "model"
    d.mkdir()
    for name, content in (("tokenizer_config.json", tokenizer_config), ("chat_template.jinja", jinja)):
        if content == "FIFO":
            os.mkfifo(d / name)
        elif content is not None:
            (d / name).write_bytes(content)
    return d


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["tokenizer_config", "jinja"])
def test_auto_never_opens_a_fifo(tmp_path, name):
    d = _model_dir(tmp_path, **{name: "FIFO"})
    with pytest.raises(MergeError, match="it is a FIFO; distmerge reads only regular files") as e:
        resolve("auto", [str(d)])
    assert str(d) in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'["{{ messages }}"]', "tokenizer_config.json: holds a JSON list, not the JSON object a tokenizer config is"),
        (b'"{{ messages }}"', "holds a JSON string"),
        (b'{"chat_template": "caf\xe9"}', "tokenizer_config.json: not UTF-8 text (byte 0xe9"),
        (b"[" * 50_000 + b"]" * 50_000, "tokenizer_config.json: its JSON is nested too deeply"),
        (b'{"chat_template": ', "tokenizer_config.json: invalid JSON"),
    ],
    ids=["list", "string", "latin1", "deep", "truncated"],
)
def test_auto_refuses_a_tokenizer_config_that_is_not_a_json_object(tmp_path, content, message):
    d = _model_dir(tmp_path, tokenizer_config=content)
    with pytest.raises(MergeError, match=re.escape(message)):
        resolve("auto", [str(d)])


def test_auto_refuses_a_template_file_that_is_not_utf8(tmp_path):
    d = _model_dir(tmp_path, jinja="{{ 'caf\xe9' }}".encode("latin-1"))
    with pytest.raises(MergeError, match=r"chat_template.jinja: not UTF-8 text \(byte 0xe9 at offset 7\); re-save it as UTF-8"):
        resolve("auto", [str(d)])


def test_auto_takes_string_templates_and_ignores_other_values(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    d = _model_dir(tmp_path, tokenizer_config=json.dumps({"chat_template": f"  {template}\n"}).encode())
    assert resolve("auto", [str(d)]) == template
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": template}]}))
    assert resolve("auto", [str(d)]) is None  # a list of named templates: not chosen (mergekit fails on it)
    (d / "tokenizer_config.json").unlink()
    assert resolve("auto", [str(d)]) is None

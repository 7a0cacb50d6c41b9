"""chat_template in recipes: a Jinja template, a named one, or auto."""

import json

import pytest
import yaml

from distmerge.cli import main
from distmerge.templates import CHAT_TEMPLATES


def merged_tokenizer(fam, tmp_path, chat_template, name="out"):
    import transformers

    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "chat_template": chat_template,
                                      "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 1}}, {"model": str(fam["ft2"]), "parameters": {"weight": 1}}]}))  # fmt: skip
    main(["run", str(recipe), str(tmp_path / name), "--quiet"])
    return transformers.AutoTokenizer.from_pretrained(tmp_path / name)


def test_named_chatml_template_is_applied(llama_family, tmp_path):
    tok = merged_tokenizer(llama_family, tmp_path, "chatml")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


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

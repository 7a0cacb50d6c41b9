"""Chat templates a recipe can name (``chat_template: chatml``), and ``auto``.

Written here from the published formats (ChatML; Llama 3's header/eot tokens).
"""

from __future__ import annotations

import os
from collections import Counter

from distmerge.errors import MergeError
from distmerge.io.header import open_regular
from distmerge.sources import read_json

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def check_setting(value: str) -> str | None:
    """A message if ``value`` is neither ``auto``, a known name, nor a Jinja template."""
    if value == "auto" or value in CHAT_TEMPLATES or "{" in value:
        return None
    return f"chat_template {value!r} is not auto, a Jinja template, or one of: {', '.join(CHAT_TEMPLATES)}"


def resolve(setting: str | None, model_dirs: list[str]) -> str | None:
    """The template text a setting means. ``auto``: the template most of the input models
    carry (the first model's among equals), or None if none has one."""
    if not setting:
        return None
    if setting in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[setting]
    if setting != "auto":
        if problem := check_setting(setting):
            raise MergeError(problem)
        _check_utf8(setting, "the recipe's chat_template", "fix the recipe")
        return setting
    found = [t for t in (_template_of(d) for d in model_dirs) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def _template_of(model_dir: str) -> str | None:
    """A model's chat template: chat_template.jinja, else tokenizer_config.json's
    ``chat_template`` when it is a string.

    Only regular files are read (a FIFO there would block forever). A file that is there
    but unreadable, not UTF-8 or not a JSON object is an error naming it, not "no template".
    """
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        try:
            with open_regular(jinja) as f:
                raw = f.read()
        except OSError as e:
            raise MergeError(f"chat_template auto: cannot read {jinja}: {e.strerror or e}") from None
        try:
            return raw.decode("utf-8-sig").strip() or None
        except UnicodeDecodeError as e:
            raise MergeError(f"chat_template auto: {jinja}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save it as UTF-8") from None
    config = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.exists(config):
        return None
    template = read_json(config, "tokenizer config").get("chat_template")
    if isinstance(template, str):
        _check_utf8(template, f"chat_template auto: {config}: its chat_template", "fix the file or set chat_template in the recipe")
    return (template.strip() or None) if isinstance(template, str) else None


def _check_utf8(template: str, what: str, fix: str) -> None:
    """Refuse a template UTF-8 cannot write (an unpaired ``\\ud800``-``\\udfff`` escape in JSON
    or YAML) now, not when the output's chat_template.jinja is written."""
    try:
        template.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MergeError(f"{what} holds an unpaired surrogate ({template[e.start]!r} at character {e.start}), which UTF-8 cannot write; {fix}") from None

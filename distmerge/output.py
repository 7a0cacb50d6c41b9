"""The output directory: prepare it (fresh, resumed or refused), and finish it on rank 0.

Finishing writes what turns a set of shards into a Hugging Face checkpoint: the shard
index, config.json, generation config, tokenizer files, and a model card. Each is
written atomically, after every rank's files are done.
"""

from __future__ import annotations

import json
import os
import shutil

import yaml

from distmerge.errors import MergeError
from distmerge.io.writer import write_atomic
from distmerge.plan import Plan
from distmerge.run import forget_lost_files, publish_files, state_dir

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
RECIPE_FILE = "distmerge_config.yml"


def prepare(out_dir: str, plan: Plan, overwrite: bool = False) -> bool:
    """Make ``out_dir`` ready for ``plan``. Returns True when an earlier run is being resumed.

    An existing directory is reused only if it holds a distmerge run of the same plan
    (same fingerprint); anything else is refused unless ``overwrite``.
    """
    plan_path = os.path.join(state_dir(out_dir), "plan.json")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        previous = _fingerprint(plan_path)
        if overwrite:
            _clear(out_dir)
        elif previous is None:
            raise MergeError(
                f"output directory {out_dir} is not empty and is not a distmerge output; "
                "choose an empty or new directory, or pass --overwrite"
            )
        elif previous != plan.fingerprint:
            raise MergeError(
                f"output directory {out_dir} holds a run of a different recipe or options "
                f"(plan {previous[:12]}, now {plan.fingerprint[:12]}); pass --overwrite to replace it"
            )
        else:
            forget_lost_files(out_dir, plan)
            return True
    os.makedirs(state_dir(out_dir), exist_ok=True)
    write_atomic(plan_path, plan.to_json())
    return False


def _fingerprint(plan_path: str) -> str | None:
    try:
        with open(plan_path) as f:
            return json.load(f)["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _clear(out_dir: str) -> None:
    """Remove what distmerge writes; leave anything else alone."""
    shutil.rmtree(state_dir(out_dir), ignore_errors=True)
    for name in os.listdir(out_dir):
        if (name.startswith("model-") and ".safetensors" in name) or name == INDEX_FILE:
            os.remove(os.path.join(out_dir, name))


def finish(plan: Plan, out_dir: str) -> None:
    """Rank 0, once every rank has written its tensors: publish the files, then write the
    index, config, tokenizer and card."""
    publish_files(plan, out_dir)
    weight_map = {name: f.name for f in plan.files for name in f.tensors}
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan.tensors)}, "weight_map": weight_map}
    write_atomic(os.path.join(out_dir, INDEX_FILE), json.dumps(index, indent=2))
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(plan.config, indent=2) + "\n")
    donor = plan.models[plan.donor].path
    _copy(donor, out_dir, ["generation_config.json"])
    if plan.tokenizer_source is not None:
        _copy(plan.models[plan.tokenizer_source].path, out_dir, TOKENIZER_FILES)
    _set_chat_template(plan, out_dir)
    write_atomic(os.path.join(out_dir, RECIPE_FILE), plan.recipe_text)
    write_atomic(os.path.join(out_dir, "README.md"), model_card(plan))


def _copy(src_dir: str, out_dir: str, names) -> None:
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            with open(src, "rb") as f:
                write_atomic(os.path.join(out_dir, name), f.read())


def _set_chat_template(plan: Plan, out_dir: str) -> None:
    template = yaml.safe_load(plan.recipe_text or "{}").get("chat_template") if plan.recipe_text else None
    if not template:
        return
    if "{" not in template:
        raise MergeError(f"chat_template {template!r}: give the Jinja template itself; named templates are not supported yet")
    path = os.path.join(out_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    config["chat_template"] = template
    write_atomic(path, json.dumps(config, indent=2))


def model_card(plan: Plan) -> str:
    """A README.md the hub renders: front matter with base models and tags, then the recipe."""
    refs = [m.ref for m in plan.models]
    front = {"base_model": refs, "library_name": "transformers", "tags": ["merge", "distmerge", "mergekit"]}
    models = "\n".join(f"- {r}" for r in refs)
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
        f"# {os.path.basename(os.path.normpath(plan.models[plan.donor].ref))} merge\n\n"
        f"This model was merged with [distmerge](https://github.com/distmerge/distmerge) {plan.distmerge_version} "
        f"using the `{plan.method}` method.\n\n## Models\n\n{models}\n\n"
        f"## Recipe\n\n```yaml\n{plan.recipe_text.rstrip()}\n```\n\n"
        f"Random seed: {plan.seed}. Plan fingerprint: `{plan.fingerprint}`.\n"
    )

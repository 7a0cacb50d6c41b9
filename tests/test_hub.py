"""Pushing to the hub: what is uploaded, and that unverified outputs never are."""

import shutil
from pathlib import Path

import pytest
import yaml

from distmerge.cli import main
from distmerge.errors import MergeError
from distmerge.hub import push


class HubStandIn:
    """In-process stand-in for huggingface_hub.HfApi: records calls, 'uploads' by copying."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, *, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns, commit_message):
        self.calls.append(("upload_folder", repo_id, tuple(ignore_patterns)))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*[p.rstrip("/*") for p in ignore_patterns]))
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


@pytest.fixture
def merged(llama_family, tmp_path) -> Path:
    f = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(f["base"]), "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1, "density": 0.5}}]}))
    main(["run", str(recipe), str(tmp_path / "out"), "--quiet"])
    return tmp_path / "out"


def test_push_uploads_a_plain_checkpoint_with_a_hub_card(merged, tmp_path):
    hub = HubStandIn(tmp_path / "hub")
    url = push(str(merged), "me/merged", private=True, api=hub)
    assert url.endswith("/commit/1")
    assert hub.calls[0] == ("create_repo", "me/merged", True, True)
    uploaded = {p.name for p in (tmp_path / "hub" / "me/merged").iterdir()}
    assert {"model.safetensors.index.json", "config.json", "README.md", "tokenizer.json"} <= uploaded
    assert not any(n.startswith(".distmerge") for n in uploaded)
    card = (tmp_path / "hub" / "me/merged" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"][:2] == ["merge", "distmerge"] and len(front["base_model"]) == 2
    assert "merge_method: ties" in card


def test_an_output_that_fails_verification_is_not_pushed(merged, tmp_path):
    shard = next(merged.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-5])
    hub = HubStandIn(tmp_path / "hub")
    with pytest.raises(MergeError, match="failed verification"):
        push(str(merged), "me/merged", api=hub)
    assert hub.calls == []

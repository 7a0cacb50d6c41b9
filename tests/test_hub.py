"""Pushing to the hub, through the real huggingface_hub client over HTTP to a local stand-in
of the hub's API (tests/hub_server.py): what is uploaded, and that unverified outputs never are."""

from pathlib import Path

import pytest
import yaml

from distmerge.cli import main
from tests.helpers import run_cli
from tests.hub_server import HubStandIn

TOKEN = "hf_standin"


@pytest.fixture
def merged(llama_family, tmp_path) -> Path:
    f = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(f["base"]), "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1, "density": 0.5}}]}))
    main(["run", str(recipe), str(tmp_path / "out"), "--quiet"])
    return tmp_path / "out"


@pytest.fixture
def hub(tmp_path):
    with HubStandIn(tmp_path / "hub") as h:
        yield h


def hub_env(hub: HubStandIn, token: str = TOKEN) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_push_uploads_the_checkpoint_byte_for_byte_without_bookkeeping(merged, hub):
    r = run_cli("push", merged, "me/merged", "--private", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert f"pushed to me/merged: {hub.endpoint}/me/merged/commit/" in r.stdout
    assert hub.repos["me/merged"]["visibility"] == "private"
    (commit,) = hub.commits
    local = sorted(str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file() and ".distmerge" not in p.parts)
    assert sorted(commit["files"]) == local and "README.md" in local and "tokenizer.json" in local
    for name in local:
        assert (hub.root / "me/merged" / name).read_bytes() == (merged / name).read_bytes(), name
    card = (hub.root / "me/merged" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"][:2] == ["merge", "distmerge"] and len(front["base_model"]) == 2
    assert "merge_method: ties" in card


def test_run_with_push_to_hub_uploads_once_the_merge_is_verified(llama_family, tmp_path, hub):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(llama_family["ft1"]), str(llama_family["ft2"])], "parameters": {"weight": 1}}))
    r = run_cli("run", recipe, tmp_path / "out", "--quiet", "--push-to-hub", "me/linear", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    (commit,) = hub.commits
    assert commit["repo"] == "me/linear" and "model.safetensors.index.json" in commit["files"]
    assert hub.repos["me/linear"]["visibility"] == "public"


def test_an_output_that_fails_verification_is_not_pushed(merged, hub):
    shard = next(merged.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-5])
    r = run_cli("push", merged, "me/merged", env=hub_env(hub))
    assert r.returncode != 0 and "failed verification" in r.stderr and "Traceback" not in r.stderr
    assert hub.requests == []


def test_a_refused_upload_is_one_clear_error(merged, hub):
    r = run_cli("push", merged, "me/merged", env=hub_env(hub, token="hf_wrong"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "uploading" in r.stderr and "me/merged failed" in r.stderr and "401" in r.stderr
    assert hub.commits == []

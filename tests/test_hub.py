"""Pushing to the hub, through the real huggingface_hub client over HTTP to a local stand-in
of the hub's API (tests/hub_server.py): what is uploaded, and that unverified outputs never are."""

from pathlib import Path

import pytest
import yaml

from distmerge.cli import main
from distmerge.hub import unreachable
from distmerge.verify import verify
from tests.helpers import free_port, run_cli
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


@pytest.mark.slow
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
    assert "\n# base + ft1 (ties merge)\n" in card  # named for its models, not "# base merge"


@pytest.mark.slow
def test_run_with_push_to_hub_uploads_once_the_merge_is_verified(llama_family, tmp_path, hub):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(llama_family["ft1"]), str(llama_family["ft2"])], "parameters": {"weight": 1}}))
    r = run_cli("run", recipe, tmp_path / "out", "--quiet", "--push-to-hub", "me/linear", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    (commit,) = hub.commits
    assert commit["repo"] == "me/linear" and "model.safetensors.index.json" in commit["files"]
    assert hub.repos["me/linear"]["visibility"] == "public"


@pytest.mark.slow
def test_an_output_that_fails_verification_is_not_pushed(merged, hub):
    shard = next(merged.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-5])
    r = run_cli("push", merged, "me/merged", env=hub_env(hub))
    assert r.returncode != 0 and "failed verification" in r.stderr and "Traceback" not in r.stderr
    assert hub.requests == []


@pytest.mark.slow
def test_a_refused_upload_is_one_clear_error(merged, hub):
    r = run_cli("push", merged, "me/merged", env=hub_env(hub, token="hf_wrong"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "uploading" in r.stderr and "me/merged failed" in r.stderr and "401" in r.stderr
    assert hub.commits == []


# --------------------------------------------------------------------------- no network (issue 14)


def no_hub(kind: str) -> dict[str, str]:
    """An environment where the hub cannot be reached: a closed port on this machine, or offline mode."""
    if kind == "closed port":
        return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}
    return {"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["closed port", "offline mode"])
def test_push_without_network_is_one_clear_line(merged, kind):
    env = no_hub(kind)
    r = run_cli("push", merged, "me/merged", env=env)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    endpoint = env.get("HF_ENDPOINT", "https://huggingface.co")
    assert line.startswith(f"error: cannot reach the Hugging Face hub ({endpoint}) to push {merged} to me/merged: ")
    assert ("HF_HUB_OFFLINE is set" if kind == "offline mode" else "ConnectError") in line
    assert line.endswith("the merge itself is complete and verified")


@pytest.mark.slow
def test_run_with_push_to_hub_without_network_keeps_the_verified_merge(llama_family, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(llama_family["ft1"]), str(llama_family["ft2"])], "parameters": {"weight": 1}}))
    r = run_cli("run", recipe, tmp_path / "out", "--quiet", "--push-to-hub", "me/linear", env=no_hub("closed port"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: cannot reach the Hugging Face hub (") and f"then run `distmerge push {tmp_path / 'out'} me/linear`" in line
    assert verify(tmp_path / "out", full=True) == []


def _error(module: str, name: str, *bases: type) -> BaseException:
    """An instance of a stand-in for another library's exception class (not installed here)."""
    return type(name, bases or (Exception,), {"__module__": module})("boom")


HTTPX2_TRANSPORT = type("TransportError", (Exception,), {"__module__": "httpx2"})
HTTPX_TRANSPORT = type("TransportError", (Exception,), {"__module__": "httpx._exceptions"})


@pytest.mark.parametrize(
    "error, expected",
    [
        (_error("httpx2", "ConnectError", HTTPX2_TRANSPORT), True),  # huggingface_hub 2.x
        (_error("httpx._exceptions", "ReadTimeout", HTTPX_TRANSPORT), True),  # huggingface_hub 1.x
        (_error("requests.exceptions", "ConnectionError", OSError), True),  # huggingface_hub 0.x
        (_error("requests.exceptions", "Timeout", OSError), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (_error("huggingface_hub.errors", "HfHubHTTPError", OSError), False),  # the hub answered: 401, 404, 500...
        (ValueError("not a network error"), False),
    ],
)
def test_which_errors_mean_the_hub_was_not_reached(error, expected):
    assert unreachable(error) is expected
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = error
    assert unreachable(wrapped) is expected

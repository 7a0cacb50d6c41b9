"""Upload a finished, verified merge to the Hugging Face hub."""

from __future__ import annotations

from distmerge.errors import MergeError
from distmerge.state import BOOKKEEPING
from distmerge.verify import verify


def push(out_dir: str, repo_id: str, *, private: bool = False, token: str | None = None, api=None) -> str:
    """Verify ``out_dir`` (sizes, headers, index, config), then create ``repo_id`` if needed
    and upload the folder in one commit. Returns the commit URL. ``api`` defaults to
    ``huggingface_hub.HfApi()`` (tests pass a stand-in)."""
    problems = verify(out_dir)
    if problems:
        raise MergeError(f"not pushing {out_dir}: it failed verification: " + "; ".join(problems[:5]))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=out_dir, ignore_patterns=BOOKKEEPING, commit_message="Upload merge made with distmerge"
        )
    except Exception as e:
        if unreachable(e):
            where = getattr(api, "endpoint", None) or "the Hugging Face hub"
            raise MergeError(
                f"cannot reach the Hugging Face hub ({where}) to push {out_dir} to {repo_id}: {_reason(e)}; check the "
                f"network, HF_ENDPOINT and your token (and that HF_HUB_OFFLINE is unset), then run `distmerge push "
                f"{out_dir} {repo_id}`; the merge itself is complete and verified"
            ) from None
        if isinstance(e, OSError):  # the hub answered with an error: huggingface_hub's HTTP errors are OSErrors
            raise MergeError(f"uploading {out_dir} to {repo_id} failed: {e}") from None
        raise
    return getattr(info, "commit_url", str(info))


# The errors of the HTTP libraries huggingface_hub has used for "no answer came back" (no
# network, connection refused, DNS, timeouts), by (top-level module, class name), so that none
# of them has to be importable: httpx2 (huggingface_hub 2.x) and httpx (1.x) raise
# TransportError's subclasses; requests (0.x) raises ConnectionError and Timeout.
_TRANSPORT_ERRORS = {("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")}


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) means the hub could not be reached at all,
    rather than that it answered with an error: the HTTP library's transport errors, OS-level
    connection errors and timeouts, and huggingface_hub's OfflineModeIsEnabled (a ConnectionError)."""
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or any(
            (c.__module__.partition(".")[0], c.__name__) in _TRANSPORT_ERRORS for c in type(e).__mro__
        ):
            return True
        e = e.__cause__
    return False


def _reason(e: BaseException) -> str:
    if type(e).__name__ == "OfflineModeIsEnabled":
        return "HF_HUB_OFFLINE is set"
    text = " ".join(str(e).split()) or "no details"
    return f"{type(e).__name__}: {text[:300]}"

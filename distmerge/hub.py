"""Upload a finished, verified merge to the Hugging Face hub."""

from __future__ import annotations

from distmerge.errors import MergeError
from distmerge.verify import verify

NOT_UPLOADED = [".distmerge/*", ".distmerge.lock", "*.partial"]
"""distmerge's bookkeeping stays local: the hub gets a plain Hugging Face checkpoint."""


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
            repo_id=repo_id, folder_path=out_dir, ignore_patterns=NOT_UPLOADED, commit_message="Upload merge made with distmerge"
        )
    except OSError as e:  # huggingface_hub's HTTP errors are OSErrors
        raise MergeError(f"uploading {out_dir} to {repo_id} failed: {e}") from None
    return getattr(info, "commit_url", str(info))

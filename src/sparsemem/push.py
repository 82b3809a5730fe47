"""`push`: upload an exported checkpoint folder to the Hugging Face Hub (create the repo, upload the folder).

Fails before any upload when the Hub cannot be used: offline mode, no token, or no connection.
"""

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


class PushError(RuntimeError):
    pass


def push(folder, repo_id: str, private: bool = False, token: str | None = None, revision: str | None = None,
         commit_message: str = "Upload sparsemem checkpoint") -> str:
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported checkpoint folder (no config.json)")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ValueError(f"--repo-id must look like 'owner/name', got {repo_id!r}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise PushError("cannot push: the Hub is in offline mode (HF_HUB_OFFLINE is set)")
    token = token or get_token()
    if not token:
        raise PushError("cannot push: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except Exception as error:  # network errors come from several libraries (httpx, requests, OSError)
        raise PushError(f"cannot push to {repo_id!r}: {type(error).__name__}: {error}") from error
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    logger.info("pushed %s to %s", folder, url)
    return url

"""Push an exported model directory to the Hugging Face Hub (`huggingface_hub.create_repo` +
`upload_folder`; the token comes from HF_TOKEN or `huggingface-cli login`, as usual)."""

from __future__ import annotations

import logging
import os

from model.errors import ModelError

log = logging.getLogger("pkm.model.hf")

REQUIRED_FILES = ("config.json", "README.md", "configuration_pkm.py", "modeling_pkm.py")


def check_export_dir(folder: str) -> None:
    """An exported model directory: config, code, card and weights (single file or sharded index)."""
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: not a directory")
    names = set(os.listdir(folder))
    missing = [f for f in REQUIRED_FILES if f not in names]
    if not ({"model.safetensors", "model.safetensors.index.json"} & names):
        missing.append("model.safetensors")
    if missing:
        raise ModelError(f"{folder}: not an exported model (missing {', '.join(missing)})")


def push_to_hub(
    folder: str,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload PKM model exported by pkm-pretrain",
    endpoint: str | None = None,
) -> str:
    """Create (or reuse) the model repository `repo_id` and upload `folder`. Returns the repo URL.
    `endpoint`: the Hub's URL (default: HF_ENDPOINT or https://huggingface.co)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    check_export_dir(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelError(f"--push-to-hub {repo_id!r}: not a valid repository id ({e})") from None
    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
    except Exception as e:  # httpx / requests / hub errors: one clear line for the CLI
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _is_network_error(e):
            raise ModelError(
                f"cannot push to the Hub: {endpoint} is unreachable (no network?): {type(e).__name__}: {reason}"
            ) from None
        raise ModelError(f"cannot push {folder} to {repo_id}: {type(e).__name__}: {reason}") from None
    log.info("pushed %s to %s", folder, url)
    return str(url)


def _is_network_error(e: BaseException) -> bool:
    names = {
        "ConnectError",
        "ConnectionError",
        "ConnectTimeout",
        "NewConnectionError",
        "OfflineModeIsEnabled",
        "NameResolutionError",
        "gaierror",
        "ConnectionRefusedError",
        "TimeoutException",
        "ReadTimeout",
    }
    seen = 0
    while e is not None and seen < 10:
        if type(e).__name__ in names or any(n in type(e).__name__ for n in ("Connect", "Timeout")):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False

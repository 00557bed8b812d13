"""Fetching a checkpoint from the Hugging Face hub: config.json first, then only what its family
needs (one weight format, tokenizer and processor files), with huggingface_hub's progress bars."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MM1Error
from .families import check_supported, hub_patterns


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in
                ("", "0", "false", "False"))


def fetch(repo: str) -> Path:
    """The local snapshot of hub repository ``repo`` (its directory name is the revision)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        cfg = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
        check_supported(cfg, repo)  # an unsupported family downloads nothing more
        files = [] if offline() else HfApi().list_repo_files(repo)
        return Path(snapshot_download(repo, allow_patterns=hub_patterns(files)))
    except MM1Error:
        raise
    except Exception as e:
        why = " (offline: HF_HUB_OFFLINE is set)" if offline() else ""
        raise MM1Error(f"model {repo} is not a local directory and could not be fetched from the "
                       f"Hugging Face hub{why}: {type(e).__name__}") from None

"""Hugging Face Hub model ids wherever a model directory is accepted: `org/name` or `org/name@revision`.

Resolved with `huggingface_hub.snapshot_download`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), offline
mode (`HF_HUB_OFFLINE=1`) and revisions (branch, tag or commit) behave as in transformers. A path
that exists locally always wins over a hub id of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelError

# org/name[@revision]; hub names allow letters, digits, '-', '_' and '.', at most 96 characters each.
HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,128}))?$"
)
# What vitshrink reads from a model repo: configs, safetensors weights, ONNX files (never pickles).
ALLOW = ["*.json", "*.safetensors", "*.onnx", "*.txt", "*.md"]


def is_hub_id(spec: str | os.PathLike) -> bool:
    """True when `spec` does not exist locally and reads as `org/name[@rev]`."""
    text = os.fspath(spec)
    return not Path(text).exists() and HUB_ID.match(text) is not None and ".." not in text


def resolve_model(spec: str | os.PathLike) -> Path:
    """A local path for `spec`: itself when it exists or is not a hub id, else the downloaded snapshot.

    Raises a one-line ModelError when the hub id cannot be resolved (offline and not cached, unknown
    repository or revision, network down).
    """
    if not is_hub_id(spec):
        return Path(spec)
    m = HUB_ID.match(os.fspath(spec))
    assert m is not None
    repo, rev = m.group("repo"), m.group("rev")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - installed with transformers
        raise ModelError(f"model not found: {spec} (and huggingface_hub is not installed)") from None
    try:
        path = snapshot_download(repo, revision=rev, allow_patterns=ALLOW)
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "offline (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise ModelError(
            f"model not found: {spec} is neither a local path nor in the Hugging Face cache, and {why}"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"model not found: {repo} has no revision '{rev}'") from None
    except GatedRepoError:
        raise ModelError(
            f"model {repo} is gated: accept its terms on the Hub and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"model not found: no local path '{spec}' and no Hub repository '{repo}'") from None
    except (OSError, ValueError) as e:  # network errors, bad cache entries
        raise ModelError(
            f"cannot fetch {spec} from the Hugging Face Hub: {str(e).splitlines()[0][:200]}"
        ) from None
    return Path(path)

"""Tokenizers named by Hugging Face hub id: `data.tokenizer.path: EleutherAI/gpt-neox-20b` (or
`meta-llama/Llama-2-7b-hf`, `--tokenizer` of `preprocess`) resolves to the snapshot folder of that
repository in the local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub`), which `load_tokenizer` then reads like any tokenizer folder.

A local path always wins: a spec is a hub id only when no such file or folder exists and it looks like
one (`name` or `owner/name`). The cache is looked at first, so a cached tokenizer is used without any
network access; only when it is missing, and `HF_HUB_OFFLINE` is not set, are the tokenizer files (not
the weights) downloaded. Gated repositories (Llama 2) need the user's token (`HF_TOKEN` or `hf auth login`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

from polycom_lm.errors import DataError, first_line

logger = logging.getLogger(__name__)

# The files a tokenizer folder may consist of; `load_tokenizer` needs the first or the second.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(spec: str) -> bool:
    """Whether `spec` names a hub repository rather than a local path (see the module docstring)."""
    return bool(_HUB_ID.fullmatch(spec)) and not Path(spec).expanduser().exists()


def hub_cache_dir() -> Path:
    """The hub cache folder, read from the environment now (huggingface_hub reads it once, at import)."""
    environ = os.environ
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(variable):
            return Path(environ[variable]).expanduser()
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _cached_folder(repo_id: str, cache_dir: Path) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    for name in TOKENIZER_FILES[:2]:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir))
        if isinstance(found, str):
            return Path(found).parent
    return None


def resolve_tokenizer_path(spec: str) -> Path:
    """The local folder of tokenizer `spec`: the path itself, or a hub id's cached (or downloaded) snapshot."""
    if not is_hub_id(spec):
        return Path(spec).expanduser()
    cache_dir = hub_cache_dir()
    folder = _cached_folder(spec, cache_dir)
    if folder is not None:
        logger.info("tokenizer %s: %s (Hugging Face cache)", spec, folder)
        return folder
    fetch = f"`hf download {spec} {' '.join(TOKENIZER_FILES[:3])}`"
    if hub_offline():
        raise DataError(f"tokenizer {spec!r} is not a local folder and not in the Hugging Face cache {cache_dir} "
                        f"(HF_HUB_OFFLINE is set); fetch it once with {fetch}, or give a tokenizer folder")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, cache_dir=str(cache_dir), allow_patterns=list(TOKENIZER_FILES)))
    except Exception as error:  # not found, gated, network: huggingface_hub raises many types
        message = first_line(error)
        raise DataError(f"tokenizer {spec!r} is not a local folder and not in the Hugging Face cache {cache_dir}, "
                        f"and downloading it failed ({type(error).__name__}: {message}); for a gated repository "
                        f"set HF_TOKEN, or give a tokenizer folder") from None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
        raise DataError(f"Hugging Face repository {spec!r} has no {' or '.join(TOKENIZER_FILES[:2])}")
    logger.info("tokenizer %s: downloaded into %s", spec, folder)
    return folder

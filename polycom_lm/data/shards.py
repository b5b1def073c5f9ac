"""The on-disk token shard format: one folder per shard.

    <shard>/tokens.bin            every document's token ids, EOS-terminated, concatenated; little-endian
                                  uint16 when the vocabulary fits in 16 bits, else uint32
    <shard>/document_offsets.bin  int64 [num_documents + 1]: document d is tokens[offsets[d]:offsets[d+1]]
    <shard>/tokenizer/            a copy of the tokenizer that produced the ids (shards are self-contained)
    <shard>/manifest.json         format, dtype, counts, vocab size, tokenizer identity, source description

A folder is a shard exactly when it holds `manifest.json` with `"format": "polycom_lm.shard"`. The
manifest holds no timestamps, so the same inputs give byte-identical folders.

Writers build the folder under a temporary sibling name and rename it when complete, so an interrupted run
never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from polycom_lm.errors import DataError

FORMAT = "polycom_lm.shard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
OFFSETS = "document_offsets.bin"
TOKENIZER_SUBDIR = "tokenizer"
PARTIAL_SUFFIX = ".partial"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_shard(path: Path) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, OSError):
        return True  # it claims to be a shard; `read_shard` reports what is wrong with it


@dataclass(frozen=True)
class Shard:
    """A validated shard folder, memory-mapped. `tokens` is [num_tokens], `offsets` [num_documents + 1]."""

    path: Path
    manifest: dict[str, Any]
    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer_identity(self) -> str:
        return str(self.manifest["tokenizer"]["identity"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_SUBDIR


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check `<path>/manifest.json`; DataError naming the folder when missing or malformed."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"shard folder {path} does not exist")
    if not manifest_path.is_file():
        raise DataError(f"{path} is not a token shard: {MANIFEST} is missing (make one with `polycom-lm preprocess`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{manifest_path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: not a polycom_lm shard manifest (expected \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    required = {"dtype": str, "num_tokens": int, "num_documents": int, "vocab_size": int, "eos_id": int,
                "max_token_id": int, "tokenizer": dict, "source": str}
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise DataError(f"{manifest_path}: field {key!r} is missing or not a {kind.__name__}")
    if "identity" not in manifest["tokenizer"]:
        raise DataError(f"{manifest_path}: field 'tokenizer' lacks 'identity'")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{manifest_path}: dtype {manifest['dtype']!r} is not uint16 or uint32")
    return manifest


def read_shard(path: Path) -> Shard:
    """Open a shard folder read-only (memory-mapped) after checking the manifest against the files."""
    path = Path(path)
    manifest = read_manifest(path)
    where = path / MANIFEST
    dtype = np.dtype("<u2") if manifest["dtype"] == "uint16" else np.dtype("<u4")
    num_tokens, num_documents = manifest["num_tokens"], manifest["num_documents"]
    for name, expected in ((TOKENS, num_tokens * dtype.itemsize), (OFFSETS, (num_documents + 1) * 8)):
        file = path / name
        if not file.is_file():
            raise DataError(f"{path}: {name} is missing (the manifest promises {expected} bytes)")
        actual = file.stat().st_size
        if actual != expected:
            raise DataError(f"{path}: {name} has {actual} bytes but {where} implies {expected}")
    if manifest["max_token_id"] >= manifest["vocab_size"]:
        raise DataError(
            f"{path}: token id {manifest['max_token_id']} is outside the vocabulary of size {manifest['vocab_size']}"
        )
    if num_tokens == 0:
        raise DataError(f"{path}: shard holds no tokens")
    tokens = np.memmap(path / TOKENS, dtype=dtype, mode="r", shape=(num_tokens,))
    offsets = np.memmap(path / OFFSETS, dtype="<i8", mode="r", shape=(num_documents + 1,))
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        raise DataError(f"{path}: {OFFSETS} does not span the {num_tokens} tokens of {TOKENS}")
    return Shard(path=path, manifest=manifest, tokens=tokens, offsets=offsets)


def document_ids(shard: Shard, start: int, length: int) -> np.ndarray:
    """Per-token document number of tokens [start, start + length) of `shard`, starting at 0: [length] int64."""
    positions = np.arange(start, start + length, dtype=np.int64)
    documents = np.searchsorted(shard.offsets, positions, side="right") - 1
    return documents - documents[0]


class ShardWriter:
    """Streams documents into a shard folder under construction (`<final>.partial` inside a temporary
    parent), so memory stays flat. `finish()` writes the manifest; the caller renames the parent."""

    def __init__(self, path: Path, vocab_size: int, eos_id: int, tokenizer: dict[str, Any], source: str,
                 extra: Optional[dict[str, Any]] = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=False)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokenizer = tokenizer
        self.source = source
        self.extra = extra or {}
        self._tokens = open(self.path / TOKENS, "wb")
        self._offsets = open(self.path / OFFSETS, "wb")
        self._offsets.write(np.zeros(1, dtype="<i8").tobytes())
        self._digest = hashlib.sha256()
        self.num_tokens = 0
        self.num_documents = 0
        self.max_token_id = -1

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` [sum(lengths)] ids (EOS included), `lengths` [documents] int64."""
        if lengths.size == 0:
            return
        if tokens.size:
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._tokens.write(data)
        self._digest.update(data)
        ends = self.num_tokens + np.cumsum(lengths, dtype=np.int64)
        self._offsets.write(ends.astype("<i8").tobytes())
        self.num_tokens = int(ends[-1])
        self.num_documents += int(lengths.size)

    def finish(self) -> dict[str, Any]:
        self._tokens.close()
        self._offsets.close()
        if self.max_token_id >= self.vocab_size:
            raise DataError(
                f"{self.source}: tokenizer produced id {self.max_token_id}, outside its vocabulary of "
                f"{self.vocab_size} (is the tokenizer folder consistent?)"
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": "uint16" if self.dtype.itemsize == 2 else "uint32",
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "max_token_id": self.max_token_id,
            "tokens_sha256": self._digest.hexdigest(),
            "tokenizer": self.tokenizer,
            "source": self.source,
            **self.extra,
        }
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return manifest

    def abort(self) -> None:
        for handle in (self._tokens, self._offsets):
            if not handle.closed:
                handle.close()


def partial_dir(final: Path) -> Path:
    """A unique temporary sibling of `final` (same filesystem, so the final rename is atomic)."""
    final = Path(final)
    return final.with_name(f"{final.name}{PARTIAL_SUFFIX}-{os.getpid()}-{os.urandom(4).hex()}")


def commit_dir(partial: Path, final: Path) -> None:
    """Rename a finished temporary folder to its final name; refuse to replace anything that exists."""
    for root, _, files in os.walk(partial):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    if Path(final).exists():
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{final} appeared while it was being written; left it as it is")
    os.rename(partial, final)


def remove_partial(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Delete `*.partial-PID-*` folders in `parent` left by writers that were killed (their PID is not a
    live process on this machine); a live writer's folder is left alone. Returns what was removed."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    pattern = re.compile(re.escape(PARTIAL_SUFFIX) + r"-(\d+)-[0-9a-f]+$")
    for child in Path(parent).iterdir():
        match = pattern.search(child.name)
        if match and child.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


# ------------------------------------------------------------------------------------------ integrity

VERIFIED_DIR = "verified"
_HASH_BLOCK = 8 << 20


def _file_identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "device": stat.st_dev}


def verify_shard(path: Path, cache_dir: Path, model_vocab_size: Optional[int] = None) -> bool:
    """Check a shard before training reads it: its manifest's `max_token_id` fits `model_vocab_size`, and
    `tokens.bin` hashes to the manifest's `tokens_sha256` (a zeroed or bit-flipped file of the right size
    would otherwise train silently on garbage).

    Hashing reads the whole file once (about 1-2 GB/s), so the result is cached in `cache_dir/verified/`
    per file identity (size, modification time, inode, device): a shard is hashed again only when its
    file changed. Returns True when it was hashed now, False when the cache vouched for it. DataError on
    any mismatch."""
    shard = read_shard(path)
    manifest = shard.manifest
    if model_vocab_size is not None and manifest["max_token_id"] >= model_vocab_size:
        raise DataError(
            f"{shard.path}: token ids go up to {manifest['max_token_id']} but model.vocab_size is "
            f"{model_vocab_size}; set model.vocab_size > {manifest['max_token_id']} or use a matching tokenizer"
        )
    expected = manifest.get("tokens_sha256")
    if not isinstance(expected, str):
        return False  # shards written before digests were recorded
    tokens_file = shard.path / TOKENS
    identity = _file_identity(tokens_file)
    record_path = Path(cache_dir) / VERIFIED_DIR / (
        hashlib.sha256(str(tokens_file.resolve()).encode("utf-8")).hexdigest()[:32] + ".json"
    )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("identity") == identity and record.get("tokens_sha256") == expected:
            return False
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with open(tokens_file, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise DataError(
            f"{tokens_file} does not match its manifest (sha256 {digest.hexdigest()[:16]}... instead of "
            f"{expected[:16]}...): the file is corrupt or was changed; re-create the shard with `polycom-lm preprocess`"
        )
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = record_path.with_name(f".{record_path.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps({"path": str(tokens_file), "identity": identity, "tokens_sha256": expected}),
                             encoding="utf-8")
        os.replace(temporary, record_path)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return True

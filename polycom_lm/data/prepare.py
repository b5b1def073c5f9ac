"""Turn a run's `data` config into shard folders, building and caching whatever is missing.

Each entry of `data.train` / `data.validation` is either a prepared shard folder (it holds a shard
manifest), a folder made by `polycom-lm preprocess` (holding `train/` and maybe `validation/`), or a raw
source. Raw sources are tokenised into `data.cache_dir`, under a key hashed from (source description,
tokenizer identity, reading settings), so later runs reuse them; the source description includes file
sizes and modification times, so edited files are re-tokenised. `data.tokenizer.path` is a tokenizer
folder or a Hugging Face hub id (`hub.py`); without it a SentencePiece model is trained on the first raw
training source and cached the same way.

A streamed training source (`data.train[].streaming`, default `data.streaming`) is not tokenised here: it
becomes a `StreamedSource` that the training dataset reads on the fly (`stream.py`); only its held-out
part, if it has a fixed one (`builtin:pydoc`), is cached for validation. `max_tokens` budgets are part of
the cache keys.

Only the main process builds; the others wait at `barrier()` and then find everything in the cache
(`cache_dir` must therefore be visible to every process that calls this). A lock file per cache entry
keeps two runs on one machine from building the same entry at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from polycom_lm.config import DataConfig
from polycom_lm.data import shards
from polycom_lm.data.hub import resolve_tokenizer_path
from polycom_lm.data.preprocess import preprocess
from polycom_lm.data.sources import SourceOptions, open_source
from polycom_lm.data.stream_worker import StreamedSource
from polycom_lm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from polycom_lm.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer_dir: Path
    vocab_size: int
    eos_id: int
    # (shard folder, or a source to stream while training, with its mixture weight)
    train: list[tuple[Union[Path, StreamedSource], float]] = field(default_factory=list)
    validation: dict[str, Path] = field(default_factory=dict)  # name -> shard folder


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:20]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepared_folder(spec: str) -> Optional[Path]:
    """The folder when `spec` names a prepared shard or a `preprocess` output folder, else None."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    if shards.is_shard(path) or shards.is_shard(path / "train"):
        return path
    if (path / shards.MANIFEST).exists():
        return path  # a broken manifest: `read_shard` says what is wrong
    return None


def _train_shard(folder: Path) -> Path:
    return folder / "train" if not shards.is_shard(folder) and shards.is_shard(folder / "train") else folder


class _LoggedProgress:
    """Tokenising progress as a log line every `interval_s` (the library logs; the CLI draws bars)."""

    def __init__(self, what: str, total_bytes: Optional[int], interval_s: float = 30.0):
        self.what, self.total_bytes, self.interval_s = what, total_bytes, interval_s
        self.start = self.last = time.monotonic()
        self.tokens = self.bytes = 0

    def __call__(self, tokens: int, documents: int, text_bytes: int) -> None:
        self.tokens += tokens
        self.bytes += text_bytes
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        self.last = now
        rate = self.tokens / max(now - self.start, 1e-9)
        eta = ""
        if self.total_bytes and self.bytes:
            remaining_s = (now - self.start) * max(self.total_bytes - self.bytes, 0) / self.bytes
            eta = f", about {remaining_s / 60:.0f} min left"
        logger.info("tokenising %s: %.1fM tokens, %.0fk tokens/s%s", self.what, self.tokens / 1e6, rate / 1e3, eta)


class _Preparer:
    def __init__(self, config: DataConfig, build: bool):
        self.config = config
        self.build = build
        self.cache = Path(config.cache_dir).expanduser()
        self.options = SourceOptions(config.text_field, config.document_delimiter, config.decode_errors,
                                     config.newlines)

    def _missing(self, what: str, path: Path) -> DataError:
        return DataError(f"{what} is not in the cache at {path}; the main process should have prepared it "
                         f"(did it fail, or is data.cache_dir not shared between processes?)")

    def tokenizer(self) -> Tokenizer:
        settings = self.config.tokenizer
        if settings.path:
            try:
                return load_tokenizer(resolve_tokenizer_path(settings.path))
            except DataError as error:
                raise DataError(f"data.tokenizer.path: {error}") from None
        raw = [entry.source for entry in self.config.train if _prepared_folder(entry.source) is None]
        if not raw:
            if not self.config.train:
                raise DataError("data.train is empty; give at least one source or shard folder")
            first = shards.read_shard(_train_shard(_prepared_folder(self.config.train[0].source)))
            return load_tokenizer(first.tokenizer_dir)
        source = open_source(raw[0], self.options)
        key = _key("tokenizer", source.describe(), settings.model_type, str(settings.vocab_size),
                   str(settings.byte_fallback), repr(settings.special_tokens), str(settings.train_max_chars))
        directory = self.cache / "tokenizers" / key
        if (directory / "tokenizer.model").is_file():
            return load_tokenizer(directory)
        if not self.build:
            raise self._missing(f"the tokenizer for {raw[0]!r}", directory)
        with _locked(self.cache / "locks" / f"tokenizer-{key}.lock"):
            if not (directory / "tokenizer.model").is_file():
                logger.info("training a %d-token %s tokenizer on %s", settings.vocab_size, settings.model_type, raw[0])
                train_sentencepiece(source.documents(), directory, settings.vocab_size, settings.model_type,
                                    settings.byte_fallback, settings.special_tokens, settings.train_max_chars)
        return load_tokenizer(directory)

    def tokenise(self, spec: str, tokenizer: Tokenizer, val_fraction: float = 0.0,
                 val_sources: tuple[str, ...] = (), max_tokens: Optional[int] = None) -> Path:
        """The cached `preprocess` output folder for raw source `spec`, built when missing."""
        source = open_source(spec, self.options)
        held_out = " + ".join(open_source(v, self.options).describe() for v in val_sources)
        key = _key("shards", source.describe(), tokenizer.identity, self.options.describe(),
                   f"val_fraction={val_fraction}", f"val_sources={held_out}", f"max_tokens={max_tokens}")
        folder = self.cache / "shards" / key
        if shards.is_shard(folder / "train"):
            logger.info("reusing cached shards %s for %s", folder, spec)
            return folder
        if not self.build:
            raise self._missing(f"the shards of {spec!r}", folder)
        with _locked(self.cache / "locks" / f"shards-{key}.lock"):
            if not shards.is_shard(folder / "train"):
                logger.info("tokenising %s into %s", spec, folder)
                preprocess([spec], tokenizer.directory, folder, workers=self.config.preprocess_workers,
                           val_fraction=val_fraction, val_sources=val_sources, options=self.options,
                           max_tokens=max_tokens, progress=_LoggedProgress(spec, source.size_bytes()))
        return folder

    def _streamed(self, index: int, spec: str, tokenizer: Tokenizer, explicit_validation: bool) -> Optional[Path]:
        """Check a streamed source's spec; returns its cached held-out part, if it has a fixed one."""
        source = open_source(spec, self.options)  # a missing path or bad spec fails here, before training
        if explicit_validation:
            return None
        if hasattr(source, "held_out"):
            return self.tokenise(source.held_out().spec, tokenizer) / "train"
        if self.config.val_fraction > 0.0:
            raise DataError(f"data.val_fraction holds out documents while tokenising into the cache, but "
                            f"data.train[{index}] ({spec}) is streamed; name held-out sets in data.validation")
        return None

    def run(self) -> PreparedData:
        for index, entry in enumerate(self.config.train):
            if entry.max_tokens is not None and entry.max_tokens < 1:
                raise DataError(f"data.train[{index}].max_tokens={entry.max_tokens} must be positive (or null: all)")
        tokenizer = self.tokenizer()
        prepared = PreparedData(tokenizer.directory, tokenizer.vocab_size, tokenizer.eos_id)
        explicit_validation = bool(self.config.validation)
        for index, entry in enumerate(self.config.train):
            folder = _prepared_folder(entry.source)
            streaming = self.config.streaming if entry.streaming is None else entry.streaming
            held_out: Optional[Path] = None
            if folder is None and streaming:
                held_out = self._streamed(index, entry.source, tokenizer, explicit_validation)
                prepared.train.append((StreamedSource(entry.source, self.options, entry.max_tokens), float(entry.weight)))
            else:
                if folder is not None:  # already tokenised: read from disk, streaming or not
                    train = _train_shard(folder)
                    if train != folder and shards.is_shard(folder / "validation"):
                        held_out = folder / "validation"
                else:
                    source = open_source(entry.source, self.options)
                    val_sources: tuple[str, ...] = ()
                    val_fraction = 0.0
                    if not explicit_validation:
                        if hasattr(source, "held_out"):
                            val_sources = (source.held_out().spec,)
                        else:
                            val_fraction = self.config.val_fraction
                    output = self.tokenise(entry.source, tokenizer, val_fraction, val_sources, entry.max_tokens)
                    train = output / "train"
                    if shards.is_shard(output / "validation"):
                        held_out = output / "validation"
                shard = shards.read_shard(train)
                self._check_tokenizer(shard, tokenizer)
                prepared.train.append((train, float(entry.weight)))
            if held_out is not None and not explicit_validation:
                prepared.validation["validation" if index == 0 else f"validation_{index}"] = held_out
        for entry in self.config.validation:
            if not entry.name:
                raise DataError(f"validation set {entry.source!r} needs a name (data.validation[].name)")
            if entry.name in prepared.validation:
                raise DataError(f"validation set name {entry.name!r} is used twice")
            if entry.max_tokens is not None and entry.max_tokens < 1:
                raise DataError(f"validation set {entry.name!r}: max_tokens={entry.max_tokens} must be positive")
            folder = _prepared_folder(entry.source)
            path = (_train_shard(folder) if folder is not None
                    else self.tokenise(entry.source, tokenizer, max_tokens=entry.max_tokens) / "train")
            self._check_tokenizer(shards.read_shard(path), tokenizer)
            prepared.validation[entry.name] = path
        return prepared

    @staticmethod
    def _check_tokenizer(shard: shards.Shard, tokenizer: Tokenizer) -> None:
        if shard.tokenizer_identity != tokenizer.identity:
            raise DataError(
                f"{shard.path} was tokenised with tokenizer {shard.tokenizer_identity}, not with "
                f"{tokenizer.directory} ({tokenizer.identity}); re-run preprocess or set data.tokenizer.path"
            )


def prepare_run_data(data_config: DataConfig, *, is_main_process: bool, barrier: Callable[[], None]) -> PreparedData:
    """Resolve `data_config` into shard folders and a tokenizer (see the module docstring).

    Every process calls this; the main one builds while the others wait at `barrier()`. If the main
    process fails it still reaches the barrier (so the others do not hang) and re-raises; the others
    then fail with an error saying the cache entry is missing.
    """
    if is_main_process:
        try:
            prepared = _Preparer(data_config, build=True).run()
        except BaseException:
            barrier()
            raise
        barrier()
        return prepared
    barrier()
    return _Preparer(data_config, build=False).run()


def resolve_tokenizer(data_config: DataConfig) -> Path:
    """The folder of the tokenizer a run with `data_config` uses, without building anything: the configured
    path, or the one trained and cached for its first raw training source (DataError if not there)."""
    return _Preparer(data_config, build=False).tokenizer().directory

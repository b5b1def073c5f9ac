"""Data sources: where raw documents come from. A registry, like activations.

A source is named the same way everywhere (CLI `--source`, YAML `data.train[].source`):
- a path, a glob or a directory of text / jsonl / json / parquet files (`files`);
- `hf:NAME[:CONFIG][:SPLIT]` for `datasets.load_dataset` (streamed), or a local `save_to_disk` folder;
- `builtin:pydoc[:SPLIT]` for the embedded offline corpus (split `train`, the default, or `validation`).

`open_source(spec, options)` returns a `Source` with `documents()` (an iterator of str, streamed),
`describe()` (a string that changes when the contents may have changed: it keys the preprocessing cache),
`size_bytes()` (for progress estimates) and `stream(rank, world_size, position)`: one data-parallel rank's
share of the documents, in order, resumable from a JSON-able position (for training on the fly).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from polycom_lm.data import files, pydoc_corpus
from polycom_lm.errors import DataError, first_line
from polycom_lm.registry import Registry

SOURCES = Registry("data source")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+-]*):(?!//)")


@dataclass(frozen=True)
class SourceOptions:
    """How raw files are read. `document_delimiter`: None (one document per text file), a line that
    separates documents (e.g. `<|endoftext|>`), or `blank_lines`. `decode_errors`: `strict` (bad UTF-8
    is an error naming file and byte offset) or `replace` (U+FFFD). `newlines`: `normalize` (`\r\n` and
    lone `\r` become `\n` in every document, as Python's text mode reads files) or `keep`."""

    text_field: str = "text"
    document_delimiter: Optional[str] = None
    decode_errors: str = "strict"
    newlines: str = "normalize"

    def __post_init__(self) -> None:
        if self.newlines not in files.NEWLINE_MODES:
            raise DataError(f"newlines={self.newlines!r} is invalid; use {' or '.join(files.NEWLINE_MODES)}")

    def describe(self) -> str:
        # Part of every cache key: shards made with other reading settings (or before a setting existed)
        # are never reused.
        return (f"text_field={self.text_field!r} delimiter={self.document_delimiter!r} "
                f"decode_errors={self.decode_errors} newlines={self.newlines}")

    def clean(self, text: str) -> str:
        """A document as the settings want it (see `newlines`)."""
        return files.normalize_newlines(text) if self.newlines == "normalize" else text


class DocumentStream:
    """One rank's share of a source's documents, in the source's order, from a position. Iterating yields
    cleaned documents; `position()` (JSON-able) is where the next one starts, and `Source.stream(...,
    position)` continues exactly there. The generic stream deals document `i` of the source to rank
    `i % world_size` and resumes by reading past the documents already consumed; sources override it
    where they can seek (files) or the library keeps a position (`datasets`)."""

    def __init__(self, source: "Source", rank: int, world_size: int, position: Optional[dict] = None):
        self.source, self.rank, self.world_size = source, rank, world_size
        self._consumed = int((position or {}).get("documents", 0))  # the source's documents, all ranks

    def __iter__(self) -> Iterator[str]:
        for index, document in enumerate(self.source._documents()):
            if index < self._consumed:
                continue
            self._consumed = index + 1
            if index % self.world_size == self.rank:
                yield self.source.options.clean(document)

    def position(self) -> dict:
        return {"documents": self._consumed}


class Source:
    """Base class; subclasses register with `@SOURCES.register(kind)` and implement `_documents`."""

    stream_class = DocumentStream

    def __init__(self, spec: str, options: SourceOptions):
        self.spec = spec
        self.options = options

    def describe(self) -> str:
        raise NotImplementedError

    def size_bytes(self) -> Optional[int]:
        """Bytes to read, when known in advance (local files), for progress estimates."""
        return None

    def stream(self, rank: int = 0, world_size: int = 1, position: Optional[dict] = None) -> DocumentStream:
        """Rank `rank`'s documents (of `world_size`), from `position` (None: the beginning)."""
        return self.stream_class(self, rank, world_size, position)

    def _documents(self) -> Iterator[str]:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        """Non-empty documents in a fixed order; DataError when the source holds none at all."""
        empty = True
        for document in self._documents():
            empty = False
            yield self.options.clean(document)
        if empty:
            raise DataError(f"source {self.spec!r} yielded no documents")


class _FileStream(DocumentStream):
    """Documents dealt round-robin over ranks in file order; the position is (file, documents read in it,
    documents read in all), so a resume opens the right file and reads past the documents before."""

    def __init__(self, source: "FileSource", rank: int, world_size: int, position: Optional[dict] = None):
        super().__init__(source, rank, world_size)
        position = position or {}
        self._file, self._in_file = int(position.get("file", 0)), int(position.get("in_file", 0))
        self._consumed = int(position.get("documents", 0))

    def __iter__(self) -> Iterator[str]:
        source: FileSource = self.source  # type: ignore[assignment]
        options = source.options
        while self._file < len(source.paths):
            documents = files.read_file(source.paths[self._file], options.text_field, options.document_delimiter,
                                        options.decode_errors, options.newlines)
            for in_file, document in enumerate(documents):
                if in_file < self._in_file:
                    continue
                index = self._consumed
                self._in_file, self._consumed = in_file + 1, index + 1
                if index % self.world_size == self.rank:
                    yield options.clean(document)
            self._file, self._in_file = self._file + 1, 0

    def position(self) -> dict:
        return {"file": self._file, "in_file": self._in_file, "documents": self._consumed}


@SOURCES.register("files")
class FileSource(Source):
    """A file, a directory (every supported file below it, recursively, sorted) or a glob (sorted)."""

    stream_class = _FileStream

    def __init__(self, spec: str, options: SourceOptions):
        super().__init__(spec, options)
        self.paths = self._resolve(spec)

    @staticmethod
    def _resolve(spec: str) -> list[Path]:
        path = Path(os.path.expanduser(spec))
        if glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise DataError(f"no files match the glob {spec!r}")
            return matches
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in files.SUPPORTED_SUFFIXES
                             and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not matches:
                raise DataError(f"directory {spec} holds no {'/'.join(files.SUPPORTED_SUFFIXES)} files")
            return matches
        if path.is_file():
            return [path]
        raise DataError(f"data source {spec!r} does not exist (expected a file, directory, glob, "
                        f"hf:NAME[:CONFIG][:SPLIT] or one of: {', '.join(builtin_names())})")

    def describe(self) -> str:
        entries = []
        for path in self.paths:
            stat = path.stat()
            entries.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        return f"files {self.options.describe()} [{'; '.join(entries)}]"

    def size_bytes(self) -> Optional[int]:
        return sum(path.stat().st_size for path in self.paths)

    def _documents(self) -> Iterator[str]:
        for path in self.paths:
            yield from files.read_file(path, self.options.text_field, self.options.document_delimiter,
                                       self.options.decode_errors, self.options.newlines)


class _DatasetStream(DocumentStream):
    """A `datasets.IterableDataset`: ranks get whole files (rank `r` the `r`-th contiguous block) when there
    are at least as many files as ranks, else every `world_size`-th row; the position is the library's
    `state_dict()`. (Reading whole files keeps each rank from downloading what the others read; the blocks
    differ by one file at most, and each rank's stream starts its next epoch on its own.)"""

    def __init__(self, source: "HuggingFaceSource", rank: int, world_size: int, position: Optional[dict] = None):
        super().__init__(source, rank, world_size)
        self._dataset, start = source._iterable(rank, world_size)
        self._dataset.load_state_dict(position["state"] if position else start)

    def __iter__(self) -> Iterator[str]:
        source: HuggingFaceSource = self.source  # type: ignore[assignment]
        for index, record in enumerate(self._dataset):
            text = source._text(record, index)
            if text.strip():
                yield source.options.clean(text)

    def position(self) -> dict:
        return {"state": self._dataset.state_dict()}


@SOURCES.register("hf")
class HuggingFaceSource(Source):
    """`hf:NAME[:CONFIG][:SPLIT]`. NAME may be a hub dataset, a local folder of data files (both via
    `load_dataset`, streamed) or a `save_to_disk` folder (`load_from_disk`). SPLIT defaults to train.
    A hub NAME with more than `owner/name` (`hf:allenai/OLMoE-mix-0924/data/dclm`) reads the files under
    that folder of the repository only."""

    stream_class = _DatasetStream

    def __init__(self, spec: str, options: SourceOptions):
        super().__init__(spec, options)
        parts = spec.split(":", 3)[1:]
        if not parts or not parts[0] or len(parts) > 3:
            raise DataError(f"source {spec!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:roneneldan/TinyStories::train")
        self.name = parts[0]
        self.config_name = parts[1] if len(parts) > 1 and parts[1] else None
        self.split = parts[2] if len(parts) > 2 and parts[2] else "train"
        self.data_dir: Optional[str] = None
        self._iterables: dict = {}
        path = Path(self.name)
        if not path.is_absolute() and not self.name.startswith(".") and not path.exists() and self.name.count("/") > 1:
            owner, name, folder = self.name.split("/", 2)
            self.name, self.data_dir = f"{owner}/{name}", folder.strip("/")

    def _is_saved_dataset(self) -> bool:
        path = Path(self.name)
        return path.is_dir() and any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json"))

    def describe(self) -> str:
        detail = ""
        if Path(self.name).exists():
            stats = sorted(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in Path(self.name).rglob("*") if p.is_file())
            detail = f" [{'; '.join(stats)}]"
        folder = f" data_dir={self.data_dir}" if self.data_dir else ""
        return (f"hf name={self.name}{folder} config={self.config_name} split={self.split} "
                f"{self.options.describe()}{detail}")

    def _load(self, iterable: bool = False):
        """The split: streamed (`load_dataset(streaming=True)`), or a saved dataset (an IterableDataset over
        it when `iterable`)."""
        import datasets

        try:
            if self._is_saved_dataset():
                dataset = datasets.load_from_disk(self.name)
                if isinstance(dataset, datasets.DatasetDict):
                    if self.split not in dataset:
                        raise DataError(f"source {self.spec!r}: no split {self.split!r} (splits: {', '.join(dataset)})")
                    dataset = dataset[self.split]
                return dataset.to_iterable_dataset() if iterable else dataset
            extra = {"data_files": {self.split: f"{self.data_dir}/**"}} if self.data_dir else {}
            return datasets.load_dataset(self.name, self.config_name, split=self.split, streaming=True, **extra)
        except DataError:
            raise
        except Exception as error:  # network, missing dataset, bad config: many exception types
            message = first_line(error)
            raise DataError(f"source {self.spec!r}: cannot load ({type(error).__name__}: {message})") from None

    def _iterable(self, rank: int, world_size: int):
        """(this rank's IterableDataset, its state at the start), loaded once: a stream's every epoch reuses
        it (resolving a dataset's files takes seconds)."""
        key = (rank, world_size)
        if key not in self._iterables:
            dataset = self._load(iterable=True)
            if world_size > 1:
                files = getattr(dataset, "num_shards", getattr(dataset, "n_shards", 1))
                if files % world_size and files >= world_size and hasattr(dataset, "shard"):
                    # split_dataset_by_node would give every rank every file and keep one row in world_size.
                    dataset = dataset.shard(num_shards=world_size, index=rank, contiguous=True)
                else:
                    from datasets.distributed import split_dataset_by_node

                    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
            self._iterables[key] = (dataset, dataset.state_dict())
        return self._iterables[key]

    def _text(self, record: dict, index: int) -> str:
        field = self.options.text_field
        if field not in record:
            raise DataError(f"source {self.spec!r} row {index}: no {field!r} field (fields: {', '.join(record)}); "
                            f"set data.text_field / --text-field")
        text = record[field]
        if not isinstance(text, str):
            raise DataError(f"source {self.spec!r} row {index}: field {field!r} is {type(text).__name__}, not a string")
        return text

    def _documents(self) -> Iterator[str]:
        for index, record in enumerate(self._load()):
            text = self._text(record, index)
            if text.strip():
                yield text


@SOURCES.register("builtin:pydoc")
class PydocSource(Source):
    """The Python documentation corpus (see `pydoc_corpus`): `builtin:pydoc` or `builtin:pydoc:validation`."""

    def __init__(self, spec: str, options: SourceOptions):
        super().__init__(spec, options)
        parts = spec.split(":")
        self.split = parts[2] if len(parts) > 2 else "train"
        if self.split not in ("train", "validation") or len(parts) > 3:
            raise DataError(f"source {spec!r}: split must be train or validation (builtin:pydoc[:train|:validation])")

    def describe(self) -> str:
        return f"{pydoc_corpus.description()} split={self.split} {self.options.describe()}"

    def _documents(self) -> Iterator[str]:
        return pydoc_corpus.iter_documents(self.split)

    def held_out(self) -> "PydocSource":
        return PydocSource("builtin:pydoc:validation", self.options)


def builtin_names() -> list[str]:
    return sorted(name for name in SOURCES if name.startswith("builtin:"))


def source_kind(spec: str) -> str:
    """The registry key for `spec`: `builtin:<name>`, another registered scheme, or `files`."""
    if spec.startswith("builtin:"):
        return ":".join(spec.split(":")[:2])
    match = _SCHEME.match(spec)
    if match and match.group(1) in SOURCES:
        return match.group(1)
    if match and len(match.group(1)) > 1 and not Path(spec).exists():
        raise DataError(f"data source {spec!r}: unknown scheme {match.group(1)!r}; use a path, a glob, "
                        f"hf:NAME[:CONFIG][:SPLIT] or one of: {', '.join(builtin_names())}")
    return "files"


def open_source(spec: str, options: Optional[SourceOptions] = None) -> Source:
    if not spec or not spec.strip():
        raise DataError("empty data source; give a path, a glob, hf:NAME[:CONFIG][:SPLIT] or builtin:pydoc")
    kind = source_kind(spec)
    try:
        cls = SOURCES.get(kind)
    except Exception as error:  # ConfigError listing the registered kinds
        raise DataError(f"data source {spec!r}: {error}") from None
    return cls(spec, options or SourceOptions())


def iter_sources(specs: list[str], options: SourceOptions) -> Iterator[str]:
    """The documents of several sources, one after another."""
    for spec in specs:
        yield from open_source(spec, options).documents()

"""Data sources: where raw documents come from. A registry, like activations.

A source is named the same way everywhere (CLI `--source`, YAML `data.train[].source`):
- a path, a glob or a directory of text / jsonl / json / parquet files (`files`);
- `hf:NAME[:CONFIG][:SPLIT]` for `datasets.load_dataset` (streamed), or a local `save_to_disk` folder;
- `builtin:pydoc[:SPLIT]` for the embedded offline corpus (split `train`, the default, or `validation`).

`open_source(spec, options)` returns a `Source` with `documents()` (an iterator of str, streamed) and
`describe()` (a string that changes when the contents may have changed: it keys the preprocessing cache).
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
    is an error naming file and byte offset) or `replace` (U+FFFD)."""

    text_field: str = "text"
    document_delimiter: Optional[str] = None
    decode_errors: str = "strict"

    def describe(self) -> str:
        return f"text_field={self.text_field!r} delimiter={self.document_delimiter!r} decode_errors={self.decode_errors}"


class Source:
    """Base class; subclasses register with `@SOURCES.register(kind)` and implement `_documents`."""

    def __init__(self, spec: str, options: SourceOptions):
        self.spec = spec
        self.options = options

    def describe(self) -> str:
        raise NotImplementedError

    def _documents(self) -> Iterator[str]:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        """Non-empty documents in a fixed order; DataError when the source holds none at all."""
        empty = True
        for document in self._documents():
            empty = False
            yield document
        if empty:
            raise DataError(f"source {self.spec!r} yielded no documents")


@SOURCES.register("files")
class FileSource(Source):
    """A file, a directory (every supported file below it, recursively, sorted) or a glob (sorted)."""

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

    def _documents(self) -> Iterator[str]:
        for path in self.paths:
            yield from files.read_file(path, self.options.text_field, self.options.document_delimiter,
                                       self.options.decode_errors)


@SOURCES.register("hf")
class HuggingFaceSource(Source):
    """`hf:NAME[:CONFIG][:SPLIT]`. NAME may be a hub dataset, a local folder of data files (both via
    `load_dataset`, streamed) or a `save_to_disk` folder (`load_from_disk`). SPLIT defaults to train."""

    def __init__(self, spec: str, options: SourceOptions):
        super().__init__(spec, options)
        parts = spec.split(":", 3)[1:]
        if not parts or not parts[0] or len(parts) > 3:
            raise DataError(f"source {spec!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:roneneldan/TinyStories::train")
        self.name = parts[0]
        self.config_name = parts[1] if len(parts) > 1 and parts[1] else None
        self.split = parts[2] if len(parts) > 2 and parts[2] else "train"

    def _is_saved_dataset(self) -> bool:
        path = Path(self.name)
        return path.is_dir() and any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json"))

    def describe(self) -> str:
        detail = ""
        if Path(self.name).exists():
            stats = sorted(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in Path(self.name).rglob("*") if p.is_file())
            detail = f" [{'; '.join(stats)}]"
        return f"hf name={self.name} config={self.config_name} split={self.split} text_field={self.options.text_field!r}{detail}"

    def _load(self):
        import datasets

        try:
            if self._is_saved_dataset():
                dataset = datasets.load_from_disk(self.name)
                if isinstance(dataset, datasets.DatasetDict):
                    if self.split not in dataset:
                        raise DataError(f"source {self.spec!r}: no split {self.split!r} (splits: {', '.join(dataset)})")
                    dataset = dataset[self.split]
                return dataset
            return datasets.load_dataset(self.name, self.config_name, split=self.split, streaming=True)
        except DataError:
            raise
        except Exception as error:  # network, missing dataset, bad config: many exception types
            message = first_line(error)
            raise DataError(f"source {self.spec!r}: cannot load ({type(error).__name__}: {message})") from None

    def _documents(self) -> Iterator[str]:
        field = self.options.text_field
        for index, record in enumerate(self._load()):
            if field not in record:
                raise DataError(f"source {self.spec!r} row {index}: no {field!r} field (fields: {', '.join(record)}); "
                                f"set data.text_field / --text-field")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"source {self.spec!r} row {index}: field {field!r} is {type(text).__name__}, not a string")
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
        return f"{pydoc_corpus.description()} split={self.split}"

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

"""`builtin:pydoc`: the English documentation that ships with every Python installation, harvested at run
time so the project trains with zero downloads and nothing of it is committed.

Documents, in a fixed order:
- each topic of `pydoc_data.topics` (the language reference sections `help()` shows);
- each standard-library module's docstrings (module, classes, functions, methods, with qualified-name
  headings), read from the source files with `ast` rather than imported, since some modules act on
  import (`antigravity` opens a browser, `this` prints).

The held-out part is fixed: a document belongs to `validation` when a hash of its name (topic or module
path) falls in the lowest `HELD_OUT_FRACTION`, so it never depends on the Python version's file order.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

HELD_OUT_FRACTION = 0.05
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def _held_out(name: str) -> bool:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < HELD_OUT_FRACTION


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def description() -> str:
    """What identifies the corpus: the Python version and where its standard library lives."""
    return f"builtin:pydoc python={sys.version.split()[0]} stdlib={stdlib_dir()}"


def _topics() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    seen: set[str] = set()
    for name in sorted(topics):  # several topics share one text ("pdb" and its aliases): keep the first
        if topics[name] not in seen:
            seen.add(topics[name])
            yield f"topic:{name}", topics[name]


def _module_files() -> Iterator[Path]:
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in _SKIPPED_DIRS or part.startswith(".") for part in parts[:-1]):
            continue
        yield path


def _module_text(path: Path, module: str) -> str:
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old docstrings
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    sections: list[str] = []

    def visit(node: ast.AST, qualified: str) -> None:
        docstring = ast.get_docstring(node, clean=True)
        if docstring:
            sections.append(f"{qualified}\n\n{docstring}")
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not child.name.startswith("_"):
                visit(child, f"{qualified}.{child.name}")

    visit(tree, module)
    return "\n\n".join(sections)


def iter_documents(split: str) -> Iterator[str]:
    """Documents of `split` ("train" or "validation") in a fixed order."""
    want_held_out = split == "validation"
    for name, text in _topics():
        if _held_out(name) == want_held_out and text.strip():
            yield text.strip()
    root = stdlib_dir()
    for path in _module_files():
        relative = path.relative_to(root).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        if _held_out(f"module:{module}") != want_held_out:
            continue
        text = _module_text(path, module)
        if text.strip():
            yield text

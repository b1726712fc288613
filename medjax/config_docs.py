"""What each key of a config means, read from the config files themselves.

A key's meaning is written once, beside the statement that creates it in configs/ (configs/config_lib.py
for the shared sections): the statement's trailing ``# ...`` comment, or, without one, the comment lines
directly above it (no blank line between). To find that statement for every key of a resolved config,
the file's ``get_config(variant)`` runs once more while ``ConfigDict.__setitem__`` notes, for each key,
the first line of the config folder that assigned it (the key's definition; later assignments are
variants and overrides and do not define it). ``ast`` gives the statement around that line and
``tokenize`` its comments, so no second list of meanings can drift from the files.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import io
import os
import sys
import tokenize

import ml_collections

NO_MEANING = "(no comment in the config file)"


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted path, e.g. "data.manifest"
    default: object  # the value the config file gives it (variant included, no overrides)
    meaning: str  # one line; "" when the defining statement has no comment
    where: str  # "file:line" of the defining statement ("" when not found)


def load_config_file(path: str):
    """The module of a config file, loaded from its path as ``--config`` loads it."""
    name = "medjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"Cannot load the config file {path!r}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _watch_assignments(folder: str, seen: dict):
    """While active, ``seen[(id(configdict), key)]`` = (file, line) of the first assignment made from a
    file under ``folder``; the objects are kept alive in ``seen`` so that their ids stay unique."""
    original = ml_collections.ConfigDict.__setitem__
    folder = os.path.abspath(folder) + os.sep

    def watched(self, key, value):
        slot = (id(self), key)
        if slot not in seen:
            frame = sys._getframe(1)
            while frame is not None and not os.path.abspath(frame.f_code.co_filename).startswith(folder):
                frame = frame.f_back
            if frame is not None:
                seen[slot] = (os.path.abspath(frame.f_code.co_filename), frame.f_lineno, self)
        return original(self, key, value)

    ml_collections.ConfigDict.__setitem__ = watched
    try:
        yield
    finally:
        ml_collections.ConfigDict.__setitem__ = original


class _SourceComments:
    """The statements and comments of one Python file."""

    def __init__(self, path: str):
        with open(path) as f:
            text = f.read()
        self.lines = text.splitlines()
        self.spans = sorted((node.lineno, node.end_lineno) for node in ast.walk(ast.parse(text))
                            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)))
        self.comments = {}  # line -> comment text without '#'
        self.code_lines = set()  # lines that hold code (not only a comment)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                self.comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                  tokenize.ENDMARKER):
                self.code_lines.update(range(tok.start[0], tok.end[0] + 1))

    def meaning(self, line: int) -> str:
        """The trailing comment of the statement at ``line``, else the comment block directly above it."""
        holding = [(last - first, first, last) for first, last in self.spans if first <= line <= last]
        _, start, end = min(holding) if holding else (0, line, line)
        trailing = [self.comments[n] for n in range(start, end + 1) if n in self.comments and n in self.code_lines]
        if trailing:
            return trailing[-1]
        above, n = [], start - 1
        while n >= 1 and n in self.comments and n not in self.code_lines:
            above.insert(0, self.comments[n])
            n -= 1
        return " ".join(above)


def config_docs(config_file: str, variant: str = "") -> list[KeyDoc]:
    """Every leaf key of ``config_file``'s ``get_config(variant)``, in the file's order, with its meaning."""
    module = load_config_file(config_file)
    seen: dict = {}
    with _watch_assignments(os.path.dirname(os.path.abspath(config_file)), seen):
        config = module.get_config(variant) if variant else module.get_config()
    sources: dict[str, _SourceComments] = {}
    docs = []

    def walk(node: ml_collections.ConfigDict, prefix: str):
        for key in node.keys():
            value = node[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
                continue
            found = seen.get((id(node), key))
            meaning, where = "", ""
            if found is not None:
                path, line, _ = found
                if path not in sources:
                    sources[path] = _SourceComments(path)
                meaning = sources[path].meaning(line)
                where = f"{os.path.relpath(path)}:{line}"
            docs.append(KeyDoc(prefix + key, value, meaning, where))

    walk(config, "")
    return docs


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def split_config_flag(value: str) -> tuple[str, str]:
    """``"configs/x.py:variant"`` -> ``("configs/x.py", "variant")``."""
    path, _, variant = value.partition(":")
    return path, variant

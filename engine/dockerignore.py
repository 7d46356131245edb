""".dockerignore, read the way Docker reads it: which files `docker build` sends.

The rules are moby/patternmatcher's: `*` and `?` stop at "/", `**` crosses folders,
a "!pattern" line lets files back in, and the last matching line wins. A path is
relative to the build context and "/"-separated. engine.provenance hashes exactly
the files `sent_files` lists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pattern:
    text: str  # cleaned, without the leading "!"
    include: bool  # a "!pattern" line lets files back in
    regex: re.Pattern


def _translate(pattern: str) -> str:
    """A .dockerignore pattern as a regex (moby/patternmatcher's rules: `*` and `?` stop
    at "/", `**` crosses folders)."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif char in "[]":
            out += char
        else:
            out += re.escape(char)
        i += 1
    return out


def read_patterns(project_dir: Path) -> list[Pattern]:
    """The folder's .dockerignore lines, cleaned as `docker build` cleans them."""
    path = project_dir / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    patterns = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        text = os.path.normpath(line[1:].strip() if include else line).lstrip("/")
        if text and text != ".":
            patterns.append(Pattern(text, include, re.compile(f"^{_translate(text)}$")))
    return patterns


def _last_match(path: str, patterns: list[Pattern]) -> int:
    """Index of the last pattern matching `path` or one of its parent folders, else -1."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    last = -1
    for index, pattern in enumerate(patterns):
        if any(pattern.regex.match(prefix) for prefix in prefixes):
            last = index
    return last


def is_sent(path: str, patterns: list[Pattern]) -> bool:
    """Does `docker build` send this path (relative, "/"-separated)? The last match wins."""
    last = _last_match(path, patterns)
    return last < 0 or patterns[last].include


def may_hold_sent_files(folder: str, patterns: list[Pattern]) -> bool:
    """Is a folder worth walking: sent itself, or could a later "!pattern" let a file in?"""
    last = _last_match(folder, patterns)
    if last < 0 or patterns[last].include:
        return True
    depth = folder.count("/") + 1
    for pattern in patterns[last + 1 :]:
        if not pattern.include:
            continue
        if "**" in pattern.text:
            return True
        parts = pattern.text.split("/")
        if len(parts) > depth and re.match(f"^{_translate('/'.join(parts[:depth]))}$", folder):
            return True
    return False


def sent_files(project_dir: str | Path, leave_out: Collection[str] = ()) -> list[str]:
    """The files `docker build` sends from this folder: relative "/" paths, sorted.

    Folders that .dockerignore leaves out (.venv, data, .git) are not walked, so a
    gigabyte .venv costs nothing.

    Args:
        project_dir: the build context.
        leave_out: paths never listed, sent or not.
    """
    root = Path(project_dir)
    patterns = read_patterns(root)
    found = []

    def walk(folder: Path, relative: str) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                path = f"{relative}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    if may_hold_sent_files(path, patterns):
                        walk(Path(entry.path), path + "/")
                elif is_sent(path, patterns) and path not in leave_out:
                    found.append(path)

    walk(root, "")
    return sorted(found)

"""The house rules a newcomer relies on, checked on the source itself.

- Import weight: the host side (every module of host/, project_driver.py and
  lifecycle.py with their parsers built) and the light engine modules it uses never
  import TensorFlow or Keras. Each module is imported alone in a fresh interpreter,
  so a failure names the module, and the chain of import lines that pulled it in.
- No import circle among the project's modules, counting imports at module level and
  inside functions (those under `if TYPE_CHECKING:` never run and are left out).
- The engine never imports the host side: host/, project_driver, lifecycle or train.
- Sizes a person reads in one sitting: no product module over 350 lines,
  project_driver.py at most 150, lifecycle.py at most 200; at most 20 `# fmt: skip`
  in the repository; a function over 60 lines says why in its docstring, with the
  words "long because" (e.g. "Long because the steps share one MLflow run ...").

The size tests run per file, so a failure names the file; they hold for the whole
repository once every part of issue 19 is merged.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The product: what a run, the host side or the tracking server executes (tests are not).
PRODUCT_GLOBS = ("engine/**/*.py", "host/**/*.py", "tracking_server/**/*.py")
PRODUCT_FILES = ("project_driver.py", "lifecycle.py", "train.py")
HOST_SIDE = ("host", "project_driver", "lifecycle", "train")
HEAVY = ("tensorflow", "keras")
# Light engine modules the host side uses (written once for both sides).
LIGHT_ENGINE = (
    "engine.common",
    "engine.config",
    "engine.provenance",
    "engine.dockerignore",
    "engine.sources",  # imports a source's module on first use
    "engine.cli",  # train.py --help
    "engine.client",  # lifecycle.py request
    "engine.headers",
)
# CLIs whose build_parser() must stay light too (their --help answers in a moment).
CLIS = ("project_driver", "lifecycle")
MODULE_LINES, CLI_LINES = 350, {"project_driver.py": 150, "lifecycle.py": 200}
FUNCTION_LINES, LONG_BECAUSE = 60, "long because"
FMT_SKIPS = 20


def product_paths() -> list[Path]:
    """Every product .py file, sorted."""
    paths = {p for pattern in PRODUCT_GLOBS for p in ROOT.glob(pattern)}
    paths |= {ROOT / name for name in PRODUCT_FILES if (ROOT / name).exists()}
    return sorted(p for p in paths if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    """engine/images.py -> engine.images; host/__init__.py -> host."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repo_python_files() -> list[Path]:
    """The repository's .py files, tracked or new but not ignored (git decides; mlruns/ and
    .venv/ hold copies of other code); without git, the product and tests/."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return product_paths() + sorted((ROOT / "tests").glob("*.py"))
    return sorted({ROOT / name for name in listed.split("\0") if name and (ROOT / name).exists()})


# ---------------------------------------------------------------- import weight

# Records where the first import of a heavy package came from, then says so.
PROBE = """
import importlib, json, sys, traceback

HEAVY, ROOT, NAME, CLIS = {heavy!r}, {root!r}, {name!r}, {clis!r}
culprit = []


class Witness:
    def find_spec(self, fullname, path=None, target=None):
        if fullname in HEAVY and not culprit:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f.filename.startswith(ROOT) and "/.venv/" not in f.filename]
            chain = [f"{{f.filename[len(ROOT) + 1:]}}:{{f.lineno}}" for f in frames]
            culprit.append(" -> ".join(chain) or "outside the project")
        return None


sys.meta_path.insert(0, Witness())
module = importlib.import_module(NAME)
if NAME in CLIS and hasattr(module, "build_parser"):
    module.build_parser()
print(json.dumps([sorted(h for h in HEAVY if h in sys.modules), culprit]))
"""


def host_side_modules() -> list[str]:
    """Every module of host/, the two CLIs, train.py (its --help), and the light engine
    modules they use."""
    host = [module_name(p) for p in product_paths() if module_name(p).split(".")[0] == "host"]
    clis = [name for name in CLIS if (ROOT / f"{name}.py").exists()]
    return [*host, *clis, "train", *LIGHT_ENGINE]


@pytest.mark.parametrize("name", host_side_modules())
def test_the_host_side_never_imports_tensorflow_or_keras(name):
    probe = PROBE.format(heavy=HEAVY, root=str(ROOT), name=name, clis=CLIS)
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    heavy, culprit = json.loads(done.stdout.strip().splitlines()[-1])
    where = f", first by {culprit[0]}" if culprit else ""
    assert not heavy, f"importing {name} imports {' and '.join(heavy)}{where}"


# ---------------------------------------------------------------- the import graph


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that can run: at module level and in functions, not TYPE_CHECKING's."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _type_checking_block(node):
            for branch in node.orelse:  # the `else:` of `if TYPE_CHECKING:` does run
                yield from _imports(ast.Module(body=[branch], type_ignores=[]))
        else:
            yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (resolved to real modules)."""
    paths = {module_name(p): p for p in product_paths()}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 folders
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(filter(None, [*anchor, base]))
                # `from package import module` imports the module; else the names' module
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for candidate in candidates:
                while candidate and candidate not in paths:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            group.append(node)
            if len(group) > 1:
                found.append(_cycle_through(sorted(group), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A path from group[0] back to itself inside the group (breadth-first: the shortest)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return group


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_engine_never_imports_the_host_side():
    graph = import_graph()
    wrong = {
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.split(".")[0] == "engine"
        for target in targets
        if target.split(".")[0] in HOST_SIDE
    }
    assert not wrong, sorted(wrong)


def test_the_import_graph_sees_what_the_engine_imports():
    graph = import_graph()
    assert "engine.images" in graph["engine.sources"] | graph["engine.file_sources"]
    assert "engine.training" in graph["engine.cli"]  # imported inside main()
    assert "engine.training" in graph["train"] or "engine.cli" in graph["train"]


# ---------------------------------------------------------------- sizes


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", product_paths(), ids=_relative)
def test_a_product_module_reads_in_one_sitting(path):
    limit = CLI_LINES.get(_relative(path), MODULE_LINES)
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{_relative(path)} has {lines} lines; at most {limit}"


def _long_functions(path: Path) -> list[str]:
    """Functions over FUNCTION_LINES lines whose docstring does not say why."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            why = LONG_BECAUSE in (ast.get_docstring(node) or "").lower()
            if lines > FUNCTION_LINES and not why:
                found.append(f"{node.name} ({lines} lines, line {node.lineno})")
    return found


@pytest.mark.parametrize("path", repo_python_files(), ids=_relative)
def test_a_long_function_says_why(path):
    long = _long_functions(path)
    assert not long, (
        f"{_relative(path)}: {', '.join(long)} over {FUNCTION_LINES} lines; split them, or "
        f"say why in the docstring ('{LONG_BECAUSE} ...')"
    )


def _fmt_skips(path: Path) -> int:
    """How many comments in the file are exactly the formatter's skip marker."""
    with path.open("rb") as source:
        tokens = tokenize.tokenize(source.readline)
        marker = "# fmt" + ": skip"  # split, so this line is no marker itself
        return sum(t.type == tokenize.COMMENT and t.string == marker for t in tokens)


def test_the_formatter_decides_nearly_everywhere():
    counts = {_relative(p): n for p in repo_python_files() if (n := _fmt_skips(p))}
    total = sum(counts.values())
    assert total <= FMT_SKIPS, f"{total} `# fmt: skip` (at most {FMT_SKIPS}): {counts}"

"""The shape of the repository is part of what it teaches: these tests keep it.

- The top level (spot, train, oracle, data, visualize, utils) never imports the research folder
  experiments/, its imports have no cycle, and utils (the plumbing) imports no method file.
- Citations stand alone: the paper is cited as arXiv 2507.01654 with its ideas named, never by a
  private summary's section numbers; no issue numbers where users read.
- The code is short enough to read in one sitting: code lines (not blank, not comment, not
  docstring) within budget, and no function too long to read at once.
"""
import ast
import io
import re
import subprocess
import tokenize

import pytest

from conftest import ROOT

TOP_LEVEL = ("spot", "train", "oracle", "data", "visualize", "utils")
READING_PATH = ("spot", "train", "oracle", "data")
READING_PATH_BUDGET = 1250        # code lines of spot + train + oracle + data
ALL_PYTHON_BUDGET = 3300          # code lines of every .py outside tests/
LONGEST_ON_READING_PATH = 60      # lines of one function, def to last line
LONGEST_ANYWHERE = 80


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.stdout.split()]


def imports_of(path):
    """The first component of every module `path` imports, anywhere in the file (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_top_level_never_imports_experiments_and_has_no_cycle():
    graph = {m: imports_of(ROOT / f"{m}.py") & set(TOP_LEVEL) - {m} for m in TOP_LEVEL}
    for module in TOP_LEVEL:
        assert "experiments" not in imports_of(ROOT / f"{module}.py"), module
    assert graph["utils"] == set(), "utils.py is plumbing: it imports no method file"
    top_files = {p.name for p in ROOT.glob("*.py")}
    assert top_files == {f"{m}.py" for m in TOP_LEVEL}, f"unexpected top-level files {top_files}"

    def visit(module, path):          # depth-first search; a module met on its own path = a cycle
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for dep in graph[module]:
            visit(dep, path + [module])
    for module in TOP_LEVEL:
        visit(module, [])


def test_citations_stand_alone():
    bad = re.compile(r"PAPER|§\s*\d|\b[Ii]ssues? #?\d+\b")
    offenders = []
    for path in tracked("*.py", "*.md", "*.ipynb"):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if bad.search(line) and path.name != "test_layout.py":
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert not offenders, "\n".join(offenders[:20])
    assert "arXiv 2507.01654" in (ROOT / "README.md").read_text()
    assert "2507.01654" in (ROOT / "spot.py").read_text()


def code_lines(source):
    """Lines holding code: not blank, not a comment, not part of a docstring."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def test_code_line_counter_on_a_known_answer():
    source = '"""doc\nstring"""\n\n# a comment\ndef f(x):\n    """doc"""\n    y = (x +\n         1)  # c\n    return y\n'
    assert code_lines(source) == 4          # def, the two lines of y = ..., return


def test_code_fits_its_budget():
    files = [p for p in tracked("*.py") if "tests" not in p.relative_to(ROOT).parts]
    counts = {p.relative_to(ROOT).as_posix(): code_lines(p.read_text()) for p in files}
    reading = sum(counts[f"{m}.py"] for m in READING_PATH)
    assert reading <= READING_PATH_BUDGET, f"reading path {reading} code lines: {counts}"
    assert sum(counts.values()) <= ALL_PYTHON_BUDGET, f"{sum(counts.values())} code lines: {counts}"


def test_no_function_too_long_to_read_at_once():
    too_long = []
    for path in tracked("*.py"):
        if "tests" in path.relative_to(ROOT).parts:
            continue
        limit = LONGEST_ON_READING_PATH if path.stem in READING_PATH and path.parent == ROOT \
            else LONGEST_ANYWHERE
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.name} {length} > {limit}")
    assert not too_long, "\n".join(too_long)

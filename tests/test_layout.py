"""The shape of the repository is part of what it teaches: these tests keep it.

- The top level (spot, train, oracle, data, visualize, utils) never imports the research folder
  experiments/, its imports have no cycle, and utils (the plumbing) imports no method file.
- Citations stand alone: the paper is cited as arXiv 2507.01654 with its ideas named, never by a
  private summary's section numbers; no issue numbers where users read.
- The code is short enough to read in one sitting, counted in Python tokens (the tokenize
  module's NAME, OP, NUMBER and STRING tokens: a docstring or an error message is one token, a
  comment none), which packing lines cannot shrink; lines of at most 100 characters, the reading
  path at most 11 tokens per line that holds one; functions short and with few parameters.
  Counted on Python 3.11 (3.12 splits f-strings into more tokens).
"""
import ast
import io
import re
import sys
import subprocess
import tokenize

import pytest

from conftest import ROOT

TOP_LEVEL = ("spot", "train", "oracle", "data", "visualize", "utils")
READING_PATH = ("spot", "train", "oracle", "data")
PAPER_FILES = ("spot", "train", "oracle")
PAPER_FILES_BUDGET = 10_000       # Python tokens of spot + train + oracle
TOP_LEVEL_BUDGET = 28_000         # Python tokens of the six top-level files (26,500 at the
                                  # reorganisation; the pretrained and data-scale work fit under)
TOKENS_PER_LINE = 11              # on the reading path, per line that holds a token
LONGEST_LINE = 100                # characters, every Python file outside tests/
LONGEST_ON_READING_PATH = 50      # lines of one function, def to last line
LONGEST_ANYWHERE = 80
MOST_PARAMETERS = 8               # of any function outside tests/ (*args and **kwargs count)
MOST_REQUIRED_ON_READING_PATH = 5   # parameters without a default


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


COUNTED = (tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.STRING)


def python_tokens(source):
    """The NAME, OP, NUMBER and STRING tokens of `source` (a docstring is one STRING token)."""
    readline = io.StringIO(source).readline
    return [t for t in tokenize.generate_tokens(readline) if t.type in COUNTED]


def test_token_counter_on_a_known_answer():
    source = '"""doc\nstring"""\n\n# a comment\ndef f(x, *a, **k):\n    return (x +\n   1)\n'
    # the docstring; def f ( x , * a , ** k ) :; return ( x + 1 )
    assert len(python_tokens(source)) == 1 + 12 + 6
    lines = {t.start[0] for t in python_tokens(source)}
    assert lines == {1, 5, 6, 7}


def outside_tests():
    return [p for p in tracked("*.py") if "tests" not in p.relative_to(ROOT).parts]


def on_reading_path(path):
    return path.parent == ROOT and path.stem in READING_PATH


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="budgets are counted on Python 3.11")
def test_code_fits_its_token_budget():
    counts = {m: len(python_tokens((ROOT / f"{m}.py").read_text())) for m in TOP_LEVEL}
    paper = sum(counts[m] for m in PAPER_FILES)
    assert paper <= PAPER_FILES_BUDGET, f"spot + train + oracle: {paper} tokens {counts}"
    total = sum(counts.values())
    assert total <= TOP_LEVEL_BUDGET, f"top level: {total} tokens {counts}"


def test_lines_are_short():
    too_long, dense = [], []
    for path in outside_tests():
        source = path.read_text()
        for number, line in enumerate(source.splitlines(), 1):
            if len(line) > LONGEST_LINE:
                too_long.append(f"{path.relative_to(ROOT)}:{number} {len(line)} chars")
        if on_reading_path(path):
            tokens = python_tokens(source)
            per_line = len(tokens) / len({t.start[0] for t in tokens})
            if per_line > TOKENS_PER_LINE:
                dense.append(f"{path.name}: {per_line:.1f} tokens per line")
    assert not too_long, "\n".join(too_long[:30]) + f"\n({len(too_long)} in all)"
    assert not dense, "\n".join(dense)


def functions(path):
    tree = ast.parse(path.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    return [node for node in ast.walk(tree) if isinstance(node, kinds)]


def parameters(node):
    """-> (parameters, parameters without a default); self and cls do not count."""
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    own = 1 if names[:1] in (["self"], ["cls"]) else 0
    positional = a.posonlyargs + a.args
    required = len(positional) - len(a.defaults)
    required += sum(d is None for d in a.kw_defaults)
    return len(names) - own, required - own


def test_functions_are_short_and_take_few_parameters():
    problems = []
    for path in outside_tests():
        reading = on_reading_path(path)
        limit = LONGEST_ON_READING_PATH if reading else LONGEST_ANYWHERE
        for node in functions(path):
            where = f"{path.relative_to(ROOT)}:{node.name}"
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                problems.append(f"{where} {length} lines > {limit}")
            count, required = parameters(node)
            if count > MOST_PARAMETERS:
                problems.append(f"{where} {count} parameters > {MOST_PARAMETERS}")
            if reading and required > MOST_REQUIRED_ON_READING_PATH:
                problems.append(f"{where} {required} required parameters")
    assert not problems, "\n".join(problems)


def test_no_foreign_formats_in_spot():
    source = (ROOT / "spot.py").read_text()
    for word in ("safetensors", "distill", "reg_token", "mask_token"):
        assert word not in source, word


def test_train_imports_neither_oracle_nor_visualize():
    assert not imports_of(ROOT / "train.py") & {"oracle", "visualize"}

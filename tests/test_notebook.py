"""tutorial.ipynb runs top to bottom, and the committed copy holds the outputs of a real run.

jupyter is not a dependency, so this file carries a small notebook runner of its own: it reads
the .ipynb JSON, executes every code cell in order in one namespace (cwd = repository root,
matplotlib's file-only Agg backend), and records what each cell printed plus every figure it
left open (as PNG), the way Jupyter's inline backend shows them.

    python -m pytest -q tests/test_notebook.py     # FAST mode (SPOT_TUTORIAL_FAST=1), < 90 s
    python tests/test_notebook.py --execute        # full run (a few minutes on a CPU); writes
                                                   # the outputs into tutorial.ipynb
"""
import argparse
import ast
import base64
import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tutorial.ipynb"
MAX_NOTEBOOK_BYTES = 2_000_000


# -----------------------------------------------------------------------------
# The runner

def _source(cell):
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def _lines(text):
    """nbformat stores multi-line strings as a list of lines, each keeping its newline."""
    return text.splitlines(keepends=True)


class _Stream(io.TextIOBase):
    """A file-like object that appends what is written to the cell's outputs as a stream output,
    merging consecutive writes (as Jupyter does)."""

    def __init__(self, outputs, name):
        self.outputs, self.name = outputs, name

    def writable(self):
        return True

    def write(self, text):
        if not text:
            return 0
        last = self.outputs[-1] if self.outputs else None
        if last is not None and last["output_type"] == "stream" and last["name"] == self.name:
            last["text"] += text
        else:
            self.outputs.append({"output_type": "stream", "name": self.name, "text": text})
        return len(text)


def _flush_figures(outputs):
    """Every open figure -> a display_data PNG output (then closed), like the inline backend."""
    for number in plt.get_fignums():
        figure = plt.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                 "text/plain": [repr(figure)]}})
    plt.close("all")


def _run_cell(code, namespace, outputs, count, filename):
    """exec one cell; a final bare expression is shown like Jupyter's Out[n] (unless None)."""
    tree = ast.parse(code, filename=filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
        if value is not None and not isinstance(value, matplotlib.figure.Figure):
            outputs.append({"output_type": "execute_result", "execution_count": count,
                            "metadata": {}, "data": {"text/plain": _lines(repr(value))}})


def run_notebook(path=NOTEBOOK, fast=True, env=None, rerun=False):
    """Execute every code cell of the notebook at `path` in order, in one namespace.

    fast: set SPOT_TUTORIAL_FAST=1 (tiny sizes) or unset it (the real thing).
    env:  extra environment variables for the run (e.g. SPOT_TUTORIAL_OUT).
    rerun: then run every code cell once more, in order, in the same namespace, as a reader who
          re-runs cells after the last one does (their outputs are not kept).
    Returns (notebook dict with fresh outputs and execution counts, seconds per code cell).
    Raises RuntimeError naming the cell if one fails. The caller's working directory, environment,
    sys.path, matplotlib settings, torch thread count and SIGINT handler are restored afterwards.
    """
    import signal

    notebook = json.loads(Path(path).read_text())
    saved_env = {key: os.environ.get(key) for key in ["SPOT_TUTORIAL_FAST", "MPLBACKEND", *(env or {})]}
    saved_cwd, saved_path = os.getcwd(), list(sys.path)
    saved_threads, saved_sigint = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    saved_show = plt.show
    os.environ.update({"MPLBACKEND": "Agg", **(env or {})})
    if fast:
        os.environ["SPOT_TUTORIAL_FAST"] = "1"
    else:
        os.environ.pop("SPOT_TUTORIAL_FAST", None)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    namespace = {"__name__": "__main__"}
    seconds, count = [], 0
    try:
        with matplotlib.rc_context():
            cells = [(i, c) for i, c in enumerate(notebook["cells"]) if c["cell_type"] == "code"]
            again = [(i, {**c, "outputs": []}) for i, c in cells] if rerun else []
            for index, cell in cells + again:
                count += 1
                outputs = []
                plt.show = lambda *args, **kwargs: _flush_figures(outputs)
                start = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(_Stream(outputs, "stdout")), \
                            contextlib.redirect_stderr(_Stream(outputs, "stderr")):
                        _run_cell(_source(cell), namespace, outputs, count, f"<cell {index}>")
                    _flush_figures(outputs)
                except BaseException as error:   # SystemExit too: train.main may sys.exit()
                    plt.close("all")
                    printed = "".join(o.get("text", "") for o in outputs)[-2000:]
                    raise RuntimeError(f"notebook cell {index} (code cell {count}) failed: "
                                       f"{type(error).__name__}: {error}\n--- its source:\n"
                                       f"{_source(cell)}\n--- its output:\n{printed}") from error
                if count > len(cells):      # the second pass: nothing to record
                    continue
                seconds.append(time.perf_counter() - start)
                for output in outputs:
                    if output["output_type"] == "stream":
                        output["text"] = _lines(output["text"])
                cell["outputs"], cell["execution_count"] = outputs, count
    finally:
        plt.show = saved_show
        plt.close("all")
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(saved_threads)
        signal.signal(signal.SIGINT, saved_sigint)
    return notebook, seconds


def write_notebook(notebook, path=NOTEBOOK):
    """Write in the layout Jupyter uses (1-space indent, trailing newline), so diffs stay small."""
    Path(path).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# Tests

def _load():
    return json.loads(NOTEBOOK.read_text())


def _code_cells(notebook):
    return [c for c in notebook["cells"] if c["cell_type"] == "code"]


def test_notebook_runs_in_fast_mode(tmp_path):
    """Every code cell runs, in order, in one namespace (SPOT_TUTORIAL_FAST=1), and every code
    cell runs again after the last (no cell rebinds a name an earlier cell relies on)."""
    shared = ROOT.parent / "shared" / "data"          # real photos for step 1 when present
    env = {"SPOT_TUTORIAL_OUT": str(tmp_path / "run"), "SPOT_DATA_DIR": str(shared)}
    notebook, seconds = run_notebook(fast=True, env=env, rerun=True)
    cells = _code_cells(notebook)
    assert len(seconds) == len(cells) and all(c["execution_count"] for c in cells)
    # The training cell really trained and wrote its run folder where it was told to.
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    # Every cell still produces something to look at (text or a figure).
    silent = [i for i, c in enumerate(cells) if not c["outputs"] and not _intentionally_silent(c)]
    assert not silent, f"code cells {silent} printed nothing in FAST mode"
    first_pass = sum(seconds)
    assert first_pass < 90, f"FAST mode took {first_pass:.0f} s (cells: {[round(s, 1) for s in seconds]})"


def test_sections_1_to_3_without_real_data(tmp_path):
    """Without real data the walk-through falls back to the built-in shapes image."""
    notebook = _load()
    first_training = next(i for i, c in enumerate(notebook["cells"])
                          if c["cell_type"] == "code" and "train.main(" in _source(c))
    notebook["cells"] = notebook["cells"][:first_training]
    path = tmp_path / "head.ipynb"
    path.write_text(json.dumps(notebook))
    executed, _ = run_notebook(path, fast=True, env={"SPOT_DATA_DIR": str(tmp_path / "nothing"),
                                                     "SPOT_TUTORIAL_OUT": str(tmp_path / "run")})
    printed = "".join("".join(o.get("text", "")) for c in _code_cells(executed) for o in c["outputs"])
    assert "built-in shapes" in printed


def _intentionally_silent(cell):
    return "silent" in cell.get("metadata", {}).get("tags", [])


def test_committed_notebook_has_outputs_of_a_full_run():
    notebook = _load()
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = _code_cells(notebook)
    assert cells, "the notebook has no code cells"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"not executed top to bottom: {counts}"
    for i, cell in enumerate(cells):
        assert cell["outputs"] or _intentionally_silent(cell), f"code cell {i + 1} has no outputs"
        for output in cell["outputs"]:
            assert output["output_type"] != "error", f"code cell {i + 1} holds an error"
            if output["output_type"] == "stream":
                assert output["name"] == "stdout" or "Traceback" not in "".join(output["text"])
    pictures = sum("image/png" in o.get("data", {}) for c in cells for o in c["outputs"])
    assert pictures >= 8, f"expected the notebook's figures in its outputs, found {pictures}"
    run = notebook["metadata"].get("spot_tutorial", {})
    assert run.get("mode") == "full", "outputs must come from a full run: python tests/test_notebook.py --execute"
    assert NOTEBOOK.stat().st_size < MAX_NOTEBOOK_BYTES


def test_structure_ids_overview_and_citations():
    """nbformat 4.5 needs a unique id on every cell; the overview table lists exactly the numbered
    sections, in order; the paper is cited by its arXiv number and each section names its idea."""
    notebook = _load()
    assert (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5)
    ids = [c.get("id") for c in notebook["cells"]]
    assert all(isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids), ids
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    markdown = [_source(c) for c in notebook["cells"] if c["cell_type"] == "markdown"]
    assert "arXiv 2507.01654" in markdown[0]
    sections = [int(n) for m in markdown for n in re.findall(r"^## (\d+)\.", m, re.MULTILINE)]
    overview = [int(n) for n in re.findall(r"^\| (\d+) \|", markdown[0], re.MULTILINE)]
    assert sections == list(range(1, len(sections) + 1)) and len(sections) >= 7, sections
    assert overview == sections, f"overview lists steps {overview}, the notebook has {sections}"
    for text in markdown:
        heading = text.lstrip().splitlines()[0]
        if heading.startswith("## "):
            assert re.search(r"\(.+\)\s*$", heading), f"section heading names no idea: {heading!r}"


def test_code_cells_are_short():
    """A guided walk: code cells a student can read at a glance."""
    for i, cell in enumerate(_code_cells(_load())):
        assert len(_source(cell).splitlines()) <= 40, f"code cell {i + 1} is longer than 40 lines"


# -----------------------------------------------------------------------------
# python tests/test_notebook.py --execute

def main(argv=None):
    parser = argparse.ArgumentParser(description="Execute tutorial.ipynb (no jupyter needed).")
    parser.add_argument("--execute", action="store_true",
                        help="run it in full mode and write the outputs into the notebook")
    parser.add_argument("--fast", action="store_true",
                        help="FAST mode (SPOT_TUTORIAL_FAST=1); never written to the notebook")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the run")
    parser.add_argument("--reuse-run", action="store_true",
                        help="let the notebook reuse an existing runs/tutorial (it then resumes that "
                             "run instead of training, and the outputs show no training log)")
    args = parser.parse_args(argv)
    if not (args.execute or args.fast):
        parser.error("pass --execute (full run, writes tutorial.ipynb) or --fast (a dry run)")
    previous = ROOT / "runs" / "tutorial" / "checkpoint.pt"
    if args.execute and previous.exists() and not args.reuse_run:
        parser.error(f"{previous} exists: the notebook would resume that run instead of training, so "
                     f"the written outputs would not show a real training run. Move or delete "
                     f"{previous.parent} first (or pass --reuse-run).")
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = ROOT.parent / "shared" / "data"          # the developers' copy of the real data
    if "SPOT_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["SPOT_DATA_DIR"] = str(shared)
    start = time.perf_counter()
    notebook, seconds = run_notebook(fast=args.fast)
    total = time.perf_counter() - start
    for i, s in enumerate(seconds, 1):
        print(f"code cell {i:>2}: {s:6.1f} s")
    print(f"total {total:.1f} s ({torch.get_num_threads()} threads)")
    if args.fast:
        return 0
    notebook["metadata"]["spot_tutorial"] = {
        "mode": "full", "seconds": round(total, 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    write_notebook(notebook)
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

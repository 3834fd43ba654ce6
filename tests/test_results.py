"""The reported numbers are the committed ones: every table of RESULTS.md and every markdown table
in results/ is exactly what `python -m experiments.tables` writes from results/*.json(l), the
README stays a short front page (the full tables live in RESULTS.md), and its verdicts are cells
of those tables."""
import re

from conftest import ROOT
from experiments import tables

README_MAX_LINES = 200


def test_every_table_is_generated_from_the_committed_results():
    stale = tables.stale()[1]
    assert not stale, ("not as `python -m experiments.tables` writes them (run it): " + ", ".join(stale))


def test_results_md_holds_every_block_once():
    names = re.findall(r"<!-- begin: ([\w-]+) -->", (ROOT / "RESULTS.md").read_text())
    assert sorted(names) == sorted(tables.generate()[1]), names


def test_check_flag_names_a_stale_block(tmp_path, monkeypatch, capsys):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text((ROOT / "RESULTS.md").read_text().replace(
        "<!-- begin: cifar10-training -->\n", "<!-- begin: cifar10-training -->\nstale\n"))
    monkeypatch.setattr(tables, "RESULTS_MD", results_md)
    assert tables.main(["--check"]) == 1
    assert "RESULTS.md: block cifar10-training" in capsys.readouterr().out
    assert "stale" in results_md.read_text()            # --check writes nothing


def test_readme_is_short_and_links_the_results():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert "RESULTS.md" in readme


def test_readme_verdicts_are_cells_of_the_generated_tables():
    """README's verdict table is copied by hand: each cell "a − b [low, high] verdict" must be a cell
    of a table that `python -m experiments.tables` generates into RESULTS.md."""
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "RESULTS.md").read_text()
    generated = "".join(re.findall(r"<!-- begin: [\w-]+ -->(.*?)<!-- end:", results, re.S))
    cell = r"[+−-]\d+\.\d+ \[[+−-]\d+\.\d+, [+−-]\d+\.\d+\] (?:holds|tie|reversed)"
    cells = re.findall(cell, readme)
    assert len(cells) >= 20, f"README's verdict table not found ({len(cells)} cells)"
    missing = [c for c in cells if c.replace("−", "-") not in generated]
    assert not missing, f"README cells that no generated table holds: {missing}"


def test_committed_intervals_are_recomputed_from_the_per_image_files():
    """Every results/*/per_image.npz gives back its results.json: each row's accuracy and 95 %
    interval (utils.bootstrap_interval, as oracle.py's) from the committed 0/1 correctness, no checkpoint needed."""
    import json

    import torch

    import utils

    folders = sorted(path.parent for path in (ROOT / "results").glob("*/per_image.npz"))
    assert folders, "no per-image results committed"
    for folder in folders:
        bits = utils.load_per_image(folder / "per_image.npz")
        rows = [r for r in json.loads((folder / "results.json").read_text())["rows"] if r["top1"] is not None]
        assert rows
        for row in rows[:: max(1, len(rows) // 6)]:          # a few rows of every kind, each file
            for metric in ("top1", "knn"):
                if row.get(metric) is not None:
                    correct = torch.from_numpy(bits[metric, row["method"], row["prior"], row["tokens"]])
                    assert correct.shape[-1] == row["n_images"], (folder.name, row)
                    expected = (row[metric], row[f"{metric}_low"], row[f"{metric}_high"])
                    assert utils.bootstrap_interval(correct, seed=0) == expected, (folder.name, row)


def test_paired_difference_and_its_verdict_known_answers():
    """A paired difference is the bootstrap of per-image differences: 1,000 images, a right
    wherever b is plus 100 more -> +10 points, an interval of about +-1.9 (sqrt(0.1 * 0.9 / n)),
    narrower than two unpaired accuracies'; the verdict words follow the interval."""
    import numpy as np

    index = np.arange(1000)
    b = np.stack([index % 2 == 0, index % 2 == 0])                   # 2 draws, 50 %
    a = (index % 2 == 0) | (index % 10 == 1)                         # 60 %, right wherever b is
    mean, low, high = tables.paired_difference(a, b)
    assert abs(mean - 10.0) < 1e-5 and 2 * 1.6 < high - low < 2 * 2.2 and low > 0
    assert tables.verdict(low, high) == "holds" and tables.paired_difference(b, a)[0] == -mean
    assert tables.verdict(-high, -low) == "reversed" and tables.verdict(-1.0, 2.0) == "tie"
    # only the first min(n_a, n_b) images are compared (a searched row covers the first n)
    assert abs(tables.paired_difference(a[:100], b)[0] - 100 * (a[:100].mean() - b[0, :100].mean())) < 1e-4


def test_diff_recomputes_a_verdict_cell_from_the_committed_files(capsys):
    """`python -m experiments.tables --diff A B` prints the cell of the verdict table; a key that is
    not recorded is refused with a message naming the format."""
    import pytest

    a, b = "cifar10-spot-seed1/top1/prior/isotropic/4", "cifar10-spot-seed1/top1/prior/grid/4"
    mean, low, high, n = tables.difference(a.rsplit("/", 1)[0], b.rsplit("/", 1)[0], 4)
    assert tables.main(["--diff", a, b]) == 0
    assert f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] on {n} images" in capsys.readouterr().out
    cell = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] {tables.verdict(low, high)}"
    assert cell in (ROOT / "RESULTS.md").read_text()                     # the same cell, in the verdicts
    with pytest.raises(SystemExit):
        tables.main(["--diff", a, "cifar10-spot-seed1/top1/prior/nowhere/4"])
    assert "RUN/METRIC/METHOD/PRIOR/TOKENS" in capsys.readouterr().err

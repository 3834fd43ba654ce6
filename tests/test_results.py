"""The reported numbers are the committed ones: every table of RESULTS.md and every markdown table
in results/ is exactly what `python -m experiments.tables` writes from results/*.json(l), and the
README stays a short front page (the full tables live in RESULTS.md)."""
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

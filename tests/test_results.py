"""The reported numbers are the committed ones: every table of RESULTS.md and every markdown table
in results/ is exactly what `python -m experiments.tables` writes from results/*.json(l), the
README stays a short front page (the full tables live in RESULTS.md), and its verdicts are cells
of those tables.

The verdicts are exact paired tests (experiments/stats.py): known answers of McNemar's test, the
exact and random sign-flip tests, the bootstrap and Holm's correction; every committed verdict's
interval agrees with its test; and what cannot be paired or read is refused in one line, exit 2.
"""
import itertools
import json
import re
import shutil

import numpy as np
import pytest
import torch

import utils
from conftest import ROOT
from experiments import stats, tables

README_MAX_LINES = 200


def test_every_table_is_generated_from_the_committed_results():
    stale = tables.stale()[1]
    assert not stale, ("not as `python -m experiments.tables` writes them (run it): "
                       + ", ".join(stale))


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
    """README's verdict table is copied by hand: each cell "a − b [low, high] verdict" must be a
    cell of a table that `python -m experiments.tables` generates into RESULTS.md."""
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "RESULTS.md").read_text()
    generated = "".join(re.findall(r"<!-- begin: [\w-]+ -->(.*?)<!-- end:", results, re.S))
    cell = r"[+−-]\d+\.\d+ \[[+−-]\d+\.\d+, [+−-]\d+\.\d+\] (?:holds|tie|reversed)‡?"
    cells = re.findall(cell, readme)
    assert len(cells) >= 20, f"README's verdict table not found ({len(cells)} cells)"
    missing = [c for c in cells if c.replace("−", "-") not in generated]
    assert not missing, f"README cells that no generated table holds: {missing}"


def test_the_lr_and_cost_sentences_are_what_the_results_record():
    """RESULTS.md: the label oracle runs at the entropy search's lr on both datasets, the lr it
    names; README's Differences: the control's K beside each label-free method is the K its
    comparisons used (results/*-label-free/results.json)."""
    results, readme = ((ROOT / f).read_text() for f in ("RESULTS.md", "README.md"))
    said = re.search(r"The label oracle beside it runs at the same lr,\s+([\d.]+), on both", results)
    assert said, "RESULTS.md's sentence on the label oracle's lr is gone"
    for dataset in ("cifar10", "imagenette"):
        oracle_lr = json.loads((ROOT / f"results/{dataset}-spot/results.json").read_text())
        free = json.loads((ROOT / f"results/{dataset}-label-free/results.json").read_text())
        assert oracle_lr["settings"]["search_lr"] == free["settings"]["search_lr"] == float(said[1])
    said = re.search(r"K = (\d+)\s+beside the placer, (\d+)\s+beside the entropy search", readme)
    assert said, "README's sentence on the control's K is gone"
    for method, k in (("spot-learned", said[1]), ("spot-on-entropy", said[2])):
        used = {c["control_k"] for dataset in ("cifar10", "imagenette")
                for c in json.loads((ROOT / f"results/{dataset}-label-free/results.json")
                                    .read_text())["comparisons"] if c["method"] == method}
        assert used == {int(k)}, (method, used)


def test_committed_intervals_are_recomputed_from_the_per_image_files():
    """Every results/*/per_image.npz gives back its results.json (or frontier.json): each row's
    accuracy and 95 % interval (utils.bootstrap_interval, as oracle.py's) from the committed 0/1
    correctness, no checkpoint needed."""
    folders = sorted(path.parent for path in (ROOT / "results").glob("*/per_image.npz"))
    assert folders, "no per-image results committed"
    for folder in folders:
        bits = utils.load_per_image(folder / "per_image.npz")
        if (folder / "frontier.json").is_file():     # experiments.frontier's: a cell per row
            rows = json.loads((folder / "frontier.json").read_text())["rows"]
            for row in rows[:: max(1, len(rows) // 6)]:
                correct = torch.from_numpy(bits["top1", row["method"], row["budget"]])
                expected = (row["top1"], row["top1_low"], row["top1_high"])
                assert utils.bootstrap_interval(correct, seed=0) == expected, (folder.name, row)
            continue
        rows = [r for r in json.loads((folder / "results.json").read_text())["rows"]
                if r["top1"] is not None]
        assert rows
        for row in rows[:: max(1, len(rows) // 6)]:          # a few rows of every kind, each file
            for metric in ("top1", "knn"):
                if row.get(metric) is not None:
                    key = metric, row["method"], row["prior"], row["tokens"]
                    correct = torch.from_numpy(bits[key])
                    assert correct.shape[-1] == row["n_images"], (folder.name, row)
                    expected = (row[metric], row[f"{metric}_low"], row[f"{metric}_high"])
                    assert utils.bootstrap_interval(correct, seed=0) == expected, (folder.name, row)


def test_paired_difference_and_its_verdict_known_answers():
    """A paired difference is the bootstrap of per-image differences: 1,000 images, a right
    wherever b is plus 100 more -> +10 points, an interval of about +-1.9 (sqrt(0.1 * 0.9 / n)),
    narrower than two unpaired accuracies'; the verdict words of an interval alone."""
    index = np.arange(1000)
    b = np.stack([index % 2 == 0, index % 2 == 0])                   # 2 draws, 50 %
    a = (index % 2 == 0) | (index % 10 == 1)                         # 60 %, right wherever b is
    mean, low, high = tables.paired_difference(a, b)
    assert abs(mean - 10.0) < 1e-5 and 2 * 1.6 < high - low < 2 * 2.2 and low > 0
    assert tables.verdict(low, high) == "holds" and tables.paired_difference(b, a)[0] == -mean
    assert tables.verdict(-high, -low) == "reversed" and tables.verdict(-1.0, 2.0) == "tie"
    # only the first min(n_a, n_b) images are compared (a searched row covers the first n)
    expected = 100 * (a[:100].mean() - b[0, :100].mean())
    assert abs(tables.paired_difference(a[:100], b)[0] - expected) < 1e-4


# -----------------------------------------------------------------------------
# The tests behind the verdicts (experiments/stats.py): known answers

def test_mcnemar_exact_known_answers():
    """McNemar's exact p = 2 P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1: 5 discordant
    images all one way -> 2 / 32; 6 -> 2 / 64; 3 against 9 -> 2 (1 + 12 + 66 + 220) / 4096."""
    assert stats.mcnemar_p(0, 5) == 2 / 32 and stats.mcnemar_p(6, 0) == 2 / 64
    assert stats.mcnemar_p(3, 9) == stats.mcnemar_p(9, 3) == 2 * 299 / 4096
    assert stats.mcnemar_p(7, 7) == 1.0 and stats.mcnemar_p(0, 0) == 1.0
    assert stats.mcnemar_p(2000, 2300) < 1e-5 < stats.mcnemar_p(2000, 2100) < 1   # large n: exact
    # the normal approximation agrees at large n: z = (c - b) / sqrt(b + c)
    z = 100 / np.sqrt(4100)
    assert abs(stats.mcnemar_p(2000, 2100) - float(torch.erfc(torch.tensor(z / 2 ** 0.5)))) < 0.01


def test_exact_sign_flip_is_mcnemar_and_every_flip_counted():
    """The exact sign-flip test sums over all 2^m flips by convolving binomials: on +-1
    differences it is McNemar's test; on a small lattice it equals brute-force enumeration; the
    random-flip test (10,000 flips, seed 0) lands within its Monte Carlo error of it."""
    for b, c in ((3, 9), (100, 130), (0, 5), (7, 7)):
        units = np.array([1] * b + [-1] * c + [0] * 40)
        assert abs(stats.lattice_sign_flip_p(units) - stats.mcnemar_p(b, c)) < 1e-12
    rng = np.random.default_rng(0)
    for _ in range(5):
        units = rng.integers(-2, 3, 12)                         # d in {-1, -0.5, 0, 0.5, 1} x 2
        flips = np.array(list(itertools.product([1, -1], repeat=12)))
        brute = np.mean(np.abs(flips @ units) >= abs(units.sum()))
        assert abs(stats.lattice_sign_flip_p(units) - brute) < 1e-12
        # 12 values: the continuous test enumerates them all too (m <= 13)
        assert abs(stats.random_sign_flip_p(units.astype(float)) - brute) < 1e-12
    units = rng.integers(-2, 3, 300)
    units[:20] = 2                                              # an edge case, p near 0.05
    exact, sampled = stats.lattice_sign_flip_p(units), stats.random_sign_flip_p(units / 2)
    assert abs(exact - sampled) < 4 * np.sqrt(exact * (1 - exact) / stats.FLIPS) + 1e-4
    assert stats.random_sign_flip_p(units / 2) == sampled       # a fixed seed: the same p


def test_bootstrap_interval_is_the_image_bootstrap():
    """Resampling counts of each distinct value is resampling images: the interval of 0/1/2-step
    differences matches drawing images (within the bootstrap's own noise), and is fixed by the
    seed; a continuous d goes through drawn images."""
    rng = np.random.default_rng(1)
    d = rng.integers(-2, 3, 3000) / 2
    low, high = stats.bootstrap_interval(d)
    drawn = np.array([d[rng.integers(0, 3000, 3000)].mean() for _ in range(10_000)])
    assert np.allclose((low, high), np.quantile(drawn, [0.025, 0.975]), atol=0.003)
    assert stats.bootstrap_interval(d) == (low, high)
    half = 1.96 * d.std() / np.sqrt(len(d))                         # the normal approximation
    assert abs((high - low) / 2 - half) < 0.1 * half
    smooth = rng.normal(0.1, 1, 500)
    low, high = stats.bootstrap_interval(smooth)
    assert abs((high - low) / 2 - 1.96 * smooth.std() / np.sqrt(500)) < 0.01


def test_the_test_follows_the_rows_kind_and_the_verdict_the_test():
    """One draw of right/wrong each: McNemar; several draws: the exact sign-flip test; floats:
    random flips. The verdict is the test's: 5 images right where b is wrong is a tie (p =
    0.0625) although the bootstrap interval is [100, 100]: the cell is flagged; 6 holds."""
    a, b = np.ones(5, dtype=bool), np.zeros(5, dtype=bool)
    five = stats.paired(a, b).scaled(100)
    assert five.test == "McNemar exact" and five.p == 0.0625 and five.verdict == "tie"
    assert (five.low, five.high) == (100, 100) and not five.agrees
    assert five.text() == f"+100.0 [+100.0, +100.0] tie{stats.FLAG}"
    six = stats.paired(np.ones(6, dtype=bool), np.zeros(6, dtype=bool))
    assert six.verdict == "holds" and six.agrees and stats.FLAG not in six.text()
    assert stats.paired(np.zeros(6, dtype=bool), np.ones(6, dtype=bool)).verdict == "reversed"
    draws = np.stack([np.ones(6, dtype=bool), np.zeros(6, dtype=bool)])     # 2 draws: d = 0.5
    assert stats.paired(draws, np.zeros(6, dtype=bool)).test == "sign-flip exact"
    assert stats.paired(np.ones(6), np.zeros(6)).test == "sign-flip random"
    with pytest.raises(ValueError):
        stats.paired(a, np.zeros(6, dtype=bool))


def test_holm_known_answers():
    """Holm: the i-th smallest of m p-values times (m - i + 1), the running maximum, capped."""
    assert np.allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([0.02]) == [0.02]


# -----------------------------------------------------------------------------
# The committed verdicts: decided by their tests, intervals that agree, Holm under each table

def committed_cells():
    """Every verdict the committed tables state: (where, stats.Paired)."""
    found = [(f"{name}: {c['claim']} at {c['tokens']} ({c['run']})", c["result"])
             for name, runs in tables.VERDICTS.items() for c in tables.verdict_cells(runs)]
    for path in sorted((ROOT / "results").glob("*/results.json")):
        results = json.loads(path.read_text())
        for c in results.get("comparisons", []):
            tested = tables.comparison_tests(c, path.parent, results["settings"])
            found += [(f"{path.parent.name}: {c['method']} {name} at {c['tokens']}", result)
                      for name, result in tested.items() if result is not None]
    return found


def test_every_committed_verdict_is_its_tests_and_its_interval_agrees():
    """Each committed cell's verdict is its exact test's (p <= 5 %: holds or reversed by the
    sign of the mean), and its 95 % interval agrees: it excludes 0 exactly where the test
    rejects. (Where they disagree, the table flags the cell with stats.FLAG and the verdict stays
    the test's; no committed cell needs that, and this test says which one would.)"""
    cells = committed_cells()
    assert len(cells) > 150
    for where, result in cells:
        significant = result.p <= stats.ALPHA
        assert result.verdict == ("tie" if not significant else
                                  "holds" if result.mean > 0 else "reversed"), where
        assert result.agrees, (f"{where}: the interval {result.low:+.2f}, {result.high:+.2f} "
                               f"and the test (p = {result.p:.3g}) disagree")
    generated = "".join(tables.generate()[1].values())
    assert stats.FLAG not in generated.replace(f"{stats.FLAG} marks", "").replace(
        f"{stats.FLAG}: the interval alone", "")


def test_each_verdict_table_counts_its_family_and_holms_changes():
    """Under each verdict table: its number of comparisons (one family) and the verdicts
    Holm's correction at 5 % would turn into ties, recomputed here."""
    results = (ROOT / "RESULTS.md").read_text()
    for name, runs in tables.VERDICTS.items():
        block = re.search(rf"<!-- begin: {name} -->(.*?)<!-- end:", results, re.S)[1]
        cells = tables.verdict_cells(runs)
        assert f"**{len(cells)} comparisons, one family**" in block
        adjusted = stats.holm([c["result"].p for c in cells])
        lost = [c for c, q in zip(cells, adjusted)
                if c["result"].verdict != "tie" and q > stats.ALPHA]
        significant = sum(c["result"].verdict != "tie" for c in cells)
        assert f"keeps {significant - len(lost)} of them" in block
        for c, q in ((c, q) for c, q in zip(cells, adjusted) if c in lost):
            assert f"{c['tokens']} T (p {c['result'].p:.3g} -> {q:.3g})" in block, c


def test_diff_recomputes_a_verdict_cell_from_the_committed_files(capsys):
    """`python -m experiments.tables --diff A B` prints the cell of the verdict table, with the
    test and its p; a key that is not recorded is refused with a message naming the format.
    (Changed on purpose: difference() now returns a stats.Paired, not a 4-tuple.)"""
    a, b = "cifar10-spot-seed1/top1/prior/isotropic/4", "cifar10-spot-seed1/top1/prior/grid/4"
    found = tables.difference(a.rsplit("/", 1)[0], b.rsplit("/", 1)[0], 4)
    assert tables.main(["--diff", a, b]) == 0
    out = capsys.readouterr().out
    mean, low, high = (stats.signed(x, 3) for x in (found.mean, found.low, found.high))
    assert f"{mean} [{low}, {high}] on {found.n} images" in out
    assert f"sign-flip exact test, p = {found.p:.3g}): {found.verdict}" in out
    assert found.text() in (ROOT / "RESULTS.md").read_text()       # the same cell, in the verdicts
    with pytest.raises(SystemExit):
        tables.main(["--diff", a, "cifar10-spot-seed1/top1/prior/nowhere/4"])
    assert "RUN/METRIC/METHOD/PRIOR/TOKENS" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Refused in one line naming the file or cell, exit 2, no traceback

def refused(capsys, argv):
    """Run main(argv), expect a refusal: exit 2 and one line on stderr -> that line."""
    with pytest.raises(SystemExit) as exit_:
        tables.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("python -m experiments.tables: error: ")
    return err


def fake_run(results, name, n=10, arrays=None, **settings):
    """results/NAME with a results.json (settings: shapes' test split of n images, overridable)
    and a per_image.npz of `arrays` ({key: array}; default: one right/wrong row at 4 tokens)."""
    folder = results / name
    folder.mkdir(parents=True)
    settings = {"dataset": "shapes", "split": "test", "n_test": n, "draws": 1, "run": name,
                "n_searched": n // 2, **settings}
    rows = [{"method": "prior", "prior": "isotropic", "tokens": 4, "top1": 50.0}]
    (folder / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}))
    arrays = arrays or {("top1", "prior", "isotropic", 4): torch.arange(n) % 2 == 0}
    utils.save_per_image(folder / "per_image.npz", arrays)
    return folder


@pytest.fixture
def fake_results(tmp_path, monkeypatch):
    """An empty results/ in tmp_path that experiments.tables reads instead of the committed."""
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "results")
    return tmp_path / "results"


def test_diff_pairs_only_rows_of_the_same_images(fake_results, capsys):
    """Rows of another dataset, split or image count, an array of a length its results.json does
    not record, or two things that are not both right/wrong: refused, naming both cells."""
    fake_run(fake_results, "a")
    fake_run(fake_results, "other-split", split="val")
    fake_run(fake_results, "fewer", n=8)
    fake_run(fake_results, "other-data", dataset="cifar10")
    fake_run(fake_results, "odd", arrays={("top1", "prior", "isotropic", 4): torch.ones(7) > 0})
    fake_run(fake_results, "read", arrays={("saliency-model", "read", "isotropic", 4):
                                           torch.rand(10)})
    cell = "a/top1/prior/isotropic/4"
    assert tables.main(["--diff", cell, cell]) == 0 and "McNemar" in capsys.readouterr().out
    for other in ("other-split", "fewer", "other-data"):
        err = refused(capsys, ["--diff", cell, f"{other}/top1/prior/isotropic/4"])
        assert "are not on the same images" in err and f"{other}/top1/prior/isotropic/4" in err
    err = refused(capsys, ["--diff", cell, "odd/top1/prior/isotropic/4"])
    assert "odd/top1/prior/isotropic/4: 7 images, not a count its results.json records" in err
    err = refused(capsys, ["--diff", cell, "read/saliency-model/read/isotropic/4"])
    assert "measure different things" in err


def test_diff_refuses_malformed_names_and_missing_records(fake_results, capsys):
    fake_run(fake_results, "a")
    assert "'abc' is not a cell name" in refused(capsys, ["--diff", "abc", "def"])
    assert "is not a cell name" in refused(capsys, ["--diff", "a/top1/prior/isotropic",
                                                    "a/top1/prior/isotropic"])
    err = refused(capsys, ["--diff", "a/top1/prior/isotropic/4", "a/top1/prior/isotropic/8"])
    assert "different budgets" in err
    err = refused(capsys, ["--diff", "a/top1/prior/isotropic/4", "nowhere/top1/prior/grid/4"])
    assert "nowhere/per_image.npz does not exist" in err


def test_non_finite_records_are_refused(fake_results, capsys):
    """An all-NaN read (an evaluation that failed) is no difference of 0: refused, by cell."""
    reads = {("saliency-model", "read", name, 4): torch.rand(10) for name in ("x", "y")}
    reads["saliency-model", "read", "y", 4][:] = float("nan")
    fake_run(fake_results, "a", arrays=reads)
    err = refused(capsys, ["--diff", "a/saliency-model/read/x/4", "a/saliency-model/read/y/4"])
    assert "a/saliency-model/read/y/4: 10 of its 10 values are not finite" in err


@pytest.mark.parametrize("damage", ["truncated", "empty", "no arrays"])
def test_unreadable_per_image_files_are_refused(fake_results, capsys, damage):
    path = fake_run(fake_results, "a") / "per_image.npz"
    if damage == "no arrays":
        np.savez(path)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 if damage == "truncated"
                                             else 0])
    err = refused(capsys, ["--diff", "a/top1/prior/isotropic/4", "a/top1/prior/isotropic/4"])
    assert "a/per_image.npz: " in err
    assert ("holds no per-image arrays" if damage == "no arrays" else "cannot be read") in err


@pytest.mark.parametrize("content", ["[]", "{\"settings\": {}, \"rows\": []}", "{not json"])
def test_results_json_of_the_wrong_shape_is_refused(fake_results, tmp_path, capsys, content):
    """By --diff (it reads the settings to pair), and by the writer of FOLDER/results.md."""
    folder = fake_run(fake_results, "a")
    (folder / "results.json").write_text(content)
    err = refused(capsys, ["--diff", "a/top1/prior/isotropic/4", "a/top1/prior/isotropic/4"])
    assert "a/results.json: " in err
    assert "a/results.json: " in refused(capsys, [str(folder)])


# The generator (and --check) refuses the same things in the committed tree: a copy of results/
# (each run a link to the committed one, the runs to damage copied) read instead of results/.

@pytest.fixture
def results_tree(tmp_path, monkeypatch):
    def make(*copied):
        tree = tmp_path / "results"
        tree.mkdir()
        for path in (ROOT / "results").iterdir():
            if path.name in copied:
                shutil.copytree(path, tree / path.name)
            else:
                (tree / path.name).symlink_to(path)
        results_md = tmp_path / "RESULTS.md"
        results_md.write_text((ROOT / "RESULTS.md").read_text())
        monkeypatch.setattr(tables, "RESULTS", tree)
        monkeypatch.setattr(tables, "RESULTS_MD", results_md)
        return tree
    return make


def test_the_generator_refuses_a_truncated_per_image_file(results_tree, capsys):
    path = results_tree("cifar10-spot") / "cifar10-spot" / "per_image.npz"
    path.write_bytes(path.read_bytes()[:1000])
    assert "cifar10-spot/per_image.npz: cannot be read" in refused(capsys, ["--check"])


def test_the_generator_refuses_a_results_json_of_the_wrong_shape(results_tree, capsys):
    path = results_tree("cifar10-retrofit") / "cifar10-retrofit" / "results.json"
    path.write_text(json.dumps({"rows": []}))
    assert "cifar10-retrofit/results.json: not a results.json" in refused(capsys, ["--check"])


def test_the_generator_refuses_rows_it_cannot_pair(results_tree, capsys):
    """A grid ViT evaluated on other images (here: its settings say 5,000) is not paired with
    SPoT's rows on the 10,000 test images."""
    path = results_tree("cifar10-grid-vit") / "cifar10-grid-vit" / "results.json"
    results = json.loads(path.read_text())
    results["settings"]["n_test"] = 5000
    path.write_text(json.dumps(results))
    err = refused(capsys, ["--check"])
    assert "cifar10-grid-vit/top1/prior/grid/4 are not on the same images" in err


def test_the_generator_refuses_non_finite_reads(results_tree, capsys):
    folder = results_tree("cifar10-spot-seed1") / "cifar10-spot-seed1"
    arrays = utils.load_per_image(folder / "per_image.npz")
    arrays["saliency-model", "read", "spot-on", 8] = np.full(2000, np.nan, dtype=np.float16)
    (folder / "per_image.npz").unlink()
    utils.save_per_image(folder / "per_image.npz",
                         {key: torch.from_numpy(values) for key, values in arrays.items()})
    err = refused(capsys, ["--check"])
    assert "cifar10-spot-seed1/saliency-model/read/spot-on/8: 2000 of its 2000 values" in err

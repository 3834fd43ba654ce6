"""
experiments/tables.py -- every results table of the project, generated from the committed
results/.

RESULTS.md reports the experiment of arXiv 2507.01654 (the paper's results table, its findings,
retrofitting, and the open problem: placing tokens without the label) as rerun here. Its prose
is hand-written; its tables are not: each lies between `<!-- begin: NAME -->` and
`<!-- end: NAME -->` and is written by this script from results/*/results.json (oracle.py's and
experiments.label_free's evaluations) and results/*/metrics.jsonl (train.py's runs). The same
run rewrites results/*-table.md and every results/*/results.md, so the markdown in results/ is
never edited by hand either.

    python -m experiments.tables            # rewrite RESULTS.md's tables and results/*.md
    python -m experiments.tables --check    # change nothing; exit 1 naming each table that differs
    python -m experiments.tables runs/x     # write runs/x/results.md from runs/x/results.json
    python -m experiments.tables --diff A B # one verdict cell: a - b, its interval and test

Every verdict ("a > b" holds / tie / reversed) is decided by an exact paired test at 5 %, its
interval is a paired bootstrap of 10,000 resamples (experiments/stats.py says which test and
why); each verdict table is one family, and Holm's correction is printed under it. What cannot be
paired or read (rows of other images, a truncated per_image.npz, a results.json of another shape,
non-finite values, a malformed cell name) is refused in one line naming the file or cell, exit 2.
"""

import argparse
import json
import math
import re
import sys
import zipfile
import zlib
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path

import numpy as np

import utils
from experiments import stats

ROOT = Path(__file__).resolve().parents[1]
RESULTS, RESULTS_MD = ROOT / "results", ROOT / "RESULTS.md"
BLOCK = re.compile(r"(<!-- begin: ([\w-]+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)
# The combined tables of oracle.py's results: per dataset the paper's three models (the grid ViT
# baseline, its retrofit, SPoT from scratch); and the label-free evaluations of both datasets.
COMBINED = {
    "cifar10-table": ["cifar10-grid-vit", "cifar10-retrofit", "cifar10-spot"],
    "imagenette-table": ["imagenette-grid-vit", "imagenette-retrofit", "imagenette-spot"],
    "label-free-table": ["cifar10-label-free", "imagenette-label-free"],
    "cifar10-seed1-table": ["cifar10-grid-vit-seed1", "cifar10-spot-seed1"],
}
# The training tables: train.py's runs, and the sizes of the validation and test splits (for
# the ±).
TRAINING = {
    "shapes-training": (["shapes-default"], 1000, 2000),
    "cifar10-training": (COMBINED["cifar10-table"] + COMBINED["cifar10-seed1-table"], 5000, 10000),
    "imagenette-training": (COMBINED["imagenette-table"], 947, 3925),
}


# -----------------------------------------------------------------------------
# Reading the committed files: what cannot be read is refused in one line naming it

class Refused(Exception):
    """A file or cell this script cannot read or pair; its message is one line naming it, and
    main() prints it and exits with status 2 (no traceback)."""


def shown(path):
    """A path as the messages name it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:                 # UnicodeDecodeError: a ValueError
        raise Refused(f"{shown(path)}: cannot be read as JSON ({one_line(error)})") from None


# what every results.json holds (oracle.py's and experiments.label_free's): settings, and rows
NEEDS = {"settings": {"dataset", "split", "n_test", "draws"},
         "row": {"method", "prior", "tokens", "top1"}}


def load_results(folder):
    """FOLDER/results.json, checked to be of the shape oracle.py writes; else Refused."""
    path = Path(folder) / "results.json"
    results = load_json(path)
    settings = results.get("settings") if isinstance(results, dict) else None
    rows = results.get("rows") if isinstance(results, dict) else None
    if not (isinstance(settings, dict) and NEEDS["settings"] <= settings.keys()
            and isinstance(settings["n_test"], int) and isinstance(rows, list) and rows
            and all(isinstance(r, dict) and NEEDS["row"] <= r.keys() for r in rows)):
        raise Refused(f"{shown(path)}: not a results.json as oracle.py writes it (an object: "
                      f"'settings' with {', '.join(sorted(NEEDS['settings']))}, and 'rows', a "
                      f"non-empty list of objects with {', '.join(sorted(NEEDS['row']))})")
    return results


def read(run, name="results.json"):
    """results/RUN/NAME: a results.json checked (load_results), any other JSON file as is."""
    folder = RESULTS / run
    return load_results(folder) if name == "results.json" else load_json(folder / name)


@contextmanager
def reading(*paths):
    """Inside it, a file that parsed but lacks what a table needs (a missing key, a value of
    another type) is Refused, naming the file(s), instead of a traceback."""
    try:
        yield
    except (OSError, KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        names = ", ".join(shown(path) for path in paths)
        raise Refused(f"{names}: not as oracle.py writes it "
                      f"({type(error).__name__}: {one_line(error)})") from None


def accuracies(metrics, split, budgets, n):
    """'65.4 / 39.8 / 51.3 / 58.4 (±1.3)': top-1 % at the full grid, then at each budget of
    isotropic tokens; ± the binomial 95 % half-interval of the first, 1.96 sqrt(p (1 - p) / n)."""
    keys = [f"{split}_acc"] + [f"{split}_acc@{b}" for b in budgets]
    p = metrics[keys[0]] / 100
    half_interval = 196 * math.sqrt(p * (1 - p) / n)
    return " / ".join(stats.number(metrics[key]) for key in keys) + f" (±{half_interval:.1f})"


def training_table(runs, n_val, n_test):
    """One row per train.py run: epochs and minutes (a retrofit's '+': on top of its grid ViT's),
    then the last epoch's validation accuracies and the test split's, read once after it."""
    lines = []
    for run in runs:
        jsonl = (RESULTS / run / "metrics.jsonl").read_text()
        metrics = [json.loads(line) for line in jsonl.splitlines()]
        last = [m for m in metrics if not m.get("final")][-1]
        final = metrics[-1]                                              # final: the test read
        budgets = [key.split("@")[1] for key in final if "@" in key]   # '4', '8', '16'
        run_json = RESULTS / run / "run.json"
        retrofit = run_json.exists() and read(run, "run.json")["args"]["init_from"]
        plus = "+" if retrofit else ""
        val = accuracies(last, "val", budgets, n_val)
        test = accuracies(final, "test", budgets, n_test)
        lines.append(f"| {run} | {plus}{last['epoch']} | {plus}{last['elapsed_s'] / 60:.0f} | "
                     f"{val} | {test} |")
    tokens = " / ".join(["full grid"] + budgets)
    title = (f"| run | epochs | minutes | validation: {tokens} isotropic tokens "
             f"| test (read once): {tokens} |")
    return "\n".join([title, "|---" * 5 + "|"] + lines) + "\n"


# -----------------------------------------------------------------------------
# Markdown of one results.json (oracle.py's, or experiments.label_free's with its comparisons)

METHOD_LABELS = {
    "prior": "SPoT",
    "best-of-k": "best of K by confidence (label-free control)",
    "oracle-of-k": "oracle of K (the control's ceiling: any of the K right; reads the label)",
    "spot-learned": "SPoT-learned (glance + place, label-free)",
    "spot-on": "SPoT-ON (label oracle)",
    "spot-on-entropy": "SPoT-ON (entropy, label-free)",
    "spot-on-snapped": "SPoT-ON snapped to grid",
    "spot-on-transfer": "SPoT-ON transfer",
}
CELL_TEXT = ("Cell = top-1 % / kNN %, each ± half its 95 % bootstrap interval over images; "
             "\"–\" = not computed, \"n/a\" = not applicable.")
REVERSE = ["",
           "| Model | Tokens | its prior | its own oracle | our oracle positions |",
           "|---" * 5 + "|"]


def line(cells, model=None):
    """'| a | b |'; with model=, a first column naming the run."""
    return "| " + " | ".join(([model] if model else []) + [str(cell) for cell in cells]) + " |"


def header(columns, budgets=()):
    """The two header lines of a table: `columns`, then one column per token budget."""
    rule = "|" + "---|" * (len(columns) + len(budgets))
    return [line(columns + [f"{b} T" for b in budgets]), rule]


def cell(row):
    """'55.9 ±1.0 / 55.5 ±1.0': top-1 / kNN, each ± half its 95 % interval."""
    if row is None or row["top1"] is None:
        return "n/a"

    def text(name):
        if row.get(f"{name}_low") is None:
            return stats.number(row[name])
        return f"{stats.number(row[name])} ±{(row[f'{name}_high'] - row[f'{name}_low']) / 2:.1f}"
    return f"{text('top1')} / " + ("–" if row["knn"] is None else text("knn"))


def table_lines(rows, budgets, model=None):
    """The rows of the results table: the grid row first, then the other priors in their
    command-line order, then the SPoT-ON rows."""
    table = {}
    for r in rows:
        table.setdefault((r["method"], r["prior"], r.get("source")), {})[r["tokens"]] = r

    def order(key):
        return list(METHOD_LABELS).index(key[0]), key[0] == "prior" and key[1] != "grid"
    counts = [r["n_images"] for r in rows if r["n_images"]]
    usual = max(set(counts), key=counts.count, default=None)    # the table's image count
    lines = []
    for key in sorted(table, key=order):     # stable: priors keep their order after grid
        method, prior, source = key
        grid_vit = (method, prior) == ("prior", "grid")
        label = "ViT (patch grid)" if grid_vit else METHOD_LABELS[method]
        label += f" from {utils.run_name(source)}" if source else ""
        fewer = sorted({r["n_images"] for r in table[key].values()} - {usual, None})
        label += f" (first {'/'.join(map(str, fewer))} images)" if fewer else ""
        cells = [cell(table[key].get(b)) for b in budgets]
        lines.append(line([label, prior] + cells, model))
    return lines


def saliency_lines(saliency, budgets, model=None):
    """Finding 3's rows: the mean saliency read per (map, position set) and budget, ± half the
    interval. The map: spectral residual, or the model's own gradient saliency."""

    def kind(r):                # a row that names no map read the spectral residual
        return r.get("saliency", "spectral")

    def text(r):
        return "n/a" if r is None else f"{r['mean']:.2f} ±{(r['high'] - r['low']) / 2:.2f}"
    found = {(kind(r), r["positions"], r["tokens"]): r for r in saliency}
    lines = []
    for map_, name in dict.fromkeys((kind(r), r["positions"]) for r in saliency):
        label = name if "saliency" not in saliency[0] else f"{name}, read on the {map_} map"
        cells = [text(found.get((map_, name, b))) for b in budgets]
        lines.append(line([label] + cells, model))
    return lines


COMPARE_TEXT = ("Each label-free method against the best fixed prior *chosen on the validation "
                "split* and against the best-of-K control at no more K than its cost (at least 2), "
                "image by image on the images it read: the difference in points with its paired "
                "95 % bootstrap interval (10,000 resamples) and the verdict on \"method > it\" "
                "of an exact paired test at 5 %, as in the verdict tables (holds / tie / "
                f"reversed; {stats.FLAG}: the interval alone would say otherwise); gap closed = "
                "the share of the prior -> oracle gap, on the oracle's searched images; cost = "
                "wall time as a multiple of one forward pass at the budget (the control: exactly "
                "K passes).")
COMPARE_HEADER = ["Method", "Tokens", "images", "best prior (val)", "prior %", "method %",
                  "gain (points)", "vs control (K)", "gap closed", "cost"]


def bracket(r, name, scale=1.0, digits=1):
    """'+1.7 [-0.4, +3.8]': r[name] and its 95 % interval r[name_low], r[name_high], times scale."""
    values = (scale * r[name + end] for end in ("", "_low", "_high"))
    return "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}]".format(*values, d=digits)


def judged(r, name):
    """bracket(r, name) and the verdict its interval allows: '+1.7 [-0.4, +3.8] tie' (a preview
    without the per-image files; comparison_tests' verdicts replace it)."""
    return f"{bracket(r, name)} {verdict(r[name + '_low'], r[name + '_high'])}"


def against_folder(folder, settings):
    """The folder of oracle.py's evaluation a label-free evaluation compared with (--against):
    beside `folder` (evaluations lie side by side in results/), else as written, else from the
    repository root; else Refused."""
    against = Path(str(settings.get("against")))
    for found in (Path(folder).parent / against.name, against, ROOT / against):
        if settings.get("against") and (found / "per_image.npz").exists():
            return found
    raise Refused(f"{shown(Path(folder) / 'results.json')}: its 'against' folder "
                  f"({settings.get('against')}), whose per_image.npz holds the priors it is "
                  f"compared with, is not found")


def comparison_tests(c, folder, settings):
    """One comparison record's two verdicts recomputed from the per-image files (the method's and
    the control's in `folder`, the prior's in its against_folder) -> {'gain': stats.Paired,
    'vs_control': stats.Paired or None}; Refused when a row is not recorded."""
    tokens, against = c["tokens"], against_folder(folder, settings)
    method = (folder, ("top1", c["method"], c["prior"], tokens))
    others = {"gain": (against, ("top1", "prior", c["best_prior"], tokens))}
    if c["method"] != "best-of-k":
        others["vs_control"] = (folder, ("top1", "best-of-k", f"K={c['control_k']}", tokens))
    found = {"vs_control": None}
    for name, other in others.items():
        found[name] = paired_rows(method, other)
        if found[name] is None:
            raise Refused(f"{cell_name(method)} against {cell_name(other)}: not recorded in "
                          f"their per_image.npz")
    return found


def comparison_lines(comparisons, rows, model=None, folder=None):
    """One line per record of experiments.label_free.comparison_rows. With the folder of its
    results.json, each verdict is the exact paired test's on the per-image files
    (comparison_tests); without (a preview), the interval the record holds decides."""
    cost = {(r["method"], r["prior"], r["tokens"]): r.get("cost_vs_prior") for r in rows}
    settings = load_results(folder)["settings"] if folder else None

    def times(c):
        return "–" if not c else f"{c:.1f}x" if c < 10 else f"{c:.0f}x"
    lines = []
    for c in comparisons:
        control = c["method"] == "best-of-k"
        label = METHOD_LABELS[c["method"]] + (f", {c['prior']}" if control else "")
        if folder:
            tested = comparison_tests(c, Path(folder), settings)
            gain = tested["gain"].text()
            vs_control = "–" if control else f"{tested['vs_control'].text()} (K={c['control_k']})"
        else:
            gain = judged(c, "gain")
            vs_control = "–" if control else f"{judged(c, 'vs_control')} (K={c['control_k']})"
        gap = "–"
        if "gap_closed" in c:
            gap = f"{bracket(c, 'gap_closed', 100)} % of {c['n_oracle']}"
        its_cost = times(cost.get((c["method"], c["prior"], c["tokens"])))
        lines.append(line([label, c["tokens"], c["n_images"], c["best_prior"],
                           stats.number(c["prior_top1"]), stats.number(c["top1"]), gain,
                           vs_control, gap, its_cost], model))
    return lines


def search_text(s):
    if not s.get("n_searched"):
        return ""
    return (f"SPoT-ON ({s['search_steps']} Adam steps, lr {s['search_lr']}, "
            f"from {s['search_from']}) on the first {s['n_searched']}")


def results_markdown(results, folder=None):
    """One model's results.json -> its results.md: a title and the settings, then body_lines.
    folder: where results.json and per_image.npz lie (the label-free verdicts are tested on it)."""
    s = results["settings"]
    settings = (f"{s['dataset']} {s['split']} split, {s['n_test']} images; "
                f"kNN bank {s['n_bank']} train images (k={s['knn_k']}, T={s['knn_temperature']}). "
                f"{CELL_TEXT} {s['draws']} position draw(s) for random priors.")
    settings += f" {search_text(s)} images." if s.get("n_searched") else ""
    title = f"# SPoT evaluation: {s.get('run') or s['checkpoint']}"
    body = body_lines([results], named=False, folders=[folder])
    return "\n".join([title, "", settings, "", *body]) + "\n"


def combined_markdown(results_list, folders=None):
    """One table for several models on the same data (e.g. the grid ViT, the retrofit and SPoT
    from scratch): a title, each run's settings, then body_lines with a first column naming each
    run. folders: as results_markdown's, one per results."""
    runs = ", ".join(r["settings"]["run"] for r in results_list)
    lines = [f"# SPoT evaluation: {runs}", "", CELL_TEXT, ""]
    for s in (results["settings"] for results in results_list):
        lines.append(f"- **{s['run']}**: {s['dataset']} {s['split']} split, {s['n_test']} images, "
                     f"{s['draws']} position draw(s) per random prior, "
                     f"kNN bank {s['n_bank']} train images"
                     + (f"; {search_text(s)}" if s.get("n_searched") else ""))
    return "\n".join(lines + ["", *body_lines(results_list, named=True, folders=folders)]) + "\n"


def body_lines(results_list, named, folders=None):
    """The tables of one or more results.json: the results table, the reverse transfer, finding 3
    and the label-free comparisons, where they are held; named: a first column naming the run;
    folders: where each lies (None: a preview, see comparison_lines)."""
    folders = folders or [None] * len(results_list)
    budgets = sorted({r["tokens"] for results in results_list for r in results["rows"]})
    runs = [results["settings"].get("run") if named else None for results in results_list]
    first = ["Model"] if named else []
    lines = header(first + ["Method", "Prior"], budgets)
    for run, results in zip(runs, results_list):
        lines += table_lines(results["rows"], budgets, run)
    reverse = [r for results in results_list for r in results.get("transfer_reverse", [])]
    if reverse:
        lines += ["", "Transfer, the other way: oracle positions found with the first model, "
                  "evaluated on the second (top-1 %).", *REVERSE]
        keys = ("top1_prior", "top1_own_oracle", "top1_transfer")
        for r in reverse:
            lines.append(line([utils.run_name(r["model"]), r["tokens"]]
                              + [stats.number(r[key]) for key in keys]))
    with_saliency = [(run, r["saliency"])
                     for run, r in zip(runs, results_list) if r.get("saliency")]
    if with_saliency:
        n_images = sorted({r["n_images"] for _, saliency in with_saliency for r in saliency})
        lines += ["", f"Finding 3: the saliency the tokens read, relative to the image mean "
                  f"(1 = average pixels), on the first {'/'.join(map(str, n_images))} images, "
                  f"± half the 95 % interval.",
                  "", *header(first + ["Positions"], budgets)]
        for run, saliency in with_saliency:
            lines += saliency_lines(saliency, budgets, run)
    with_comparisons = [(run, r, folder) for run, r, folder in zip(runs, results_list, folders)
                        if r.get("comparisons")]
    if with_comparisons:
        lines += ["", COMPARE_TEXT, "", *header(first + COMPARE_HEADER)]
        for run, results, folder in with_comparisons:
            lines += comparison_lines(results["comparisons"], results["rows"], run, folder)
    return lines


# -----------------------------------------------------------------------------
# Verdicts: each finding of the paper as claims "a > b", judged on paired intervals

# The paper's findings as claims "a > b": (finding, the claim, a, b, budgets). a and b are
# RUN/METRIC/METHOD/PRIOR of the per-image files oracle.py writes, {spot}, {grid}, {retrofit}
# naming the runs of one dataset and seed (VERDICTS). Few tokens: 4 and 8 of the 64 cells (the
# paper's 25 of 196); more: 16 on.
ALL_BUDGETS = (4, 8, 16, 32, 64)
CLAIMS = [
    ("1", "SPoT isotropic > grid ViT, patch dropout",
     "{spot}/top1/prior/isotropic", "{grid}/top1/prior/grid", ALL_BUDGETS),
    ("1", "SPoT isotropic > its own grid subsets",
     "{spot}/top1/prior/isotropic", "{spot}/top1/prior/grid", (4, 8, 16, 32)),
    ("2", "few tokens: centre > isotropic",
     "{spot}/top1/prior/center", "{spot}/top1/prior/isotropic", (4, 8)),
    ("2", "more tokens: isotropic > centre",
     "{spot}/top1/prior/isotropic", "{spot}/top1/prior/center", (16, 32, 64)),
    ("3", "oracle reads more spectral saliency than its start",
     "{spot}/saliency-spectral/read/spot-on", "{spot}/saliency-spectral/read/isotropic",
     ALL_BUDGETS),
    ("3", "oracle reads more model saliency than its start",
     "{spot}/saliency-model/read/spot-on", "{spot}/saliency-model/read/isotropic", ALL_BUDGETS),
    ("3", "salient prior (spectral) > isotropic",
     "{spot}/top1/prior/salient", "{spot}/top1/prior/isotropic", ALL_BUDGETS),
    ("3", "salient prior (model) > isotropic",
     "{spot}/top1/prior/salient-model", "{spot}/top1/prior/isotropic", ALL_BUDGETS),
    ("4", "retrofit's oracle positions > SPoT's prior",
     "{spot}/top1/spot-on-transfer/isotropic", "{spot}/top1/prior/isotropic", ALL_BUDGETS),
    ("4", "SPoT's oracle positions > the retrofit's prior, read by the retrofit",
     "{spot}/top1/reverse-transfer/isotropic", "{spot}/top1/reverse-prior/isotropic", ALL_BUDGETS),
    ("snap", "oracle > the oracle snapped to the grid",
     "{spot}/top1/spot-on/isotropic", "{spot}/top1/spot-on-snapped/isotropic", ALL_BUDGETS),
    ("retrofit", "SPoT from scratch > the retrofit",
     "{spot}/top1/prior/isotropic", "{retrofit}/top1/prior/isotropic", ALL_BUDGETS),
]
VERDICTS = {
    "cifar10-verdicts": [
        dict(spot="cifar10-spot", grid="cifar10-grid-vit", retrofit="cifar10-retrofit"),
        dict(spot="cifar10-spot-seed1", grid="cifar10-grid-vit-seed1", retrofit="none"),
    ],
    "imagenette-verdicts": [
        dict(spot="imagenette-spot", grid="imagenette-grid-vit", retrofit="imagenette-retrofit"),
    ],
}
VERDICT_TEXT = ("Each cell: a − b at that budget on the same test images (the searched rows: the "
                "first 2,000), in points (saliency: relative to the image mean), its paired 95 % "
                "bootstrap interval (10,000 resamples of the images), and the verdict on "
                "\"a > b\" of an exact paired test at 5 % (two-sided): **holds** (significant, "
                "a > b), **tie** (not significant), **reversed** (significant, a < b). The test: "
                "McNemar's exact test when both rows are one draw of right/wrong; the exact "
                "sign-flip permutation test when a row averages several position draws; the "
                "sign-flip test on 10,000 random flips (seed 0) for saliency reads "
                f"(experiments/stats.py). {stats.FLAG} marks a verdict its interval alone would "
                "not give (the test decides). Recompute a cell: `python -m experiments.tables "
                "--diff {spot}/top1/prior/isotropic/4 {grid}/top1/prior/grid/4`.")


def per_image_of(folder, cache={}):  # noqa: B006  (a cache on purpose: each file is read once)
    """FOLDER/per_image.npz (utils.load_per_image) -> {key: array}; {} when there is none.
    A file that is there but cannot be read (truncated, empty, not an .npz) is Refused."""
    path = Path(folder) / "per_image.npz"
    if not path.exists():
        return {}
    stat = path.stat()
    if (path, stat.st_mtime_ns, stat.st_size) not in cache:
        try:
            found = utils.load_per_image(path)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
            raise Refused(f"{shown(path)}: cannot be read, truncated or not an .npz "
                          f"({one_line(error)}); rerun the evaluation that wrote it") from None
        if not found:
            raise Refused(f"{shown(path)}: holds no per-image arrays; rerun the evaluation")
        cache[path, stat.st_mtime_ns, stat.st_size] = found
    return cache[path, stat.st_mtime_ns, stat.st_size]


def cell_name(row):
    """(folder, key) -> 'RUN/METRIC/METHOD/PRIOR/TOKENS', as --diff takes it."""
    return "/".join([Path(row[0]).name, *map(str, row[1])])


def record(row):
    """A row's per-image array ((draws, n) or (n,)); None when its file does not record it.
    Refused: an array of another shape, or values that are not finite (NaN or inf)."""
    values = per_image_of(row[0]).get(tuple(row[1]))
    if values is None:
        return None
    if values.ndim not in (1, 2) or values.size == 0:
        raise Refused(f"{cell_name(row)}: per_image.npz holds an array of shape {values.shape}, "
                      f"not (draws, n) or (n,)")
    if values.dtype != bool and not np.isfinite(values.astype(np.float64)).all():
        bad = int((~np.isfinite(values.astype(np.float64))).sum())
        raise Refused(f"{cell_name(row)}: {bad} of its {values.size} values are not finite "
                      f"(NaN or inf); the evaluation that wrote it failed")
    return values


def images_of(row, values):
    """Which images a row read, as far as the files say: per_image.npz records none of it, so
    results.json's settings: (dataset (a folder dataset: with its folder's name), split, test
    images) -> (that, the image counts an array of the run may hold: all its test images, or
    the first n_searched (the searches), or the first saliency_limit (the saliency reads)). A
    'val-' metric (experiments.label_free's) is read on the validation split."""
    s = load_results(row[0])["settings"]
    dataset = s["dataset"] + (f" ({Path(s['data_dir']).name})"
                              if s["dataset"] == "folder" and s.get("data_dir") else "")
    if str(row[1][0]).startswith("val-"):
        return (dataset, "validation", values.shape[-1]), {values.shape[-1]}
    n = s["n_test"]
    return (dataset, s["split"], n), {n, s.get("n_searched"), min(s.get("saliency_limit") or n, n)}


def common_images(a, x, b, y):
    """The number of images two rows are paired on (the first n of each), or Refused: they are
    paired only on the same dataset, split and test images, each array of a length its run
    records (a searched row: the first n_searched), and both right/wrong or the same read."""
    (same_a, counts_a), (same_b, counts_b) = images_of(a, x), images_of(b, y)
    if same_a != same_b:
        describe = "{} {} split, {} images".format
        raise Refused(f"{cell_name(a)} and {cell_name(b)} are not on the same images: "
                      f"{describe(*same_a)} vs {describe(*same_b)} (results.json's settings)")
    for row, values, counts in ((a, x, counts_a), (b, y, counts_b)):
        if values.shape[-1] not in counts:
            raise Refused(f"{cell_name(row)}: {values.shape[-1]} images, not a count its "
                          f"results.json records ({'/'.join(map(str, sorted(counts - {None})))})")
    kinds = {(v.dtype == bool) or str(row[1][0]) for row, v in ((a, x), (b, y))}
    if len(kinds) > 1:
        raise Refused(f"{cell_name(a)} and {cell_name(b)} measure different things "
                      f"({a[1][0]}, {b[1][0]}): a paired test needs two right/wrong rows or "
                      f"two reads of the same saliency")
    return min(x.shape[-1], y.shape[-1])


def paired_rows(a, b, cache={}):  # noqa: B006  (a cache on purpose: each pair is tested once)
    """a, b = (folder, (METRIC, METHOD, PRIOR, TOKENS)) -> stats.Paired of a - b on their common
    images, in the metric's unit (accuracy: points; saliency: relative to the image mean), by
    the test their kind calls for; None when either is not recorded."""
    x, y = record(a), record(b)
    if x is None or y is None:
        return None
    n = common_images(a, x, b, y)
    key = tuple((path.resolve(), path.stat().st_mtime_ns, tuple(row[1]))
                for row in (a, b) for path in [Path(row[0]) / "per_image.npz"])
    if key not in cache:
        scale = 1 if str(a[1][0]).startswith("saliency") else 100
        cache[key] = stats.paired(x[..., :n], y[..., :n]).scaled(scale)
    return cache[key]


def paired_difference(a, b, seed=0):
    """Per-image values of two rows on the same images ((draws, n) or (n,): 0/1 correctness
    averaged over the draws) -> (mean of a - b, low, high) in points: the paired 95 % bootstrap
    of experiments/stats.py (10,000 resamples). Only the first min(n_a, n_b) images are compared
    (the searched rows cover the first 2,000). (experiments.label_free's comparisons.)"""
    a, b = np.asarray(a), np.asarray(b)
    n = min(a.shape[-1], b.shape[-1])
    found = stats.paired(a[..., :n], b[..., :n], seed=seed).scaled(100)
    return found.mean, found.low, found.high


CELL = re.compile(r"([\w.+-]+)/([\w-]+)/([\w.=+-]+)/([\w.=+-]+)")


def row_of(text, tokens):
    """'RUN/METRIC/METHOD/PRIOR' and a budget -> (results/RUN, (METRIC, METHOD, PRIOR, tokens))."""
    match = CELL.fullmatch(text)
    if not match:
        raise Refused(f"{text!r} is not a cell name: RUN/METRIC/METHOD/PRIOR/TOKENS, e.g. "
                      f"cifar10-spot/top1/prior/isotropic/4")
    return RESULTS / match[1], (*match.groups()[1:], tokens)


def difference(a, b, tokens):
    """a, b = 'RUN/METRIC/METHOD/PRIOR' -> stats.Paired of a - b at `tokens`, in the metric's unit
    (saliency: relative to the image mean), or None when either is not recorded."""
    return paired_rows(row_of(a, tokens), row_of(b, tokens))


def verdict(low, high):
    """The verdict an interval alone allows (the label-free previews without per-image files)."""
    return stats.interval_verdict(low, high)


def verdict_cells(runs_list):
    """Each (claim, seed, budget) of one dataset whose rows are recorded -> {finding, claim,
    run (the 'a (b) run' column), tokens, result: stats.Paired, digits}, in table order."""
    cells = []
    for runs in runs_list:
        for finding, claim, a, b, budgets in CLAIMS:
            a, b = a.format(**runs), b.format(**runs)
            run_a, run_b = a.split("/")[0], b.split("/")[0]
            run = run_a if run_a == run_b else f"{run_a} ({run_b})"
            for tokens in budgets:
                result = difference(a, b, tokens)
                if result is not None:
                    cells.append(dict(finding=finding, claim=claim, run=run, tokens=tokens,
                                      result=result, digits=2 if "saliency" in a else 1))
    return cells


def family_text(cells):
    """The lines under a verdict table: how many comparisons it makes and by which test, what
    Holm's correction at 5 % over the table (one family) changes, and the flagged cells.

    Holm: sort the m p-values, multiply the i-th smallest by m - i + 1, keep the running maximum
    (stats.holm); a verdict stays significant when that adjusted p is <= 5 %. It controls the
    chance of even one false "holds"/"reversed" in the table; the verdicts above do not."""
    def where(group):                         # '1 "claim", run: 32 T (0.034 -> 0.27), 64 T (...)'
        (finding, claim, run), members = group
        return (f"finding {finding}, \"{claim}\", {run}: "
                + ", ".join(f"{c['tokens']} T ({text(c)})" for c in members))

    def grouped(chosen):
        return groupby(chosen, lambda c: (c["finding"], c["claim"], c["run"]))
    adjusted = dict(zip(map(id, cells), stats.holm([c["result"].p for c in cells])))
    tests = [c["result"].test for c in cells]
    significant = [c for c in cells if c["result"].verdict != "tie"]
    lost = [c for c in significant if adjusted[id(c)] > stats.ALPHA]
    text = lambda c: f"p {c['result'].p:.3g} -> {adjusted[id(c)]:.3g}"      # noqa: E731
    first = (f"**{len(cells)} comparisons, one family** ("
             + ", ".join(f"{name} {tests.count(name)}" for name in dict.fromkeys(tests))
             + f"); {len(significant)} significant at 5 % (holds or reversed). **Holm's "
             f"correction** at 5 % over the {len(cells)} keeps {len(significant) - len(lost)} of "
             "them")
    first += (": it changes no verdict." if not lost else
              f"; these {len(lost)} would become tie (p -> Holm's adjusted p): "
              + "; ".join(map(where, grouped(lost))) + ".")
    flagged = [c for c in cells if not c["result"].agrees]
    flags = [f"{stats.FLAG} the 95 % interval and the test disagree; the verdict is the test's: "
             + "; ".join(map(where, grouped(flagged))) + "."] if flagged else []
    return [first, *flags]


def verdict_table(runs_list):
    """The verdict block of one dataset: one line per claim of CLAIMS and seed whose files exist,
    then family_text."""
    cells = verdict_cells(runs_list)
    if not cells:
        return "(No per-image results committed yet.)\n"
    lines = header(["finding", "claim: a > b", "a (b) run", "images"], ALL_BUDGETS)
    for (_, claim, run), group in groupby(cells, lambda c: (c["finding"], c["claim"], c["run"])):
        group = {c["tokens"]: c for c in group}
        first = next(iter(group.values()))
        n_images = "/".join(sorted({str(c["result"].n) for c in group.values()}))
        texts = [group[t]["result"].text(group[t]["digits"]) if t in group else ""
                 for t in ALL_BUDGETS]
        lines.append(line([first["finding"], claim, run, n_images] + texts))
    return "\n".join([VERDICT_TEXT.format(**runs_list[0]), "", *lines, "",
                      *family_text(cells)]) + "\n"


# -----------------------------------------------------------------------------
# The label-free frontier: every committed frontier.json (experiments/frontier.py) in one file,
# results/label-free-frontier.json, and one table of it (RESULTS.md's block label-free-frontier)

FRONTIER = "label-free-frontier"
FRONTIER_FIELDS = ("dataset", "method", "budget", "label_free", "compute_tokens", "flops",
                   "top1", "top1_low", "top1_high", "n_images", "prior", "prior_tokens",
                   "prior_top1", "diff", "ci", "p", "test", "verdict")
FRONTIER_TEXT = ("Each row: a method at N tokens per pass against the best fixed prior at no more "
                 "compute (tokens' worth of FLOPs, rounded up to a whole token; the prior chosen "
                 "on validation), on the same test images: method − prior in points, its paired "
                 "95 % interval and the exact paired test's verdict (McNemar's). Ceilings read "
                 "the label. Made from {sources}.")


def normal(p):
    """A p-value, at least the smallest normal float: below it a float is denormal, and a process
    that flushes denormals to zero (train.py sets it, for Adam's speed) reads 5e-315 as 0, so
    the file would depend on what ran before. None stays None."""
    return None if p is None else max(p, sys.float_info.min)


def frontier_file(runs):
    """The frontier.json of each of results/RUN -> results/label-free-frontier.json's content:
    the sources, each run's frontier (the best prior per token count: the curve to rise above)
    and one row per (run, method, budget) with the run, its split and the fields the goal is
    judged by (FRONTIER_FIELDS). Refused when a file lacks one."""
    rows, curves = [], {}
    for run in runs:
        path = RESULTS / run / "frontier.json"
        found = load_json(path)
        with reading(path):
            split = found["settings"]["split"]
            rows += [{"run": run, "split": split, **{key: row[key] for key in FRONTIER_FIELDS},
                      "p": normal(row["p"])} for row in found["rows"]]
            curves[run] = [{key: point[key] for key in ("tokens", "prior", "compute_tokens",
                                                         "top1", "top1_low", "top1_high")}
                           for point in found["frontier"]]
    return {"sources": [f"results/{run}/frontier.json" for run in runs], "frontiers": curves,
            "rows": rows}


def frontier_table(combined):
    """label-free-frontier.json's content -> the markdown table of every row."""
    sources = ", ".join(f"`{source}`" for source in combined["sources"])
    lines = [FRONTIER_TEXT.format(sources=sources), "",
             *header(["dataset", "method", "N", "compute", "top-1 %", "best prior (N)",
                      "its top-1 %", "method − prior [95 %] verdict"])]
    for r in combined["rows"]:
        method = r["method"] + ("" if r["label_free"] else " (ceiling)")
        versus = ["none costs as little", "", ""] if r["prior"] is None else [
            f"{r['prior']} ({r['prior_tokens']})", stats.number(r["prior_top1"]),
            f"{stats.signed(r['diff'], 1)} [{stats.signed(r['ci'][0], 1)}, "
            f"{stats.signed(r['ci'][1], 1)}] {r['verdict']}"]
        lines.append(line([r["dataset"], method, r["budget"], f"{r['compute_tokens']:.1f}",
                           stats.number(r["top1"]), *versus]))
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# RESULTS.md and results/: every table, from the committed files

def generate():
    """-> ({path: the text this script writes there}, {RESULTS.md's block name: its markdown}).
    Refused (one line naming the file) when a committed file cannot be read or paired."""
    tables, files, blocks = {}, {}, {}
    for name, runs in COMBINED.items():
        folders = [RESULTS / run for run in runs]
        with reading(*(folder / "results.json" for folder in folders)):
            tables[name] = combined_markdown(list(map(read, runs)), folders)
        files[RESULTS / f"{name}.md"] = tables[name]
    # each results.json as oracle.py (or experiments.label_free evaluate) wrote it
    for path in sorted(RESULTS.glob("*/results.json")):
        with reading(path):
            files[path.with_suffix(".md")] = results_markdown(read(path.parent.name), path.parent)
    blocks = {name: text.split("\n\n", 1)[1] for name, text in tables.items()}  # minus the title
    for name, (runs, n_val, n_test) in TRAINING.items():
        with reading(*(RESULTS / run / "metrics.jsonl" for run in runs)):
            blocks[name] = training_table(runs, n_val, n_test)
    blocks |= {name: verdict_table(runs) for name, runs in VERDICTS.items()}
    runs = sorted(path.parent.name for path in RESULTS.glob("*/frontier.json"))
    if runs:                       # the label-free frontier, once a frontier.json is committed
        combined = frontier_file(runs)
        files[RESULTS / f"{FRONTIER}.json"] = json.dumps(combined, indent=2) + "\n"
        blocks[FRONTIER] = frontier_table(combined)
    blocks = {name: f"\n{text}\n" for name, text in blocks.items()}   # a blank line either side

    def fill(match):      # a block this script writes, or the text the block holds now
        return match[1] + blocks.get(match[2], match[3]) + match[4]
    files[RESULTS_MD] = BLOCK.sub(fill, RESULTS_MD.read_text())
    return files, blocks


def stale():
    """-> ({path: text} of each file not as generated, [what differs: RESULTS.md's blocks by
    name, files])."""
    files, blocks = generate()
    found = {m[2]: m[3] for m in BLOCK.finditer(RESULTS_MD.read_text())}
    files = {path: text for path, text in files.items()
             if not path.exists() or path.read_text() != text}
    differ = [f"RESULTS.md: block {name}" for name in blocks if found.get(name) != blocks[name]]
    return files, differ + [shown(path) for path in files if path != RESULTS_MD]


DIFF_CELL = re.compile(CELL.pattern + r"/(\d+)")


def diff(a, b):
    """--diff A B: the verdict cell of a - b, as one line; Refused what cannot be paired."""
    for text in (a, b):
        if not DIFF_CELL.fullmatch(text):
            raise Refused(f"--diff: {text!r} is not a cell name: RUN/METRIC/METHOD/PRIOR/TOKENS, "
                          f"e.g. cifar10-spot/top1/prior/isotropic/4")
    (a_row, tokens), (b_row, other) = (text.rsplit("/", 1) for text in (a, b))
    if tokens != other:
        raise Refused(f"--diff: {a} and {b} are at different budgets ({tokens}, {other} tokens)")
    for text, row in ((a, row_of(a_row, int(tokens))), (b, row_of(b_row, int(tokens)))):
        path = row[0] / "per_image.npz"
        if not path.exists():
            raise Refused(f"--diff: {text}: {shown(path)} does not exist")
        if record(row) is None:
            raise Refused(f"--diff: {text} is not recorded in {shown(path)} "
                          f"(RUN/METRIC/METHOD/PRIOR/TOKENS; the file's names are its keys)")
    found = difference(a_row, b_row, int(tokens))
    note = "" if found.agrees else (
        f" (the 95 % interval alone: {stats.interval_verdict(found.low, found.high)})")
    mean, low, high = (stats.signed(x, 3) for x in (found.mean, found.low, found.high))
    return (f"{a} - {b}: {mean} [{low}, {high}] on {found.n} "
            f"images (paired 95 % bootstrap, {stats.RESAMPLES:,} resamples; {found.test} test, "
            f"p = {found.p:.3g}): {found.verdict}{note}")


def write_tables(check):
    """Rewrite every generated table (or, with check, name those that differ: exit 1)."""
    files, names = stale()
    if check:
        differ = [f"{name}: differs from what python -m experiments.tables writes"
                  for name in names]
        print("\n".join(differ) or "every table is as python -m experiments.tables writes it")
        return 1 if names else 0
    for path, text in files.items():
        utils.write_atomic(path, text)
        print(f"wrote {shown(path)}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.tables",
        description="Write RESULTS.md's tables and results/*.md from results/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each table that differs")
    parser.add_argument("folders", nargs="*",
                        help="write FOLDER/results.md from FOLDER/results.json instead")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"),
                        help="print a - b with its paired 95 %% interval and the exact test's "
                        "verdict on a > b; A, B = RUN/METRIC/METHOD/PRIOR/TOKENS of "
                        "results/RUN/per_image.npz, e.g. cifar10-spot/top1/prior/isotropic/4 "
                        "(METRIC: top1, knn, saliency-spectral, saliency-model)")
    args = parser.parse_args(argv)
    try:
        if args.diff:
            print(diff(*args.diff))
            return 0
        for folder in map(Path, args.folders):
            with reading(folder / "results.json"):
                text = results_markdown(load_results(folder), folder)
            utils.write_atomic(folder / "results.md", text)
            print(f"wrote {folder / 'results.md'}")
        return 0 if args.folders else write_tables(args.check)
    except Refused as refused:                 # one line naming the file or cell, no traceback
        parser.exit(2, f"{parser.prog}: error: {refused}\n")


if __name__ == "__main__":
    raise SystemExit(main())

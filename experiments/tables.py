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
"""

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

import utils

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


def read(run, name="results.json"):
    return json.loads((RESULTS / run / name).read_text())


def accuracies(metrics, split, budgets, n):
    """'65.4 / 39.8 / 51.3 / 58.4 (±1.3)': top-1 % at the full grid, then at each budget of
    isotropic tokens; ± the binomial 95 % half-interval of the first, 1.96 sqrt(p (1 - p) / n)."""
    keys = [f"{split}_acc"] + [f"{split}_acc@{b}" for b in budgets]
    p = metrics[keys[0]] / 100
    half_interval = 196 * math.sqrt(p * (1 - p) / n)
    return " / ".join(f"{metrics[key]:.1f}" for key in keys) + f" (±{half_interval:.1f})"


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
            return f"{row[name]:.1f}"
        return f"{row[name]:.1f} ±{(row[f'{name}_high'] - row[f'{name}_low']) / 2:.1f}"
    return f"{text('top1')} / " + ("–" if row["knn"] is None else text("knn"))


def table_lines(rows, budgets, model=None):
    """The rows of the results table: the grid row first, then the other priors in their
    command-line order, then the SPoT-ON rows."""
    table = {}
    for r in rows:
        table.setdefault((r["method"], r["prior"], r.get("source")), {})[r["tokens"]] = r

    def order(key):
        return list(METHOD_LABELS).index(key[0]), key[0] == "prior" and key[1] != "grid"
    lines = []
    for key in sorted(table, key=order):     # stable: priors keep their order after grid
        method, prior, source = key
        grid_vit = (method, prior) == ("prior", "grid")
        label = "ViT (patch grid)" if grid_vit else METHOD_LABELS[method]
        label += f" from {utils.run_name(source)}" if source else ""
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
                '95 % bootstrap interval and the verdict on "method > it" (holds / tie / '
                "reversed); gap closed = the share of the prior -> oracle gap, on the oracle's "
                "searched images; cost = wall time as a multiple of one forward pass at the budget "
                "(the control: exactly K passes).")
COMPARE_HEADER = ["Method", "Tokens", "images", "best prior (val)", "prior %", "method %",
                  "gain (points)", "vs control (K)", "gap closed", "cost"]


def bracket(r, name, scale=1.0, digits=1):
    """'+1.7 [-0.4, +3.8]': r[name] and its 95 % interval r[name_low], r[name_high], times scale."""
    values = (scale * r[name + end] for end in ("", "_low", "_high"))
    return "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}]".format(*values, d=digits)


def judged(r, name):
    """bracket(r, name) and the verdict its interval allows: '+1.7 [-0.4, +3.8] tie'."""
    return f"{bracket(r, name)} {verdict(r[name + '_low'], r[name + '_high'])}"


def comparison_lines(comparisons, rows, model=None):
    """One line per record of experiments.label_free.comparison_rows."""
    cost = {(r["method"], r["prior"], r["tokens"]): r.get("cost_vs_prior") for r in rows}

    def times(c):
        return "–" if not c else f"{c:.1f}x" if c < 10 else f"{c:.0f}x"
    lines = []
    for c in comparisons:
        control = c["method"] == "best-of-k"
        label = METHOD_LABELS[c["method"]] + (f", {c['prior']}" if control else "")
        vs_control = "–" if control else f"{judged(c, 'vs_control')} (K={c['control_k']})"
        gap = "–"
        if "gap_closed" in c:
            gap = f"{bracket(c, 'gap_closed', 100)} % of {c['n_oracle']}"
        its_cost = times(cost.get((c["method"], c["prior"], c["tokens"])))
        lines.append(line([label, c["tokens"], c["n_images"], c["best_prior"],
                           f"{c['prior_top1']:.1f}", f"{c['top1']:.1f}", judged(c, "gain"),
                           vs_control, gap, its_cost], model))
    return lines


def search_text(s):
    if not s.get("n_searched"):
        return ""
    return (f"SPoT-ON ({s['search_steps']} Adam steps, lr {s['search_lr']}, "
            f"from {s['search_from']}) on the first {s['n_searched']}")


def results_markdown(results):
    """One model's results.json -> its results.md: a title and the settings, then body_lines."""
    s = results["settings"]
    settings = (f"{s['dataset']} {s['split']} split, {s['n_test']} images; "
                f"kNN bank {s['n_bank']} train images (k={s['knn_k']}, T={s['knn_temperature']}). "
                f"{CELL_TEXT} {s['draws']} position draw(s) for random priors.")
    settings += f" {search_text(s)} images." if s.get("n_searched") else ""
    title = f"# SPoT evaluation: {s.get('run') or s['checkpoint']}"
    return "\n".join([title, "", settings, "", *body_lines([results], named=False)]) + "\n"


def combined_markdown(results_list):
    """One table for several models on the same data (e.g. the grid ViT, the retrofit and SPoT
    from scratch): a title, each run's settings, then body_lines with a first column naming each
    run."""
    runs = ", ".join(r["settings"]["run"] for r in results_list)
    lines = [f"# SPoT evaluation: {runs}", "", CELL_TEXT, ""]
    for s in (results["settings"] for results in results_list):
        lines.append(f"- **{s['run']}**: {s['dataset']} {s['split']} split, {s['n_test']} images, "
                     f"{s['draws']} position draw(s) per random prior, "
                     f"kNN bank {s['n_bank']} train images"
                     + (f"; {search_text(s)}" if s.get("n_searched") else ""))
    return "\n".join(lines + ["", *body_lines(results_list, named=True)]) + "\n"


def body_lines(results_list, named):
    """The tables of one or more results.json: the results table, the reverse transfer, finding 3
    and the label-free comparisons, where they are held; named: a first column naming the run."""
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
                              + [f"{r[key]:.1f}" for key in keys]))
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
    with_comparisons = [(run, r) for run, r in zip(runs, results_list) if r.get("comparisons")]
    if with_comparisons:
        lines += ["", COMPARE_TEXT, "", *header(first + COMPARE_HEADER)]
        for run, results in with_comparisons:
            lines += comparison_lines(results["comparisons"], results["rows"], run)
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
                "first 2,000), with its paired 95 % bootstrap interval (saliency: relative to the "
                "image mean; accuracy: points), and the verdict on \"a > b\" it allows: **holds** "
                "(the interval is above 0), **tie** (it holds 0), **reversed** (below 0). "
                "Recompute a cell: `python -m experiments.tables --diff "
                "{spot}/top1/prior/isotropic/4 {grid}/top1/prior/grid/4`.")


def per_image_of(run, cache={}):  # noqa: B006  (a cache on purpose: each file is read once)
    """results/RUN/per_image.npz (utils.load_per_image) -> {key: array}; {} when there is none."""
    if run not in cache:
        path = RESULTS / str(run) / "per_image.npz"
        cache[run] = utils.load_per_image(path) if path.exists() else {}
    return cache[run]


def paired_difference(a, b, seed=0):
    """Per-image values of two rows on the same images ((draws, n) or (n,): 0/1 correctness
    averaged over the draws, or saliency reads) -> (mean of a - b, low, high) in points (x 100):
    the paired 95 % percentile bootstrap, utils.bootstrap_interval of the per-image differences.
    Only the first min(n_a, n_b) images are compared (the searched rows cover the first 2,000)."""
    a, b = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (a, b))
    a, b = (x.reshape(-1, x.shape[-1]).mean(0) for x in (a, b))
    n = min(len(a), len(b))
    return utils.bootstrap_interval(a[:n] - b[:n], seed=seed)


def difference(a, b, tokens):
    """a, b = 'RUN/METRIC/METHOD/PRIOR' -> (mean, low, high, n images) of a - b at `tokens`, in the
    metric's unit (saliency: relative to the image mean); None when either is not recorded."""
    (run_a, *key_a), (run_b, *key_b) = a.split("/"), b.split("/")
    x, y = per_image_of(run_a).get((*key_a, tokens)), per_image_of(run_b).get((*key_b, tokens))
    if x is None or y is None:
        return None
    scale = 0.01 if key_a[0].startswith("saliency") else 1
    return (*(scale * value for value in paired_difference(x, y)), min(x.shape[-1], y.shape[-1]))


def verdict(low, high):
    return "holds" if low > 0 else "reversed" if high < 0 else "tie"


def verdict_table(runs_list):
    """The verdict block of one dataset: one line per claim of CLAIMS and seed whose files exist."""
    lines = header(["finding", "claim: a > b", "a (b) run", "images"], ALL_BUDGETS)
    claims = ((runs, claim) for runs in runs_list for claim in CLAIMS)
    for runs, (finding, claim, a, b, budgets) in claims:
        a, b = a.format(**runs), b.format(**runs)
        found = {t: difference(a, b, t) for t in budgets}
        if not any(found.values()):
            continue
        digits = 2 if "saliency" in a else 1
        form = "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}] {}"
        cells = ["" if found.get(t) is None
                 else form.format(*found[t][:3], verdict(*found[t][1:3]), d=digits)
                 for t in ALL_BUDGETS]
        run_a, run_b = a.split("/")[0], b.split("/")[0]
        run_column = run_a if run_a == run_b else f"{run_a} ({run_b})"
        n_images = "/".join(sorted({str(f[3]) for f in found.values() if f}))
        lines.append(line([finding, claim, run_column, n_images] + cells))
    if not lines[2:]:
        return "(No per-image results committed yet.)\n"
    return "\n".join([VERDICT_TEXT.format(**runs_list[0]), "", *lines]) + "\n"


# -----------------------------------------------------------------------------
# RESULTS.md and results/: every table, from the committed files

def generate():
    """-> ({path: the text this script writes there}, {RESULTS.md's block name: its markdown})."""
    tables = {name: combined_markdown(list(map(read, runs))) for name, runs in COMBINED.items()}
    files = {RESULTS / f"{name}.md": text for name, text in tables.items()}
    # each results.json as oracle.py (or experiments.label_free evaluate) wrote it
    for path in sorted(RESULTS.glob("*/results.json")):
        files[path.with_suffix(".md")] = results_markdown(read(path.parent.name))
    blocks = {name: text.split("\n\n", 1)[1] for name, text in tables.items()}  # minus the title
    blocks |= {name: training_table(*spec) for name, spec in TRAINING.items()}
    blocks |= {name: verdict_table(runs) for name, runs in VERDICTS.items()}
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
    return files, differ + [str(path.relative_to(ROOT)) for path in files if path != RESULTS_MD]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write RESULTS.md's tables and results/*.md from results/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each table that differs")
    parser.add_argument("folders", nargs="*",
                        help="write FOLDER/results.md from FOLDER/results.json instead")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"),
                        help="print a - b with its paired 95 %% interval; A, B = "
                        "RUN/METRIC/METHOD/PRIOR/TOKENS of results/RUN/per_image.npz, e.g. "
                        "cifar10-spot/top1/prior/isotropic/4 (METRIC: top1, knn, "
                        "saliency-spectral, saliency-model)")
    args = parser.parse_args(argv)
    if args.diff:
        (a, tokens), (b, other) = (x.rsplit("/", 1) for x in args.diff)
        found = tokens == other and tokens.isdigit() and difference(a, b, int(tokens))
        if not found:
            parser.error(f"--diff: no per-image record for {args.diff[0]} and {args.diff[1]} "
                         f"(RUN/METRIC/METHOD/PRIOR/TOKENS, the same TOKENS; "
                         f"results/RUN/per_image.npz lists the keys)")
        mean, low, high, n_images = found
        print(f"{args.diff[0]} - {args.diff[1]}: {mean:+.3f} [{low:+.3f}, {high:+.3f}] "
              f"on {n_images} images (paired 95 % bootstrap): {verdict(low, high)}")
        return 0
    for folder in map(Path, args.folders):
        results = json.loads((folder / "results.json").read_text())
        utils.write_atomic(folder / "results.md", results_markdown(results))
        print(f"wrote {folder / 'results.md'}")
    if args.folders:
        return 0
    check, (files, names) = args.check, stale()
    if check:
        differ = [f"{name}: differs from what python -m experiments.tables writes"
                  for name in names]
        print("\n".join(differ) or "every table is as python -m experiments.tables writes it")
        return 1 if names else 0
    for path, text in files.items():
        utils.write_atomic(path, text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""experiments/tables.py -- every results table of the project, generated from the committed results/.

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

import oracle
import utils

ROOT = Path(__file__).resolve().parents[1]
RESULTS, RESULTS_MD = ROOT / "results", ROOT / "RESULTS.md"
BLOCK = re.compile(r"(<!-- begin: ([\w-]+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)
# The combined tables of oracle.py's results: per dataset the paper's three models (the grid ViT
# baseline, its retrofit, SPoT from scratch); and the label-free evaluations of both datasets.
COMBINED = {"cifar10-table": ["cifar10-grid-vit", "cifar10-retrofit", "cifar10-spot"],
            "imagenette-table": ["imagenette-grid-vit", "imagenette-retrofit", "imagenette-spot"],
            "label-free-table": ["cifar10-label-free", "imagenette-label-free"]}
# The training tables: train.py's runs, and the sizes of the validation and test splits (for the ±).
TRAINING = {"shapes-training": (["shapes-default"], 1000, 2000),
            "cifar10-training": (COMBINED["cifar10-table"], 5000, 10000),
            "imagenette-training": (COMBINED["imagenette-table"], 947, 3925)}


def read(run, name="results.json"):
    return json.loads((RESULTS / run / name).read_text())


def accuracies(metrics, split, budgets, n):
    """'65.4 / 39.8 / 51.3 / 58.4 (±1.3)': top-1 % at the full grid, then at each budget of
    isotropic tokens; ± the binomial 95 % half-interval of the first, 1.96 sqrt(p (1 - p) / n)."""
    keys = [f"{split}_acc"] + [f"{split}_acc@{b}" for b in budgets]
    p = metrics[keys[0]] / 100
    return " / ".join(f"{metrics[key]:.1f}" for key in keys) + f" (±{196 * math.sqrt(p * (1 - p) / n):.1f})"


def training_table(runs, n_val, n_test):
    """One row per train.py run: epochs and minutes (a retrofit's '+': on top of its grid ViT's),
    then the last epoch's validation accuracies and the test split's, read once after it."""
    lines = []
    for run in runs:
        metrics = [json.loads(line) for line in (RESULTS / run / "metrics.jsonl").read_text().splitlines()]
        last, final = [m for m in metrics if not m.get("final")][-1], metrics[-1]    # final: the test read
        budgets = [key.split("@")[1] for key in final if "@" in key]                 # '4', '8', '16'
        plus = "+" if (RESULTS / run / "run.json").exists() and read(run, "run.json")["args"]["init_from"] else ""
        lines.append(f"| {run} | {plus}{last['epoch']} | {plus}{last['elapsed_s'] / 60:.0f} | "
                     f"{accuracies(last, 'val', budgets, n_val)} | {accuracies(final, 'test', budgets, n_test)} |")
    tokens = " / ".join(["full grid"] + budgets)
    return "\n".join([f"| run | epochs | minutes | validation: {tokens} isotropic tokens | test (read once): "
                      f"{tokens} |", "|---" * 5 + "|"] + lines) + "\n"



# -----------------------------------------------------------------------------
# Markdown of one results.json (oracle.py's, or experiments.label_free's with its gap rows)

METHOD_LABELS = {"prior": "SPoT", "spot-learned": "SPoT-learned (glance + place, label-free)",
                 "spot-on": "SPoT-ON (label oracle)", "spot-on-entropy": "SPoT-ON (entropy, label-free)",
                 "spot-on-snapped": "SPoT-ON snapped to grid", "spot-on-transfer": "SPoT-ON transfer"}
CELL_TEXT = ("Cell = top-1 % / kNN %, each ± half its 95 % bootstrap interval over images; \"–\" "
             "= not computed, \"n/a\" = not applicable.")
REVERSE = ["", "| Model | Tokens | its prior | its own oracle | our oracle positions |", "|---" * 5 + "|"]
GAP_TEXT = ("Label-free placement against the best fixed prior (the open problem: closing the gap to "
            "the oracle without labels), on the searched images: the gain in points and the fraction "
            "of the prior -> oracle gap it closes, each with its paired 95 % bootstrap interval; cost = "
            "wall time as a multiple of one forward pass at the budget.")
GAP_HEADER = ["Method", "Tokens", "best prior", "gain (points)", "gap closed", "cost"]


def line(cells, model=None):
    """'| a | b |'; with model=, a first column naming the run."""
    return "| " + " | ".join(([model] if model else []) + [str(cell) for cell in cells]) + " |"


def header(columns, budgets=()):
    """The two header lines of a table: `columns`, then one column per token budget."""
    return [line(columns + [f"{b} T" for b in budgets]), "|" + "---|" * (len(columns) + len(budgets))]


def cell(row):
    """'55.9 ±1.0 / 55.5 ±1.0': top-1 / kNN, each ± half its 95 % interval."""
    if row is None or row["top1"] is None:
        return "n/a"
    text = lambda name: (f"{row[name]:.1f} ±{(row[f'{name}_high'] - row[f'{name}_low']) / 2:.1f}"  # noqa: E731
                         if row.get(f"{name}_low") is not None else f"{row[name]:.1f}")
    return f"{text('top1')} / " + ("–" if row["knn"] is None else text("knn"))


def table_lines(rows, budgets, model=None):
    """The rows of the results table: the grid row first, then the other priors in their
    command-line order, then the SPoT-ON rows."""
    table = {}
    for r in rows:
        table.setdefault((r["method"], r["prior"], r.get("source")), {})[r["tokens"]] = r
    order = lambda key: (list(METHOD_LABELS).index(key[0]), key[0] == "prior" and key[1] != "grid")  # noqa: E731
    lines = []
    for method, prior, source in sorted(table, key=order):   # stable: priors keep their order after grid
        label = "ViT (patch grid)" if (method, prior) == ("prior", "grid") else METHOD_LABELS[method]
        label += f" from {oracle.run_name(source)}" if source else ""
        lines.append(line([label, prior] + [cell(table[method, prior, source].get(b)) for b in budgets], model))
    return lines


def saliency_lines(saliency, budgets, model=None):
    """Finding 3's rows: the mean saliency read per position set and budget, ± half the interval."""
    found = {(r["positions"], r["tokens"]): r for r in saliency}
    text = lambda r: "n/a" if r is None else f"{r['mean']:.2f} ±{(r['high'] - r['low']) / 2:.2f}"  # noqa: E731
    return [line([name] + [text(found.get((name, b))) for b in budgets], model)
            for name in dict.fromkeys(r["positions"] for r in saliency)]


def reverse_lines(reverse):
    return [line([oracle.run_name(r["model"]), r["tokens"]] + [f"{r[key]:.1f}" for key in
                 ("top1_prior", "top1_own_oracle", "top1_transfer")]) for r in reverse]


def gap_lines(gap, rows, model=None):
    """One line per (label-free method, budget) of experiments.label_free.gap_rows; the cost is
    cost_vs_prior of the method's row: 1.34 -> '1.3x', 38.2 -> '38x'."""
    cost = {(r["method"], r["tokens"]): r.get("cost_vs_prior") for r in rows}
    times = lambda c: "–" if not c else f"{c:.1f}x" if c < 10 else f"{c:.0f}x"  # noqa: E731
    return [line([METHOD_LABELS[g["method"]], g["tokens"], g["best_prior"],
                  f"{g['gain']:+.1f} [{g['gain_low']:+.1f}, {g['gain_high']:+.1f}]",
                  f"{100 * g['gap_closed']:.1f} % [{100 * g['gap_closed_low']:.1f}, {100 * g['gap_closed_high']:.1f}]",
                  times(cost.get((g["method"], g["tokens"])))], model) for g in gap]


def search_text(s):
    return (f"SPoT-ON ({s['search_steps']} Adam steps, lr {s['search_lr']}, from {s['search_from']}) on the "
            f"first {s['n_searched']}" if s.get("n_searched") else "")


def results_markdown(results):
    """One model's results.json -> its results.md: the results table, then the reverse transfer,
    finding 3 and the label-free gap, where the results hold them."""
    s, budgets, saliency, gap = results["settings"], results["settings"]["tokens"], results.get("saliency"), \
        results.get("gap_closed")
    lines = [f"# SPoT evaluation: {s.get('run') or s['checkpoint']}", "",
             f"{s['dataset']} {s['split']} split, {s['n_test']} images; kNN bank {s['n_bank']} train images (k="
             f"{s['knn_k']}, T={s['knn_temperature']}). {CELL_TEXT} {s['draws']} position draw(s) for random "
             f"priors." + (f" {search_text(s)} images." if s.get("n_searched") else ""), ""]
    lines += header(["Method", "Prior"], budgets) + table_lines(results["rows"], budgets)
    if results.get("transfer_reverse"):
        lines += ["", "Transfer, the other way: positions found with this model, evaluated on the transfer model "
                  "(top-1 %).", *REVERSE, *reverse_lines(results["transfer_reverse"])]
    if saliency:
        lines += ["", f"Finding 3: the saliency the tokens read, relative to the image mean (1 = average "
                  f"pixels), on the first {saliency[0]['n_images']} images, ± half the 95 % interval.", ""]
        lines += header(["Positions"], budgets) + saliency_lines(saliency, budgets)
    if gap:
        lines += ["", f"{GAP_TEXT} Searched images: {gap[0]['n_images']}.", "", *header(GAP_HEADER)]
        lines += gap_lines(gap, results["rows"])
    return "\n".join(lines) + "\n"


def combined_markdown(results_list):
    """One table for several models on the same data (e.g. the grid ViT, the retrofit and SPoT
    from scratch), a first column naming each run; then their reverse transfer, finding 3, gap."""
    budgets = sorted({r["tokens"] for results in results_list for r in results["rows"]})
    runs = [results["settings"]["run"] for results in results_list]
    lines = [f"# SPoT evaluation: {', '.join(runs)}", "", CELL_TEXT, ""]
    for s in (results["settings"] for results in results_list):
        lines.append(f"- **{s['run']}**: {s['dataset']} {s['split']} split, {s['n_test']} images, {s['draws']} "
                     f"position draw(s) per random prior, kNN bank {s['n_bank']} train images"
                     + (f"; {search_text(s)}" if s.get("n_searched") else ""))
    lines += ["", *header(["Model", "Method", "Prior"], budgets)]
    for run, results in zip(runs, results_list):
        lines += table_lines(results["rows"], budgets, run)
    reverse = [r for results in results_list for r in results.get("transfer_reverse", [])]
    if reverse:
        lines += ["", "Transfer, the other way: oracle positions found with the first model, evaluated on the "
                  "second (top-1 %).", *REVERSE, *reverse_lines(reverse)]
    with_saliency = [(run, r["saliency"]) for run, r in zip(runs, results_list) if r.get("saliency")]
    if with_saliency:
        n_images = sorted({r["n_images"] for _, saliency in with_saliency for r in saliency})
        lines += ["", f"Finding 3: the saliency the tokens read, relative to the image mean (1 = average "
                  f"pixels), on the first {'/'.join(map(str, n_images))} images, ± half the 95 % interval.",
                  "", *header(["Model", "Positions"], budgets)]
        for run, saliency in with_saliency:
            lines += saliency_lines(saliency, budgets, run)
    with_gap = [(run, r) for run, r in zip(runs, results_list) if r.get("gap_closed")]
    if with_gap:
        lines += ["", GAP_TEXT, "", *header(["Model"] + GAP_HEADER)]
        for run, results in with_gap:
            lines += gap_lines(results["gap_closed"], results["rows"], run)
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# RESULTS.md and results/: every table, from the committed files

def generate():
    """-> ({path: the text this script writes there}, {RESULTS.md's block name: its markdown})."""
    tables = {name: combined_markdown(list(map(read, runs))) for name, runs in COMBINED.items()}
    files = {RESULTS / f"{name}.md": text for name, text in tables.items()}
    for path in sorted(RESULTS.glob("*/results.json")):      # as oracle.py (label_free evaluate) writes it
        files[path.with_suffix(".md")] = results_markdown(read(path.parent.name))
    blocks = {name: text.split("\n\n", 1)[1] for name, text in tables.items()}    # minus the title
    blocks |= {name: training_table(*spec) for name, spec in TRAINING.items()}
    blocks = {name: f"\n{text}\n" for name, text in blocks.items()}          # a blank line either side
    files[RESULTS_MD] = BLOCK.sub(lambda m: m[1] + blocks.get(m[2], m[3]) + m[4], RESULTS_MD.read_text())
    return files, blocks


def stale():
    """-> ({path: text} of each file not as generated, [what differs: RESULTS.md's blocks by name, files])."""
    files, blocks = generate()
    found = {m[2]: m[3] for m in BLOCK.finditer(RESULTS_MD.read_text())}
    files = {path: text for path, text in files.items() if not path.exists() or path.read_text() != text}
    return files, [f"RESULTS.md: block {name}" for name in blocks if found.get(name) != blocks[name]] + [
        str(path.relative_to(ROOT)) for path in files if path != RESULTS_MD]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write RESULTS.md's tables and results/*.md from results/.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each table that differs")
    parser.add_argument("folders", nargs="*", help="write FOLDER/results.md from FOLDER/results.json instead")
    args = parser.parse_args(argv)
    for folder in map(Path, args.folders):
        utils.write_atomic(folder / "results.md", results_markdown(json.loads((folder / "results.json").read_text())))
        print(f"wrote {folder / 'results.md'}")
    if args.folders:
        return 0
    check, (files, names) = args.check, stale()
    if check:
        print("\n".join(f"{name}: differs from what python -m experiments.tables writes" for name in names)
              or "every table is as python -m experiments.tables writes it")
        return 1 if names else 0
    for path, text in files.items():
        utils.write_atomic(path, text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

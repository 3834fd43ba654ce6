"""
experiments/label_free.py -- beyond the paper: how far does label-free placement close the gap
to the oracle?

SPoT (arXiv 2507.01654) leaves an open problem: SPoT-ON (the oracle search) finds token
positions that make a frozen model almost always right, but it reads the label. Two label-free
methods and a control are measured against it here, on the same images and at the same budgets:

    spot-learned      experiments.placement's head: glance at a few lattice tokens, then place
                      the rest (one extra forward pass at the glance's few tokens)
    spot-on-entropy   oracle.oracle_search with objective="entropy": make the model confident
    best-of-k         the cheapest control: K candidate placements from the fixed priors, keep
                      the one the model is most confident on (K forward passes)

    evaluate   (evaluate_placements) the three label-free methods' rows on the test split,
               with their cost; the best fixed prior and the control's K chosen on the
               validation split; and the comparisons (comparison_rows): each method's gain over
               that prior and over the control at about its cost, and the share of the prior ->
               oracle gap it closes, with paired 95 % bootstrap intervals, against oracle.py's
               evaluation of the same model (--against: its prior and oracle rows, per image).
               Writes OUT/results.json, OUT/results.md and OUT/per_image.npz.
    figure     one row per test image, one column per way of placing the same N tokens.

    python oracle.py --checkpoint runs/cifar10-spot/checkpoint.pt --search-limit 2000 \\
        --out results/cifar10-spot
    python -m experiments.label_free evaluate --checkpoint runs/cifar10-spot/checkpoint.pt \\
        --placer runs/cifar10-placer/placer.pt --against results/cifar10-spot --tokens 4,8,16 \\
        --draws 2 --search-limit 2000 --search-lr 3e-2 --out results/cifar10-label-free
    python -m experiments.label_free figure --checkpoint runs/cifar10-spot/checkpoint.pt \\
        --placer runs/cifar10-placer/placer.pt --tokens 16 --out label_free.png

experiments/tables.py renders the results.json this writes (results.md, RESULTS.md's tables).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import data
import oracle
import spot
import train
import utils
from experiments import placement, tables

# the control's candidate counts (K forward passes; K = 1: the isotropic prior)
CONTROL_K = (1, 2, 4, 8, 16, 32)


def learned_rows(model, placer, test, bank, config, per_image):
    """Glance-then-place, label-free, per budget of config (an oracle.EvalConfig) -> table rows
    with top-1 and kNN (no label is used, so the kNN bank is read the same way) and the cost:
    milliseconds per image, and that time as a multiple of reading the isotropic prior.
    test, bank: (uint8 images, labels). per_image: filled as oracle.results_table fills it."""
    (test_x, test_y), (bank_x, bank_y), rows = test, bank, []

    def read(images, positions, features=False):
        return train.predict(model, images, positions, config.device, config.batch_size, features)

    def place(images, tokens):
        return placement.place_split(model, placer, images, tokens, config.device,
                                     config.batch_size)
    for tokens in config.tokens:
        if tokens < 2:                                   # nothing to glance with and place
            rows.append(utils.table_row("spot-learned", "isotropic", tokens))
            continue
        started = time.perf_counter()
        read(test_x, spot.isotropic_positions(tokens).expand(len(test_y), tokens, 2))
        prior_seconds, started = time.perf_counter() - started, time.perf_counter()
        logits, features = read(test_x, place(test_x, tokens), len(bank_x) > 0)
        seconds, correct = time.perf_counter() - started, logits.argmax(1) == test_y
        knn_correct = None
        if len(bank_x):
            bank_features = read(bank_x, place(bank_x, tokens), True)[1]
            knn = oracle.knn_predict(bank_features, bank_y, features, model.config.num_classes,
                                     config.knn_k, config.knn_temperature)
            knn_correct = knn == test_y
            per_image["knn", "spot-learned", "isotropic", tokens] = knn_correct
        per_image["top1", "spot-learned", "isotropic", tokens] = correct
        glance = placement.glance_size(tokens, placer.config.glance_fraction)
        rows.append(utils.table_row("spot-learned", "isotropic", tokens, correct, knn_correct,
                                     config.seed, glance=glance,
                                     ms_per_image=1000 * seconds / len(test_y),
                                     cost_vs_prior=seconds / prior_seconds))
    return rows


def entropy_rows(model, test, config, per_image):
    """SPoT-ON's label-free twin (oracle_search with objective="entropy"), per budget of config,
    from the very start positions of oracle.py's SPoT-ON rows -> table rows with the cost: the
    search's milliseconds per image, and that time as a multiple of one forward pass at the
    budget (reading the start positions), measured side by side. test: (uint8 images, labels)."""
    window, prior, rows = model.config.window, config.search_from, []
    n_grid = len(spot.grid_positions(model.config.image_size, window))
    for tokens in [n for n in config.tokens if prior != "grid" or n <= n_grid]:
        seed = train.seed_for(config.seed, prior, tokens, "test")
        start = train.draw_positions(prior, test[0], tokens, window, seed, config.device)
        started = time.perf_counter()
        oracle.hits(model, test, start, config)
        read_seconds, started = time.perf_counter() - started, time.perf_counter()
        found = oracle.search_split(model, test[0], None, start, config, "entropy",
                                    f"entropy {tokens}T")
        seconds, correct = time.perf_counter() - started, oracle.hits(model, test, found, config)
        rows.append(utils.table_row("spot-on-entropy", prior, tokens, correct, seed=config.seed,
                                     ms_per_image=1000 * seconds / len(start),
                                     cost_vs_prior=seconds / read_seconds))
        per_image["top1", "spot-on-entropy", prior, tokens] = correct
    return rows


def control_rows(model, split, config, per_image, role="test", ks=CONTROL_K):
    """The cheapest label-free control: per image, K candidate placements from the fixed priors
    (the isotropic lattice, the centre lattice, then Sobol draws), each read once; keep the one
    on which the model is most confident (its largest softmax probability). No label, no
    gradient; its cost is exactly K forward passes at the budget. The K candidates are the first
    K of one list, so a larger K only adds candidates. Beside it, its ceiling, which reads the
    label: the oracle of K, right when any of the K candidates is. split: (uint8 images, labels)
    -> rows ("best-of-k", "K=k", tokens) and, for k >= 2, ("oracle-of-k", "K=k", tokens) for
    every k in ks and budget of config; per_image filled."""
    window, rows = model.config.window, []
    candidates = ["isotropic", "center"] + ["sobol"] * (max(ks) - 2)
    for tokens in config.tokens:
        confidence, correct = [], []
        for index, prior in enumerate(candidates):
            # the seed key of oracle.py's prior rows (K = 1 reads its isotropic row), + the index
            key = (prior, tokens, role) + ((index,) if prior == "sobol" else ())
            seed = train.seed_for(config.seed, *key)
            positions = train.draw_positions(prior, split[0], tokens, window, seed, config.device)
            logits = train.predict(model, split[0], positions, config.device, config.batch_size)[0]
            confidence.append(logits.softmax(1).amax(1))
            correct.append(logits.argmax(1) == split[1])
        confidence, correct = torch.stack(confidence), torch.stack(correct)          # (K, n)
        for k in ks:
            pick = confidence[:k].argmax(0, keepdim=True)     # (1, n) most confident of the first k
            chosen = correct[:k].gather(0, pick)[0]
            per_image["top1", "best-of-k", f"K={k}", tokens] = chosen
            rows.append(utils.table_row("best-of-k", f"K={k}", tokens, chosen, seed=config.seed,
                                         cost_vs_prior=k))
            if k < 2:
                continue
            ceiling = correct[:k].any(0)                  # (n,) one of the first k is right
            per_image["top1", "oracle-of-k", f"K={k}", tokens] = ceiling
            rows.append(utils.table_row("oracle-of-k", f"K={k}", tokens, ceiling,
                                         seed=config.seed, cost_vs_prior=k))
    return rows


def choose_on_validation(model, dataset, config):
    """What the label-free table must not choose on its test images, chosen on the validation
    split (the images train.py --val-size held out): per budget the best fixed prior (highest
    top-1 of config.priors) and the control's K (highest top-1; the smaller K on a tie).
    -> (choices {"split", "n_images", "best_prior": {tokens: {"prior", "top1"}}, "control_k":
    {tokens: {"k", "top1"}}}, the validation rows, their per-image correctness)"""
    val, per_image = (dataset.val.images, dataset.val.labels), {}
    no_bank = (val[0][:0], val[1][:0])                                       # no kNN
    rows = oracle.prior_rows(model, val, no_bank, replace(config, split="val"), per_image)
    rows += control_rows(model, val, config, per_image, role="val")

    def best(method, t):          # the highest top-1; on a tie the smaller cost (K)
        found = [r for r in rows if (r["method"], r["tokens"]) == (method, t)]
        return max((r for r in found if r["top1"] is not None),
                   key=lambda r: (r["top1"], -r.get("cost_vs_prior", 0)))
    best_prior, control_k = {}, {}
    for t in config.tokens:
        prior, control = best("prior", t), best("best-of-k", t)
        best_prior[t] = {"prior": prior["prior"], "top1": prior["top1"]}
        control_k[t] = {"k": control.get("cost_vs_prior"), "top1": control.get("top1")}
    choices = {"split": "val", "n_images": len(val[1]), "best_prior": best_prior,
               "control_k": control_k}
    return choices, rows, per_image


def comparison_rows(per_image, reference, choices, rows, seed=0):
    """Each label-free method, and the control at the K chosen on validation, against the best
    fixed prior chosen on validation, image by image on the images the method read (the whole
    test split, or the first n the searches read); against the control at no more K than its
    cost (at least 2); and the share of the prior -> oracle gap it closes, on the oracle's
    searched images: gap closed = (acc(method) - acc(prior)) / (acc(oracle) - acc(prior)).
    Every interval is a paired 95 % bootstrap: the same resampled images for all. per_image:
    the label-free rows'; reference: oracle.py's on the same test split (load_per_image)."""
    def per(x):          # (draws, n) or (n,) 0/1 -> (n,) the mean over the draws
        return torch.as_tensor(x).float().reshape(-1, x.shape[-1]).mean(0)
    out = []
    for row in (r for r in rows if r["top1"] is not None):
        method, tokens = row["method"], row["tokens"]
        chosen = choices["control_k"][tokens]["k"]
        if method == "oracle-of-k":                   # a ceiling (it reads the label), not a method
            continue
        if method == "best-of-k" and row["prior"] != f"K={chosen}":
            continue
        found = per(per_image["top1", method, row["prior"], tokens])                    # (n,)
        best = choices["best_prior"][tokens]["prior"]
        prior = per(reference["top1", "prior", best, tokens])
        oracle_hits = reference.get(("top1", "spot-on", "isotropic", tokens))
        cost = max(2, round(row.get("cost_vs_prior") or 2))
        k = max([k for k in CONTROL_K if k <= cost])
        control = per(per_image["top1", "best-of-k", f"K={k}", tokens])
        n, n_oracle = len(found), 0 if oracle_hits is None else oracle_hits.shape[-1]
        record = {"method": method, "prior": row["prior"], "tokens": tokens, "best_prior": best,
                  "n_images": n, "prior_top1": 100 * prior[:n].mean().item(),
                  "top1": 100 * found.mean().item(), "control_k": k}
        for name, other in (("gain", prior), ("vs_control", control)):
            interval = tables.paired_difference(found, other[:n], seed)
            record.update(zip((name, f"{name}_low", f"{name}_high"), interval))
        if n_oracle and n >= n_oracle:
            record.update(gap_closed(found[:n_oracle], prior[:n_oracle], per(oracle_hits), seed))
        out.append(record)
    return out


def gap_closed(found, prior, oracle_acc, seed):
    """The share of the prior -> oracle gap a method closes, on the m images the oracle searched
    (each (m,), per-image accuracy): (acc(method) - acc(prior)) / (acc(oracle) - acc(prior)),
    the gap at least 1/m (one image), with a 95 % bootstrap interval over the same resampled
    images for numerator and denominator -> the record's oracle_top1, n_oracle, gap_closed*."""
    m = len(oracle_acc)
    picks = torch.randint(0, m, (1000, m), generator=torch.Generator().manual_seed(seed))
    gain, room = found - prior, oracle_acc - prior                                  # (m,)
    resampled = gain[picks].mean(1) / room[picks].mean(1).clamp_min(1 / m)          # (1000,)
    return {"oracle_top1": 100 * oracle_acc.mean().item(), "n_oracle": m,
            "gap_closed": (gain.mean() / room.mean().clamp_min(1 / m)).item(),
            "gap_closed_low": resampled.quantile(0.025).item(),
            "gap_closed_high": resampled.quantile(0.975).item()}


# -----------------------------------------------------------------------------
# evaluate: the label-free rows beside oracle.py's evaluation of the same model

def evaluate_placements(placer_path, against, oracle_argv):
    """The command `evaluate`: the label-free rows (learned placer and control on the whole test
    split, the entropy search on the images oracle.py's search read: --against's first
    n_searched), the choices made on the validation split, and the comparisons with the best
    prior and the oracle of oracle.py's evaluation in --against -> results.json, results.md and
    per_image.npz in --out."""
    parser, args, model, dataset, _, config = oracle.setup(oracle_argv)
    if config.split != "test" or dataset.val is None:
        parser.error("evaluate reads the test split and chooses on the validation split: the run "
                     "needs train.py --val-size > 0, and --split must be test")
    split, n = dataset.test, min(config.limit or len(dataset.test), len(dataset.test))
    try:
        placer = placement.load_placer(placer_path, args.device)[0]
        placement.check_fits(placer, model)
        reference = json.loads((Path(against) / "results.json").read_text())      # oracle.py's
        reference_bits = utils.load_per_image(Path(against) / "per_image.npz")
    except (ValueError, OSError, KeyError) as error:
        parser.error(f"--placer / --against: {error}")
    choices, val_rows, val_bits = choose_on_validation(model, dataset, config)
    test = (split.images[:n], split.labels[:n])
    n_searched, per_image = reference["settings"]["n_searched"], {}
    bank = (dataset.train.images[:config.knn_limit], dataset.train.labels[:config.knn_limit])
    rows = control_rows(model, test, config, per_image)
    # K=1 is the isotropic lattice: oracle.py's row, for the same model and images
    for tokens in config.tokens:
        ours = per_image["top1", "best-of-k", "K=1", tokens].numpy()
        theirs = reference_bits.get(("top1", "prior", "isotropic", tokens), np.zeros(0))
        if not np.array_equal(ours, theirs.reshape(-1)):
            parser.error(f"--against {against}: its isotropic row at {tokens} tokens is not what "
                         f"this checkpoint reads on these test images (another model, split or "
                         f"--limit, or no such row)")
    rows += learned_rows(model, placer, test, bank, config, per_image)
    if n_searched:
        searched = (test[0][:n_searched], test[1][:n_searched])
        rows += entropy_rows(model, searched, config, per_image)
    settings = {**vars(args), **asdict(config), "device": str(config.device),
                "placer": placer_path, "against": against, "n_test": n, "n_searched": n_searched,
                "dataset": dataset.name, "run": args.name or utils.run_name(args.checkpoint),
                "n_bank": len(bank[1])}
    comparisons = comparison_rows(per_image, reference_bits, choices, rows, config.seed)
    results = {"settings": settings, "choices": choices, "rows": rows,
               "validation_rows": val_rows, "comparisons": comparisons}
    text = json.dumps(results, indent=2)
    markdown = tables.results_markdown(results)
    utils.write_atomic(Path(args.out) / "results.json", text)
    utils.write_atomic(Path(args.out) / "results.md", markdown)
    val_bits = {("val-" + key[0],) + key[1:]: bits for key, bits in val_bits.items()}
    utils.save_per_image(Path(args.out) / "per_image.npz", {**per_image, **val_bits})
    print(f"{markdown}\nwrote {args.out}/results.json, results.md and per_image.npz")
    return 0


# -----------------------------------------------------------------------------
# figure: the same N tokens placed four ways

def figure(args):
    """One row per test image, one column per way of placing the same N tokens: the prior, the
    learned glance-then-place head (with --placer), the label-free entropy search, and the label
    oracle (the only column that reads the label). -> the matplotlib figure, written to --out."""
    import matplotlib.pyplot as plt
    import visualize

    model, dataset, _ = data.load_model_and_data(args.checkpoint)
    size, window, test = model.config.image_size, model.config.window, dataset.test
    tokens = utils.parse_tokens(args.tokens, len(spot.grid_positions(size, window)))
    if len(tokens) != 1:
        raise ValueError(f"--tokens: the figure draws one budget, got {args.tokens!r}")
    uint8, labels = (t[args.index:args.index + args.n_images] for t in (test.images, test.labels))
    if len(labels) < args.n_images:
        raise ValueError(f"--index {args.index} + --n-images {args.n_images} > "
                         f"the {len(test.labels)} test images")
    images = uint8.float() / 255
    start = train.draw_positions(args.search_from, uint8, *tokens, window, args.seed, "cpu")
    columns = [(f"prior '{args.search_from}'", start)]
    if args.placer:
        placer = placement.load_placer(args.placer)[0]
        placement.check_fits(placer, model)
        placed = placement.place_split(model, placer, uint8, tokens[0], "cpu")
        columns.append(("SPoT-learned (label-free)", placed))
    searches = (("entropy search (label-free)", None), ("SPoT-ON (label oracle)", labels))
    for name, y in searches:                                    # no label: the entropy objective
        objective = "entropy" if y is None else "label"
        found = oracle.oracle_search(model, images, y, start, args.search_steps, args.search_lr,
                                     objective)
        columns.append((name, found.positions))
    classes = [visualize.WORDNET_NAMES.get(name, name) for name in dataset.classes]
    fig, axes = plt.subplots(len(images), len(columns), squeeze=False, layout="constrained",
                             figsize=(3.3 * len(columns), 3.6 * len(images)))
    for column, (name, positions) in enumerate(columns):
        predicted = train.predict(model, uint8, positions, "cpu", len(uint8))[0].argmax(1).tolist()
        for row, (p, y) in enumerate(zip(predicted, labels.tolist())):
            title = f"{name}\n'{classes[p]}' ({'right' if p == y else 'wrong'})"
            visualize.plot_placements(images[row], positions[row], window, ax=axes[row, column],
                                      title=title)
            axes[row, 0].set_ylabel(f"#{args.index + row} '{classes[y]}'", fontsize=9)
    fig.suptitle(f"{tokens[0]} tokens each, the same model; only the oracle reads the label",
                 fontsize=10)
    utils.write_atomic(args.out, fig.savefig)
    plt.close(fig)
    return fig


def main(argv=None):
    """Entry point; argv defaults to sys.argv[1:]. A bad flag, file or dataset exits with
    status 2 and an 'error: ...' message, never a traceback."""
    parser = argparse.ArgumentParser(prog="python -m experiments.label_free",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("evaluate", allow_abbrev=False,
                            help="the label-free rows, chosen on validation, against oracle.py's "
                            "evaluation of the same model",
                            epilog="Every other flag is oracle.py's (python oracle.py --help): "
                            "--checkpoint, --out, --tokens, --search-limit, ...")
    p.add_argument("--placer", required=True, help="placer.pt written by experiments.placement")
    p.add_argument("--against", required=True,
                   help="oracle.py's --out for the same checkpoint on the test split "
                   "(results.json + per_image.npz): its prior and oracle rows")
    p = commands.add_parser("figure",
                            help="prior, learned head, entropy search and oracle side by side",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    add("--placer", help="placer.pt written by experiments.placement: adds its column")
    add("--tokens", default="16", help="tokens per image: one budget N, or 'all' (the patch grid)")
    add("--index", type=utils.int_at_least(0), default=0, help="first test image")
    add("--n-images", type=utils.int_at_least(1), default=3, help="how many test images (rows)")
    add("--seed", type=int, default=0, help="seed of the random priors")
    add("--search-from", choices=spot.PRIORS, default="isotropic",
        help="prior the searches start from")
    add("--search-steps", type=utils.int_at_least(0), default=oracle.DEFAULT_STEPS,
        help="Adam steps")
    add("--search-lr", type=utils.float_in(0, low_open=True), default=oracle.DEFAULT_LR,
        help="Adam lr, position units")
    add("--out", default="label_free.png", help="the figure (.png, .pdf, .svg, ...)")
    # hidden aliases, the flags' names in visualize.py: --prior, --steps
    utils.add_alias(p, "search_from", "--prior", choices=spot.PRIORS)
    utils.add_alias(p, "search_steps", "--steps", type=utils.int_at_least(0))
    args, rest = parser.parse_known_args(argv)
    if args.command == "evaluate":                # the rest are oracle.py's flags
        return evaluate_placements(args.placer, args.against, rest)
    args = parser.parse_args(argv)                # figure: no flag of anyone else's
    try:
        figure(args)
    except (ValueError, data.DataError) as error:      # a message for the user, not a bug
        parser.exit(2, f"{parser.prog} figure: error: {error}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
experiments/label_free.py -- beyond the paper: how far does label-free placement close the gap
to the oracle?

SPoT (arXiv 2507.01654) leaves an open problem: SPoT-ON (the oracle search) finds token
positions that make a frozen model almost always right, but it reads the label. Two label-free
methods are measured against it here, on the same images and at the same budgets:

    spot-learned      experiments.placement's head: glance at a few lattice tokens, then place
                      the rest (one extra forward pass at the glance's few tokens)
    spot-on-entropy   oracle.oracle_search with objective="entropy": make the model confident

    evaluate   oracle.py's whole table (every prior, SPoT-ON), plus the entropy search's rows
               (entropy_rows), the learned placer's rows (learned_rows; both with their cost) and
               the gap rows (gap_rows): the gain over
               the best fixed prior and the share of the prior -> oracle gap closed, with paired
               95 % bootstrap intervals. Writes OUT/results.json and OUT/results.md.
    figure     one row per test image, one column per way of placing the same N tokens.

    python -m experiments.label_free evaluate --checkpoint runs/cifar10-spot/checkpoint.pt \\
        --placer runs/cifar10-placer/placer.pt --draws 2 --search-limit 2000 --search-lr 3e-2 \\
        --saliency-limit 0 --out results/cifar10-label-free
    python -m experiments.label_free figure --checkpoint runs/cifar10-spot/checkpoint.pt \\
        --placer runs/cifar10-placer/placer.pt --tokens 16 --out label_free.png

experiments/tables.py renders the results.json this writes (results.md, RESULTS.md's tables).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import data
import oracle
import spot
import utils
from experiments import placement, tables

LABEL_FREE = ("spot-learned", "spot-on-entropy")


def learned_rows(model, placer, test, bank, config, per_image=None):
    """Glance-then-place, label-free, per budget of config (an oracle.EvalConfig) -> table rows
    with top-1 and kNN (no label is used, so the kNN bank is read the same way) and the cost:
    milliseconds per image, and that time as a multiple of reading the isotropic prior.
    test, bank: (uint8 images, labels). per_image: filled as oracle.evaluate fills it."""
    (test_x, test_y), (bank_x, bank_y), rows = test, bank, []
    read = lambda images, positions, features=False: oracle.predict(  # noqa: E731
        model, images, positions, config.device, config.batch_size, features)
    place = lambda images, tokens: placement.place_split(  # noqa: E731
        model, placer, images, tokens, config.device, config.batch_size)
    for tokens in config.tokens:
        if tokens < 2:                                   # nothing to glance with and place
            rows.append(oracle.table_row("spot-learned", "isotropic", tokens))
            continue
        started = time.perf_counter()
        read(test_x, spot.isotropic_positions(tokens).expand(len(test_y), tokens, 2))
        prior_seconds, started = time.perf_counter() - started, time.perf_counter()
        logits, features = read(test_x, place(test_x, tokens), len(bank_x) > 0)
        seconds, correct = time.perf_counter() - started, logits.argmax(1) == test_y
        knn_correct = None
        if len(bank_x):
            knn_correct = oracle.knn_predict(read(bank_x, place(bank_x, tokens), True)[1], bank_y, features,
                                             model.config.num_classes, config.knn_k, config.knn_temperature) == test_y
        if per_image is not None:
            per_image["spot-learned", "isotropic", tokens] = correct
        rows.append(oracle.table_row("spot-learned", "isotropic", tokens, correct, knn_correct, config.seed,
                                     glance=placement.glance_size(tokens, placer.config.glance_fraction),
                                     ms_per_image=1000 * seconds / len(test_y), cost_vs_prior=seconds / prior_seconds))
    return rows


def entropy_rows(model, test, config, per_image=None):
    """SPoT-ON's label-free twin (oracle_search with objective="entropy"), per budget of config,
    from the very start positions of oracle.py's SPoT-ON rows -> table rows with the cost: the
    search's milliseconds per image, and that time as a multiple of one forward pass at the
    budget (reading the start positions), measured side by side. test: (uint8 images, labels)."""
    size, window, prior, rows = model.config.image_size, model.config.window, config.search_from, []
    for tokens in [n for n in config.tokens if prior != "grid" or n <= len(spot.grid_positions(size, window))]:
        start = oracle.draw_positions(prior, test[0], tokens, size, window,
                                      oracle.seed_for(config.seed, prior, tokens, "test"), config.device)
        started = time.perf_counter()
        oracle.hits(model, test, start, config)
        read_seconds, started = time.perf_counter() - started, time.perf_counter()
        found = oracle.search_split(model, test[0], None, start, config, "entropy", f"entropy {tokens}T")
        seconds, correct = time.perf_counter() - started, oracle.hits(model, test, found, config)
        rows.append(oracle.table_row("spot-on-entropy", prior, tokens, correct, seed=config.seed,
                                     ms_per_image=1000 * seconds / len(start), cost_vs_prior=seconds / read_seconds))
        if per_image is not None:
            per_image["spot-on-entropy", prior, tokens] = correct
    return rows


def gap_rows(rows, per_image, budgets, seed=0, resamples=1000):
    """How much of the prior -> oracle gap each label-free method closes, per budget.

    The baseline is the best image-independent prior at that budget (the prior row with the
    highest top-1 on all the evaluated images), and everything is compared on the images the
    oracle searched, image by image:

        gain       = acc(method) - acc(best prior)                              (points)
        gap closed = (acc(method) - acc(best prior)) / (acc(oracle) - acc(best prior))

    Both get a 95 % percentile bootstrap interval that resamples the *same* images for all
    three (a paired bootstrap: an image hard for the prior is usually hard for the method too,
    so the difference is known more precisely than either accuracy).
    -> [{"method", "tokens", "best_prior", "gain", "gain_low", "gain_high", "gap_closed",
         "gap_closed_low", "gap_closed_high", "n_images"}]
    """
    def accuracy(method, tokens, prior=None, n=None):
        """Per-image accuracy (n,) of a recorded row, averaged over its position draws."""
        key = next((k for k in per_image if k[0] == method and k[2] == tokens
                    and prior in (None, k[1])), None)
        if key is None:
            return None
        correct = per_image[key].float()
        return correct.reshape(-1, correct.shape[-1])[:, :n].mean(0)

    out, low, high = [], (1 - 0.95) / 2, (1 + 0.95) / 2
    for tokens in budgets:
        priors = [r for r in rows if r["method"] == "prior" and r["tokens"] == tokens
                  and r["top1"] is not None]
        best_oracle = accuracy("spot-on", tokens)
        if not priors or best_oracle is None:
            continue
        n = len(best_oracle)
        best = max(priors, key=lambda r: r["top1"])["prior"]
        prior = accuracy("prior", tokens, best, n)
        picks = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
        room = (best_oracle - prior)[picks].mean(1).clamp_min(1 / n)                 # (R,)
        for method in LABEL_FREE:
            found = accuracy(method, tokens, n=n)
            if found is None:
                continue
            gain = (found - prior)[picks].mean(1)                                     # (R,)
            mean_gain = (found - prior).mean()
            out.append({"method": method, "tokens": tokens, "best_prior": best, "gain": 100 * mean_gain.item(),
                        "gain_low": 100 * gain.quantile(low).item(), "gain_high": 100 * gain.quantile(high).item(),
                        "gap_closed": (mean_gain / (best_oracle - prior).mean().clamp_min(1 / n)).item(),
                        "gap_closed_low": (gain / room).quantile(low).item(),
                        "gap_closed_high": (gain / room).quantile(high).item(), "n_images": n})
    return out


# -----------------------------------------------------------------------------
# evaluate: oracle.py's table + the learned placer's rows + the gap rows

def evaluate(placer_path, oracle_argv):
    """`evaluate`: oracle.py's command line (oracle_argv) plus --placer -> results.json and
    results.md in --out, as oracle.py writes them, with "spot-learned" rows and "gap_closed"."""
    parser, args, model, dataset, other, config = oracle.setup(oracle_argv)
    try:
        placer = placement.load_placer(placer_path, args.device)[0]
        placement.check_fits(placer, model)
    except ValueError as error:
        parser.error(f"--placer: {error}")
    per_image = {}
    results = oracle.evaluate(model, dataset, config, other, per_image)
    n_test, n_bank, split = results["settings"]["n_test"], results["settings"]["n_bank"], getattr(dataset, config.split)
    n_searched = results["settings"]["n_searched"]
    if n_searched:
        results["rows"] += entropy_rows(model, (split.images[:n_searched], split.labels[:n_searched]), config,
                                        per_image)
    results["rows"] += learned_rows(model, placer, (split.images[:n_test], split.labels[:n_test]),
                                    (dataset.train.images[:n_bank], dataset.train.labels[:n_bank]), config, per_image)
    gap = gap_rows(results["rows"], per_image, config.tokens, config.seed)
    results["settings"] = {**vars(args), **results["settings"], "placer": placer_path,
                           "run": args.name or oracle.run_name(args.checkpoint)}
    results.update({"gap_closed": gap} if gap else {})
    for name, content in (("results.json", json.dumps(results, indent=2)), ("results.md", tables.results_markdown(results))):
        utils.write_atomic(Path(args.out) / name, content)
    print(f"{content}\nwrote {args.out}/results.json and results.md")
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
        raise ValueError(f"--index {args.index} + --n-images {args.n_images} > the {len(test.labels)} test images")
    images, start = uint8.float() / 255, oracle.draw_positions(args.search_from, uint8, *tokens, size, window,
                                                               args.seed, "cpu")
    columns = [(f"prior '{args.search_from}'", start)]
    if args.placer:
        placer = placement.load_placer(args.placer)[0]
        placement.check_fits(placer, model)
        columns.append(("SPoT-learned (label-free)", placement.place_split(model, placer, uint8, tokens[0], "cpu")))
    for name, y in (("entropy search (label-free)", None), ("SPoT-ON (label oracle)", labels)):    # no label: entropy
        columns.append((name, oracle.oracle_search(model, images, y, start, args.search_steps, args.search_lr,
                                                   "entropy" if y is None else "label").positions))
    classes = [visualize.WORDNET_NAMES.get(name, name) for name in dataset.classes]
    fig, axes = plt.subplots(len(images), len(columns), squeeze=False, layout="constrained",
                             figsize=(3.3 * len(columns), 3.6 * len(images)))
    for column, (name, positions) in enumerate(columns):
        predicted = oracle.predict(model, uint8, positions, "cpu", len(uint8))[0].argmax(1).tolist()
        for row, (p, y) in enumerate(zip(predicted, labels.tolist())):
            visualize.plot_placements(images[row], positions[row], window, ax=axes[row, column],
                                      title=f"{name}\n'{classes[p]}' ({'right' if p == y else 'wrong'})")
            axes[row, 0].set_ylabel(f"#{args.index + row} '{classes[y]}'", fontsize=9)
    fig.suptitle(f"{tokens[0]} tokens each, the same model; only the oracle reads the label", fontsize=10)
    utils.write_atomic(args.out, fig.savefig)
    plt.close(fig)
    return fig


def main(argv=None):
    """Entry point; argv defaults to sys.argv[1:]. A bad flag, file or dataset exits with
    status 2 and an 'error: ...' message, never a traceback."""
    parser = argparse.ArgumentParser(prog="python -m experiments.label_free", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("evaluate", allow_abbrev=False, help="oracle.py's table + the learned "
                            "placer's rows + the gap rows", epilog="Every other flag is oracle.py's "
                            "(python oracle.py --help): --checkpoint, --out, --tokens, --search-limit, ...")
    p.add_argument("--placer", required=True, help="placer.pt written by experiments.placement")
    p = commands.add_parser("figure", help="prior, learned head, entropy search and oracle side by side",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    add("--placer", help="placer.pt written by experiments.placement: adds its column")
    add("--tokens", default="16", help="tokens per image: one budget N, or 'all' (the patch grid)")
    add("--index", type=utils.int_at_least(0), default=0, help="first test image")
    add("--n-images", type=utils.int_at_least(1), default=3, help="how many test images (rows)")
    add("--seed", type=int, default=0, help="seed of the random priors")
    add("--search-from", choices=spot.PRIORS, default="isotropic", help="prior the searches start from")
    add("--search-steps", type=utils.int_at_least(0), default=oracle.DEFAULT_STEPS, help="Adam steps")
    add("--search-lr", type=utils.float_in(0, low_open=True), default=oracle.DEFAULT_LR, help="Adam lr, position units")
    add("--out", default="label_free.png", help="the figure (.png, .pdf, .svg, ...)")
    utils.add_alias(p, "search_from", "--prior", choices=spot.PRIORS)           # visualize.py label-free's
    utils.add_alias(p, "search_steps", "--steps", type=utils.int_at_least(0))   # old spellings
    args, rest = parser.parse_known_args(argv)
    if args.command == "evaluate":                # the rest are oracle.py's flags
        return evaluate(args.placer, rest)
    args = parser.parse_args(argv)                # figure: no flag of anyone else's
    try:
        figure(args)
    except (ValueError, data.DataError) as error:      # a message for the user, not a bug
        parser.exit(2, f"{parser.prog} figure: error: {error}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

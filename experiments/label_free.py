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

    evaluate   the three label-free methods' rows on the test split, with their cost; the best
               fixed prior and the control's K chosen on the validation split; and the
               comparisons (comparison_rows): each method's gain over that prior and over the
               control at about its cost, and the share of the prior -> oracle gap it closes,
               with paired 95 % bootstrap intervals, against oracle.py's evaluation of the same
               model (--against: its prior and oracle rows, per image). Writes OUT/results.json,
               OUT/results.md and OUT/per_image.npz.
    figure     one row per test image, one column per way of placing the same N tokens.

    python oracle.py --checkpoint runs/cifar10-spot/checkpoint.pt --search-limit 2000 --out results/cifar10-spot
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

CONTROL_K = (1, 2, 4, 8, 16, 32)     # the control's candidate counts (K forward passes; 1: the isotropic prior)


def learned_rows(model, placer, test, bank, config, per_image):
    """Glance-then-place, label-free, per budget of config (an oracle.EvalConfig) -> table rows
    with top-1 and kNN (no label is used, so the kNN bank is read the same way) and the cost:
    milliseconds per image, and that time as a multiple of reading the isotropic prior.
    test, bank: (uint8 images, labels). per_image: filled as oracle.evaluate fills it."""
    (test_x, test_y), (bank_x, bank_y), rows = test, bank, []
    read = lambda images, positions, features=False: train.predict(  # noqa: E731
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
            per_image["knn", "spot-learned", "isotropic", tokens] = knn_correct
        per_image["top1", "spot-learned", "isotropic", tokens] = correct
        rows.append(oracle.table_row("spot-learned", "isotropic", tokens, correct, knn_correct, config.seed,
                                     glance=placement.glance_size(tokens, placer.config.glance_fraction),
                                     ms_per_image=1000 * seconds / len(test_y), cost_vs_prior=seconds / prior_seconds))
    return rows


def entropy_rows(model, test, config, per_image):
    """SPoT-ON's label-free twin (oracle_search with objective="entropy"), per budget of config,
    from the very start positions of oracle.py's SPoT-ON rows -> table rows with the cost: the
    search's milliseconds per image, and that time as a multiple of one forward pass at the
    budget (reading the start positions), measured side by side. test: (uint8 images, labels)."""
    size, window, prior, rows = model.config.image_size, model.config.window, config.search_from, []
    for tokens in [n for n in config.tokens if prior != "grid" or n <= len(spot.grid_positions(size, window))]:
        start = train.draw_positions(prior, test[0], tokens, window,
                                      train.seed_for(config.seed, prior, tokens, "test"), config.device)
        started = time.perf_counter()
        oracle.hits(model, test, start, config)
        read_seconds, started = time.perf_counter() - started, time.perf_counter()
        found = oracle.search_split(model, test[0], None, start, config, "entropy", f"entropy {tokens}T")
        seconds, correct = time.perf_counter() - started, oracle.hits(model, test, found, config)
        rows.append(oracle.table_row("spot-on-entropy", prior, tokens, correct, seed=config.seed,
                                     ms_per_image=1000 * seconds / len(start), cost_vs_prior=seconds / read_seconds))
        per_image["top1", "spot-on-entropy", prior, tokens] = correct
    return rows


def control_rows(model, split, config, per_image, role="test", ks=CONTROL_K):
    """The cheapest label-free control: per image, K candidate placements from the fixed priors
    (the isotropic lattice, the centre lattice, then Sobol draws), each read once; keep the one
    on which the model is most confident (its largest softmax probability). No label, no
    gradient; its cost is exactly K forward passes at the budget. The K candidates are the first
    K of one list, so a larger K only adds candidates. split: (uint8 images, labels) -> rows
    ("best-of-k", "K=k", tokens) for every k in ks and budget of config; per_image filled."""
    size, window, rows = model.config.image_size, model.config.window, []
    for tokens in config.tokens:
        confidence, correct = [], []
        for index, prior in enumerate(["isotropic", "center"] + ["sobol"] * (max(ks) - 2)):
            key = (prior, tokens, role) + ((index,) if prior == "sobol" else ())   # isotropic = the prior row's
            positions = train.draw_positions(prior, split[0], tokens, window,
                                              train.seed_for(config.seed, *key), config.device)  # (n, N, 2)
            logits = train.predict(model, split[0], positions, config.device, config.batch_size)[0]
            confidence.append(logits.softmax(1).amax(1))
            correct.append(logits.argmax(1) == split[1])
        confidence, correct = torch.stack(confidence), torch.stack(correct)                     # (K, n)
        for k in ks:
            pick = confidence[:k].argmax(0, keepdim=True)                  # (1, n) most confident of the first k
            per_image["top1", "best-of-k", f"K={k}", tokens] = chosen = correct[:k].gather(0, pick)[0]
            rows.append(oracle.table_row("best-of-k", f"K={k}", tokens, chosen, seed=config.seed, cost_vs_prior=k))
    return rows


def choose_on_validation(model, dataset, config):
    """What the label-free table must not choose on its test images, chosen on the validation
    split (the images train.py --val-size held out): per budget the best fixed prior (highest
    top-1 of config.priors) and the control's K (highest top-1; the smaller K on a tie).
    -> (choices {"split", "n_images", "best_prior": {tokens: {"prior", "top1"}}, "control_k":
    {tokens: {"k", "top1"}}}, the validation rows, their per-image correctness)"""
    val, per_image = (dataset.val.images, dataset.val.labels), {}
    rows = oracle.prior_rows(model, val, (val[0][:0], val[1][:0]), replace(config, split="val"), per_image)  # no kNN
    rows += control_rows(model, val, config, per_image, role="val")
    best = lambda method, t: max((r for r in rows if (r["method"], r["tokens"]) == (method, t)  # noqa: E731
                                  and r["top1"] is not None), key=lambda r: (r["top1"], -r.get("cost_vs_prior", 0)))
    choices = {"split": "val", "n_images": len(val[1]),
               "best_prior": {t: {key: best("prior", t)[key] for key in ("prior", "top1")} for t in config.tokens},
               "control_k": {t: dict(zip(("k", "top1"), map(best("best-of-k", t).get, ("cost_vs_prior", "top1"))))
                             for t in config.tokens}}
    return choices, rows, per_image


def comparison_rows(per_image, reference, choices, rows, seed=0):
    """Each label-free method, and the control at the K chosen on validation, against the best
    fixed prior chosen on validation, image by image on the images the method read (the whole
    test split, or the first n the searches read); against the control at no more K than its
    cost (at least 2); and the share of the prior -> oracle gap it closes, on the oracle's
    searched images: gap closed = (acc(method) - acc(prior)) / (acc(oracle) - acc(prior)).
    Every interval is a paired 95 % bootstrap: the same resampled images for all. per_image:
    the label-free rows'; reference: oracle.py's on the same test split (load_per_image)."""
    out, per = [], lambda x: torch.as_tensor(x).float().reshape(-1, x.shape[-1]).mean(0)  # noqa: E731
    for row in (r for r in rows if r["top1"] is not None):
        method, tokens, chosen = row["method"], row["tokens"], choices["control_k"][row["tokens"]]["k"]
        if method == "best-of-k" and row["prior"] != f"K={chosen}":
            continue
        found = per(per_image["top1", method, row["prior"], tokens])                              # (n,)
        best = choices["best_prior"][tokens]["prior"]
        prior, oracle_hits = per(reference["top1", "prior", best, tokens]), reference.get(("top1", "spot-on", "isotropic", tokens))
        k = max([k for k in CONTROL_K if k <= max(2, round(row.get("cost_vs_prior") or 2))])
        control = per(per_image["top1", "best-of-k", f"K={k}", tokens])
        n, n_oracle = len(found), 0 if oracle_hits is None else oracle_hits.shape[-1]
        record = {"method": method, "prior": row["prior"], "tokens": tokens, "best_prior": best, "n_images": n,
                  "prior_top1": 100 * prior[:n].mean().item(), "top1": 100 * found.mean().item(), "control_k": k}
        for name, other in (("gain", prior), ("vs_control", control)):
            record.update(zip((name, f"{name}_low", f"{name}_high"), tables.paired_difference(found, other[:n], seed)))
        if n_oracle and n >= n_oracle:
            oracle_acc, m = per(oracle_hits), n_oracle
            picks = torch.randint(0, m, (1000, m), generator=torch.Generator().manual_seed(seed))
            gain, room = (found[:m] - prior[:m])[picks].mean(1), (oracle_acc - prior[:m])[picks].mean(1).clamp_min(1 / m)
            record.update(oracle_top1=100 * oracle_acc.mean().item(), n_oracle=m, gap_closed=(
                (found[:m] - prior[:m]).mean() / (oracle_acc - prior[:m]).mean().clamp_min(1 / m)).item(),
                gap_closed_low=(gain / room).quantile(0.025).item(), gap_closed_high=(gain / room).quantile(0.975).item())
        out.append(record)
    return out


# -----------------------------------------------------------------------------
# evaluate: the label-free rows beside oracle.py's evaluation of the same model

def evaluate(placer_path, against, oracle_argv):
    """`evaluate`: the label-free rows (learned placer and control on the whole test split, the
    entropy search on the images oracle.py's search read: --against's first n_searched), the
    choices made on the validation split,
    and the comparisons with the best prior and the oracle of oracle.py's evaluation in --against
    -> results.json, results.md and per_image.npz in --out."""
    parser, args, model, dataset, _, config = oracle.setup(oracle_argv)
    if config.split != "test" or dataset.val is None:
        parser.error("evaluate reads the test split and chooses on the validation split: the run needs "
                     "train.py --val-size > 0, and --split must be test")
    split, n = dataset.test, min(config.limit or len(dataset.test), len(dataset.test))
    try:
        placer = placement.load_placer(placer_path, args.device)[0]
        placement.check_fits(placer, model)
        reference = json.loads((Path(against) / "results.json").read_text())          # oracle.py's
        reference_bits = utils.load_per_image(Path(against) / "per_image.npz")
    except (ValueError, OSError, KeyError) as error:
        parser.error(f"--placer / --against: {error}")
    choices, val_rows, val_bits = choose_on_validation(model, dataset, config)
    test, n_searched, per_image = (split.images[:n], split.labels[:n]), reference["settings"]["n_searched"], {}
    bank = (dataset.train.images[:config.knn_limit], dataset.train.labels[:config.knn_limit])
    rows = control_rows(model, test, config, per_image)
    for tokens in config.tokens:  # K=1 is the isotropic lattice: oracle.py's row, for the same model and images
        if not np.array_equal(per_image["top1", "best-of-k", "K=1", tokens].numpy(),
                              reference_bits.get(("top1", "prior", "isotropic", tokens), np.zeros(0)).reshape(-1)):
            parser.error(f"--against {against}: its isotropic row at {tokens} tokens is not what this checkpoint "
                         f"reads on these test images (another model, split or --limit, or no such row)")
    rows += learned_rows(model, placer, test, bank, config, per_image)
    rows += entropy_rows(model, (test[0][:n_searched], test[1][:n_searched]), config, per_image) if n_searched else []
    results = {"settings": {**vars(args), **asdict(config), "device": str(config.device), "placer": placer_path,
                            "against": against, "n_test": n, "n_searched": n_searched, "dataset": dataset.name,
                            "run": args.name or oracle.run_name(args.checkpoint), "n_bank": len(bank[1])},
               "choices": choices, "rows": rows, "validation_rows": val_rows,
               "comparisons": comparison_rows(per_image, reference_bits, choices, rows, config.seed)}
    for name, content in (("results.json", json.dumps(results, indent=2)), ("results.md", tables.results_markdown(results))):
        utils.write_atomic(Path(args.out) / name, content)
    utils.save_per_image(Path(args.out) / "per_image.npz", {**per_image, **{("val-" + k[0],) + k[1:]: v
                                                                             for k, v in val_bits.items()}})
    print(f"{content}\nwrote {args.out}/results.json, results.md and per_image.npz")
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
    images, start = uint8.float() / 255, train.draw_positions(args.search_from, uint8, *tokens, window,
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
        predicted = train.predict(model, uint8, positions, "cpu", len(uint8))[0].argmax(1).tolist()
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
    p = commands.add_parser("evaluate", allow_abbrev=False, help="the label-free rows, chosen on validation, "
                            "against oracle.py's evaluation of the same model", epilog="Every other flag is "
                            "oracle.py's (python oracle.py --help): --checkpoint, --out, --tokens, --search-limit, ...")
    p.add_argument("--placer", required=True, help="placer.pt written by experiments.placement")
    p.add_argument("--against", required=True, help="oracle.py's --out for the same checkpoint on the test split "
                   "(results.json + per_image.npz): its prior and oracle rows")
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
        return evaluate(args.placer, args.against, rest)
    args = parser.parse_args(argv)                # figure: no flag of anyone else's
    try:
        figure(args)
    except (ValueError, data.DataError) as error:      # a message for the user, not a bug
        parser.exit(2, f"{parser.prog} figure: error: {error}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

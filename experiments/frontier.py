"""
experiments/frontier.py -- does a label-free placement rise above the priors' accuracy-vs-compute
curve? The frontier evaluation, for any checkpoint.

SPoT (arXiv 2507.01654) shows that a frozen model is almost always right when its tokens are
well placed (SPoT-ON, the label oracle), and leaves open how to place them without the label.
Any label-free method spends compute to choose its placement (more forward passes, a search, a
saliency map), and compute could instead buy more tokens from a fixed prior. So the fair question
is not "does it beat the prior at N tokens?" but "does it beat the best prior at the SAME
compute?": the prior's accuracy-vs-compute curve is the frontier a method must rise above.

    FLOPs       compute(config, N): every operation of one SPoTViT forward pass at N tokens,
                counted from the config; backward_compute, search_compute (SPoT-ON),
                saliency_compute (spot.saliency_map), mlp_compute (a small head);
                compute_tokens(flops, config): FLOPs in tokens' worth (see token_fit)
    the curve   every prior's top-1 at every token count (--tokens), per image, read by
                train.predict through train.draw_positions (the project's one evaluation loop);
                with --learned PATH, layouts learned once for all images (experiments.layouts)
                are a prior too, "learned", at the counts they were learned for, and each is
                also a "learned-layout" row against the other priors (what learning gains)
    controls    at each per-pass budget N (--budgets), label-free unless marked: the best prior
                at 2N tokens; the best of K placements by max-softmax and by a normalised
                max-logit; the mean of two prior passes' logits; SPoT-ON's positions found for
                another image (a gain that is per image must lose them); SPoT-ON toward the
                class the model's first read predicts (label-free SPoT-ON's diagnostic: how
                much of the oracle's gain survives without the label); and two ceilings that
                read the label: oracle-of-K (right when any of K fixed placements is right) and
                SPoT-ON from the prior (oracle.oracle_search)
    designs     --glimpses PATH: experiments.glimpses' model (its own prior curve: a model
                fine-tuned for a design is judged against its own priors) and a "glimpses" row
                at each budget, at cost.glimpse_compute's FLOPs; --ranker PATH: a
                "glance-and-rank" row on the checkpoint's frozen model (experiments.ranker);
                --move PATH: a "learned-move" row (experiments.move), --sketch PATH: a
                "sketch" row (experiments.sketch) and its "sketch-shuffled" control (another
                image's placement); a model tuned with either is judged alone, as a glimpses
                model; --bank PATH: a "layout-bank" row (experiments.layouts: a sketch picks
                one of M learned layouts) and its "bank-shuffled" control
    rows        each against the best prior at no more compute: the curve's point of highest
                top-1 on the validation split (when the run has one) among those whose read
                costs at most the row's compute rounded up to a whole token's worth, on the same
                images, paired: the difference, its 95 % bootstrap interval and the exact test's
                verdict on "row > prior" (experiments/stats.py: McNemar's for right/wrong rows)

Writes OUT/frontier.json (rows, the curve, settings), OUT/frontier.md, OUT/frontier.png
(accuracy vs compute, log x) and OUT/per_image.npz (every row's right/wrong per image):

    python -m experiments.frontier --checkpoint runs/cifar10-spot/checkpoint.pt --split val \\
        --limit 2000 --search-limit 500 --out runs/cifar10-spot/frontier-val
    python -m experiments.frontier --checkpoint runs/cifar10-spot/checkpoint.pt --split test \\
        --out runs/cifar10-spot/frontier
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import oracle
import spot
import train
import utils
from experiments import cost, glimpses, layouts, move, ranker, sketch, stats


# -----------------------------------------------------------------------------
# What the frontier evaluation computes: its flags (each field made by utils.option is a flag)

option = utils.option
DEFAULT_TOKENS = (4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)


@dataclass
class FrontierConfig:
    """The settings of one frontier evaluation; frontier.json keeps them all."""
    checkpoint: str = option(None, "checkpoint.pt written by train.py", required=True)
    tokens: tuple = option(DEFAULT_TOKENS, "the prior curve's token counts ('all' = the grid); "
                           "2N of every --budgets is added")
    budgets: tuple = option((4, 8, 16, 32), "per-pass token budgets N of the controls")
    priors: tuple = option(spot.PRIORS, "priors on the curve",
                           type=utils.name_list(spot.PRIORS))
    k: tuple = option((2, 4, 8, 16, 20, 32), "K of best-of-K and oracle-of-K (K >= 2)")
    split: str = option("test", "test, or val: the images train.py --val-size held out; the "
                        "best prior is chosen on val when --split test", choices=("test", "val"))
    limit: int = option(None, "the first N images of --split, and of val to choose on",
                        type=oracle.ONE_OR_MORE)
    search_limit: int = option(None, "SPoT-ON and its shuffled control on the first N of those "
                               "(None: all; 0: neither)", type=oracle.COUNT)
    search_from: str = option("isotropic", "SPoT-ON's start", choices=spot.PRIORS)
    search_steps: int = option(oracle.DEFAULT_STEPS, "Adam steps of SPoT-ON", type=oracle.COUNT)
    search_lr: float = option(oracle.DEFAULT_LR, "Adam lr (normalized coordinates)",
                              type=oracle.POSITIVE)
    glimpses: str = option(None, "glimpses.pt of experiments.glimpses: evaluate its model (its "
                           "own prior curve) and add a 'glimpses' row at each --budgets")
    ranker: str = option(None, "ranker.pt of experiments.ranker: a 'glance-and-rank' row at "
                         "each --budgets it was trained for")
    move: str = option(None, "move.pt of experiments.move: a 'learned-move' row at each "
                       "--budgets (two passes of N tokens; a tuned model, as --glimpses)")
    sketch: str = option(None, "sketch.pt of experiments.sketch: a 'sketch' row at each "
                         "--budgets (a sketch, then one pass; a tuned model, as --glimpses)")
    learned: str = option(None, "learned.pt of experiments.layouts (--choices 1): its learned "
                          "fixed layouts join the curve as the prior 'learned' at their counts")
    bank: str = option(None, "bank.pt of experiments.layouts (--choices M > 1): a "
                       "'layout-bank' row at each --budgets it holds, and its shuffled control")
    batch_size: int = option(128, "images per forward pass", type=oracle.ONE_OR_MORE)
    seed: int = option(0, "seed of the position draws and the bootstrap", type=int)
    progress: bool = option(True, "tqdm bars", action=argparse.BooleanOptionalAction)
    device: str = "cpu"
    bf16: bool = False


# -----------------------------------------------------------------------------
# The prior curve, and the best prior at a given compute

def prior_cost(model_config, prior, n_tokens):
    """FLOPs of reading one image through `prior` at n_tokens: one forward pass, plus the
    saliency map for "salient" (drawing positions from the other priors is free)."""
    flops = cost.forward_flops(model_config, n_tokens)
    if prior == "salient":
        size = model_config.image_size
        flops += sum(cost.saliency_compute(size, model_config.in_chans).values())
    return flops


def prior_curve(model, split, counts, config, desc="curve"):
    """Every prior of config at every count -> {(prior, N): (n,) bool right/wrong} on split =
    (uint8 images, labels). One draw per prior and count, seeded as oracle.py's prior rows (draw
    0), so a row here is oracle.py's on the same images; "grid" stops at the grid's size."""
    n_grid = len(oracle.patch_grid(model))
    cells = [(p, n) for p in config.priors for n in counts if p != "grid" or n <= n_grid]
    curve = {}
    for prior, tokens in tqdm(cells, desc, leave=False, disable=not config.progress):
        seed = train.seed_for(config.seed, prior, tokens, "test")
        positions = train.draw_positions(prior, split[0], tokens, model.config.window, seed,
                                         config.device)
        curve[prior, tokens] = oracle.hits(model, split, positions, config)
    if config.learned:              # a layout learned once for all images is a prior too
        learned = layouts.load_bank(config.learned)[0]
        for tokens in learned.config.tokens:
            curve["learned", tokens] = layouts.learned_split(model, learned, split, tokens,
                                                             config.device, config.batch_size,
                                                             config.bf16)
    return curve


@dataclass
class Reference:
    """The prior side of every comparison: the curve on the evaluated images, the top-1 it is
    chosen by (on the validation split when the run has one), and what each point costs. It
    also collects every judged row's right/wrong per image (per_image)."""
    dataset: str
    model_config: spot.SPoTConfig
    curve: dict           # (prior, N) -> (n,) bool on the evaluated images
    chooser: dict         # (prior, N) -> top-1 on the images the best prior is chosen on
    chosen_on: str
    seed: int = 0

    def __post_init__(self):
        self.per_token = cost.token_fit(self.model_config)[0]       # a of the tokens' worth
        self.per_image = {("top1", "prior", p, n): v for (p, n), v in self.curve.items()}

    def cost(self, prior, tokens):
        """Tokens' worth of one read of an image through `prior` at `tokens`."""
        return prior_cost(self.model_config, prior, tokens) / self.per_token

    def best(self, compute):
        """The best prior (highest chooser top-1; on a tie the cheaper, then the first) among the
        curve's points that cost at most `compute` tokens' worth rounded up to a whole token ->
        (prior, N), or None when every point costs more."""
        limit = math.ceil(round(compute, 6)) + 1e-9
        return self.choose([key for key in self.curve if self.cost(*key) <= limit])

    def best_at(self, tokens):
        """The best prior among the curve's points at `tokens` -> (prior, tokens), or None."""
        return self.choose([key for key in self.curve if key[1] == tokens])

    def choose(self, points):
        if not points:
            return None
        return max(points, key=lambda key: (self.chooser[key], -self.cost(*key)))

    def frontier(self):
        """The curve the methods must rise above: per token count, the prior chosen there ->
        [{"tokens", "prior", "compute_tokens", "top1", "top1_low", "top1_high"}]."""
        out = []
        for tokens in sorted({n for _, n in self.curve}):
            prior = self.best_at(tokens)[0]
            correct = self.curve[prior, tokens]
            _, low, high = utils.bootstrap_interval(correct, seed=self.seed)
            out.append({"tokens": tokens, "prior": prior, "top1": stats.top1(correct),
                        "compute_tokens": self.cost(prior, tokens), "top1_low": low,
                        "top1_high": high})
        return out


def judge(reference, method, budget, correct, flops, label_free):
    """One row: `method` at per-pass budget N (`correct`: right/wrong on the first n evaluated
    images, `flops`: its cost per image) against the best prior at no more compute, on the same
    n images: their paired difference in points, its 95 % bootstrap interval and the exact
    test's verdict on "method > prior" (stats.paired) -> the row's dict."""
    worth = flops / reference.per_token
    n = len(correct)
    _, low, high = utils.bootstrap_interval(correct, seed=reference.seed)
    reference.per_image["top1", method, budget] = correct
    row = {"dataset": reference.dataset, "method": method, "budget": budget,
           "label_free": label_free, "compute_tokens": worth, "flops": flops,
           "top1": stats.top1(correct), "top1_low": low, "top1_high": high, "n_images": n,
           "chosen_on": reference.chosen_on}
    best = reference.best(worth)
    if best is None:       # cheaper than every point of the curve: nothing to compare with
        return {**row, **dict.fromkeys(("prior", "prior_tokens", "prior_compute_tokens",
                                        "prior_top1", "diff", "ci", "p", "test", "verdict"))}
    prior = reference.curve[best][:n]
    found = stats.paired(correct.numpy(), prior.numpy(), seed=reference.seed).scaled(100)
    return {**row, "prior": best[0], "prior_tokens": best[1],
            "prior_compute_tokens": reference.cost(*best), "prior_top1": stats.top1(prior),
            "diff": found.mean, "ci": [found.low, found.high], "p": found.p,
            "test": found.test, "verdict": found.verdict}


# -----------------------------------------------------------------------------
# The controls at each per-pass budget N

def normalised_max_logit(logits):
    """(n, classes) -> (n,): (max logit - mean logit) / std of the logits over the classes
    (population std): how far the top class stands out, in units of the logits' own spread.
    Unlike max-softmax it does not saturate when one logit is far ahead."""
    logits = logits.float()
    spread = logits.std(1, correction=0).clamp_min(1e-12)
    return (logits.amax(1) - logits.mean(1)) / spread


def candidate_reads(model, split, tokens, k_max, config):
    """k_max fixed placements of every image, each read once: the isotropic lattice, the centre
    lattice, then Sobol draws (experiments.label_free's candidates, seeded as there, so that its
    best-of-K is ours) -> (right (K, n), max-softmax (K, n), normalised max-logit (K, n),
    right of the mean of the first two passes' logits (n,))."""
    candidates = ["isotropic", "center"] + ["sobol"] * (k_max - 2)
    right, softmax, normalised, pair = [], [], [], 0
    for index, prior in enumerate(candidates):
        key = (prior, tokens, config.split) + ((index,) if prior == "sobol" else ())
        positions = train.draw_positions(prior, split[0], tokens, model.config.window,
                                         train.seed_for(config.seed, *key), config.device)
        logits = train.predict(model, split[0], positions, config.device, config.batch_size,
                               bf16=config.bf16)[0]                       # (n, classes)
        right.append(logits.argmax(1) == split[1])
        softmax.append(logits.softmax(1).amax(1))
        normalised.append(normalised_max_logit(logits))
        if index < 2:                                    # the mean of the first two passes
            pair = pair + logits / 2
    mean_right = pair.argmax(1) == split[1]
    return torch.stack(right), torch.stack(softmax), torch.stack(normalised), mean_right


def pick(right, score, k):
    """(K, n) right/wrong and scores -> (n,): right/wrong of each image's highest-scoring
    placement among the first k."""
    choice = score[:k].argmax(0, keepdim=True)                            # (1, n)
    return right[:k].gather(0, choice)[0]


def budget_rows(model, split, tokens, reference, config):
    """Every control and ceiling at per-pass budget `tokens` -> rows (judge)."""
    mc, pass_flops = model.config, cost.forward_flops(model.config, tokens)
    ks = sorted(k for k in config.k if k >= 2)
    right, softmax, normalised, mean_right = candidate_reads(model, split, tokens, max(ks),
                                                             config)
    rows = []
    double = reference.best_at(2 * tokens)
    if double is not None:
        rows.append(judge(reference, "best-prior-2n", tokens, reference.curve[double],
                          prior_cost(mc, double[0], 2 * tokens), True))
        rows[-1]["method_prior"] = double[0]          # the prior it reads at 2N
    for k in ks:
        for name, score in ("softmax", softmax), ("normlogit", normalised):
            rows.append(judge(reference, f"best-of-{k}-{name}", tokens, pick(right, score, k),
                              k * pass_flops, True))
    rows.append(judge(reference, "mean-logits-2", tokens, mean_right,
                      2 * pass_flops + 2 * mc.num_classes, True))
    for k in ks:
        rows.append(judge(reference, f"oracle-of-{k}", tokens, right[:k].any(0),
                          k * pass_flops, False))
    return rows + search_rows(model, split, tokens, reference, config)


def search_rows(model, split, tokens, reference, config):
    """SPoT-ON from the search_from prior's draw (oracle.py's start, the same seed) on the first
    config.search_limit images, and its shuffled control: image i read at the positions SPoT-ON
    found for image i - 1 (one pass; the search is paid by another image) -> rows."""
    m = len(split[1]) if config.search_limit is None else min(config.search_limit, len(split[1]))
    if m == 0 or (config.search_from == "grid" and tokens > len(oracle.patch_grid(model))):
        return []
    images, labels = split[0][:m], split[1][:m]
    seed = train.seed_for(config.seed, config.search_from, tokens, "test")
    start = train.draw_positions(config.search_from, images, tokens, model.config.window, seed,
                                 config.device)
    found = oracle.search_split(model, images, labels, start, config, "label",
                                f"SPoT-ON {tokens}T")
    mc = model.config
    search = sum(cost.search_compute(mc, tokens, config.search_steps).values())
    saliency = prior_cost(mc, config.search_from, tokens) - cost.forward_flops(mc, tokens)
    search += saliency                                      # the start's map, if it reads one
    rows = [judge(reference, "spot-on", tokens, oracle.hits(model, (images, labels), found,
                                                            config), search, False)]
    # The diagnostic of a label-free SPoT-ON: the same search toward the class the model's first
    # read predicts (its own answer, no label). Its first read is paid once more, to be safe.
    guess = train.predict(model, images, start, config.device, config.batch_size,
                          bf16=config.bf16)[0].argmax(1)                                 # (m,)
    itself = oracle.search_split(model, images, guess, start, config, "label",
                                 f"SPoT-ON, its own answer {tokens}T")
    rows.append(judge(reference, "spot-on-self", tokens,
                      oracle.hits(model, (images, labels), itself, config),
                      search + cost.forward_flops(mc, tokens), True))
    if m > 1:                                  # another image's positions need another image
        shuffled = found.roll(1, 0)            # image i <- the positions found for image i - 1
        rows.append(judge(reference, "spot-on-shuffled", tokens,
                          oracle.hits(model, (images, labels), shuffled, config),
                          cost.forward_flops(mc, tokens), True))
    return rows


# -----------------------------------------------------------------------------
# The whole evaluation

def glimpse_rows(placer):
    """A GlancePlacer of experiments.glimpses -> a function (model, split, tokens, reference,
    config) -> rows, for evaluate's `methods`: a label-free "glimpses" row at every budget N."""
    def rows(model, split, tokens, reference, config):
        right = glimpses.glimpse_split(model, placer, split, tokens, config.device,
                                       config.batch_size)[0]
        flops = sum(cost.glimpse_compute(model.config, placer.config, tokens).values())
        return [judge(reference, "glimpses", tokens, right, flops, True)]
    return rows


def rank_rows(head):
    """A GlanceRanker of experiments.ranker -> a function for evaluate's `methods`: a label-free
    "glance-and-rank" row at every budget N the ranker was trained for."""
    def rows(model, split, tokens, reference, config):
        if tokens not in head.banks:
            return []
        if head.dim != model.config.dim:
            raise ValueError("the ranker was trained on a model of another width")
        right = ranker.rank_split(model, head.to(config.device), split, tokens,
                                  config.device, config.batch_size)[0]
        flops = ranker.ranker_compute(model.config, tokens, head.glance_fraction,
                                      head.width, len(head.banks[tokens]))
        return [judge(reference, "glance-and-rank", tokens, right, sum(flops.values()), True)]
    return rows


def move_rows(head):
    """A MoveHead of experiments.move -> a function for evaluate's `methods`: a label-free
    "learned-move" row at every per-pass budget N (two passes of N tokens)."""
    def rows(model, split, tokens, reference, config):
        if head.config.dim != model.config.dim:
            raise ValueError("the move head was trained on a model of another width")
        right = move.move_split(model, head.to(config.device), split, tokens, config.device,
                                config.batch_size)[0]
        flops = sum(move.move_compute(model.config, head.config, tokens).values())
        return [judge(reference, "learned-move", tokens, right, flops, True)]
    return rows


def sketch_rows(head):
    """A SketchPlacer of experiments.sketch -> a function for evaluate's `methods`: a label-free
    "sketch" row at every budget N (the sketch, then one pass of N tokens), and its control
    "sketch-shuffled": image i read at the placement the sketch made for image i - 1, at the
    same cost. A gain that is per image must lose it; one a fixed layout gives keeps it."""
    def rows(model, split, tokens, reference, config):
        right, placed = sketch.sketch_split(model, head.to(config.device), split, tokens,
                                            config.device, config.batch_size)
        flops = sum(sketch.sketch_read_compute(model.config, head.config, tokens).values())
        shuffled = oracle.hits(model, split, placed.roll(1, 0), config)
        return [judge(reference, "sketch", tokens, right, flops, True),
                judge(reference, "sketch-shuffled", tokens, shuffled, flops, True)]
    return rows


def bank_rows(head):
    """A LayoutBank of experiments.layouts -> a function for evaluate's `methods`: a label-free
    "layout-bank" row at every budget N it holds (the sketch picks one of its M layouts, then
    one pass of N tokens), and its control "bank-shuffled": image i read at the layout chosen
    for image i - 1, at the same cost."""
    def rows(model, split, tokens, reference, config):
        if tokens not in head.config.tokens:
            return []
        right, chosen = layouts.bank_split(model, head.to(config.device), split, tokens,
                                           config.device, config.batch_size)
        flops = sum(layouts.bank_read_compute(model.config, head.config, tokens).values())
        index = torch.arange(len(chosen))                     # image i <- image i - 1's choice
        return [judge(reference, "layout-bank", tokens, right[index, chosen], flops, True),
                judge(reference, "bank-shuffled", tokens, right[index, chosen.roll(1)], flops,
                      True)]
    return rows


def learned_rows(reference):
    """Each learned layout of the curve as a method: a "learned-layout" row at its count, one
    pass, judged against the best of the other priors at no more compute (the curve less the
    learned layouts): what learning a fixed layout gains over the paper's priors."""
    learned = sorted(n for prior, n in reference.curve if prior == "learned")
    others = {key: v for key, v in reference.curve.items() if key[0] != "learned"}
    fixed = replace(reference, curve=others)           # its own per_image, from `others`
    rows = [judge(fixed, "learned-layout", n, reference.curve["learned", n],
                  prior_cost(reference.model_config, "learned", n), True) for n in learned]
    reference.per_image |= {key: v for key, v in fixed.per_image.items() if key[1] != "prior"}
    return rows


def curve_counts(config):
    """The curve's token counts: --tokens and 2N of every --budgets (the 2N control)."""
    return sorted(set(config.tokens) | {2 * n for n in config.budgets})


def evaluate(model, dataset, config, name=None, methods=()):
    """The frontier evaluation of `model` on config.split -> (results {"settings", "rows",
    "curve", "frontier"}, per_image {key tuple: (n,) bool} for utils.save_per_image).
    methods: functions (model, split, tokens, reference, config) -> rows, a design's rows at
    each budget beside the controls (glimpse_rows)."""
    split = getattr(dataset, config.split)
    evaluated = split.images[:config.limit], split.labels[:config.limit]
    counts = curve_counts(config)
    curve = prior_curve(model, evaluated, counts, config)
    if config.split == "test" and dataset.val is not None:
        val = dataset.val.images[:config.limit], dataset.val.labels[:config.limit]
        val_curve = prior_curve(model, val, counts, config, "curve (val)")
        chooser = {key: stats.top1(v) for key, v in val_curve.items()}
        chosen_on = f"val ({len(val[1])} images)"
    else:
        val_curve, chooser = {}, {key: stats.top1(v) for key, v in curve.items()}
        chosen_on = (f"{config.split}: the evaluated images themselves"
                     + (" (no validation split)" if config.split == "test" else "")
                     + ", which favours the prior")
    dataset_name = dataset.name if dataset.name != "folder" else (name or "folder")
    reference = Reference(dataset_name, model.config, curve, chooser, chosen_on, config.seed)
    rows = []
    for tokens in config.budgets:
        rows += budget_rows(model, evaluated, tokens, reference, config)
        for method in methods:
            rows += method(model, evaluated, tokens, reference, config)
    rows += learned_rows(reference)
    reference.per_image |= {("val-top1", "prior", p, n): v for (p, n), v in val_curve.items()}
    a, b = cost.token_fit(model.config)
    curve_rows = [{"prior": p, "tokens": n, "compute_tokens": reference.cost(p, n),
                   "top1": stats.top1(v), "chooser_top1": chooser[p, n]}
                  for (p, n), v in curve.items()]
    settings = {**asdict(config), "device": str(config.device), "dataset": dataset_name,
                "split": config.split, "n_images": len(evaluated[1]), "chosen_on": chosen_on,
                "model_config": asdict(model.config), "curve_tokens": counts,
                "tokens_worth": {"flops_per_token": a, "flops_besides_tokens": b,
                                 "offset_tokens": b / a, "fit": "least squares over N = 4..G",
                                 "forward_flops": {n: cost.forward_flops(model.config, n)
                                                   for n in counts}},
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__}
    return {"settings": settings, "rows": rows, "curve": curve_rows,
            "frontier": reference.frontier()}, reference.per_image


# -----------------------------------------------------------------------------
# Rendering: a markdown table and one figure

def markdown(results):
    """frontier.json -> markdown: the settings in a sentence, the prior curve (top-1 % per prior
    and count, and the best prior per count), then one line per row."""
    s, rows = results["settings"], results["rows"]
    worth = s["tokens_worth"]
    counts = s["curve_tokens"]
    lines = [f"# Frontier: {s['dataset']}, {s['split']} split, {s['n_images']} images",
             "", f"Compute in tokens' worth: FLOPs / {worth['flops_per_token']:,.0f} FLOPs per "
             f"token (a pass at N tokens = N {worth['offset_tokens']:+.2f}); the best prior at no "
             f"more compute (rounded up to a whole token) chosen on {s['chosen_on']}.", "",
             "| prior | " + " | ".join(map(str, counts)) + " |",
             "|---|" + "---|" * len(counts)]
    table = {(c["prior"], c["tokens"]): c["top1"] for c in results["curve"]}
    for prior in dict.fromkeys(c["prior"] for c in results["curve"]):
        cells = [stats.number(table[prior, n]) if (prior, n) in table else "n/a" for n in counts]
        lines.append(f"| {prior} | " + " | ".join(cells) + " |")
    best = {f["tokens"]: f for f in results["frontier"]}
    lines.append("| **best (chosen)** | " + " | ".join(
        f"{stats.number(best[n]['top1'])} {best[n]['prior']}" if n in best else "n/a"
        for n in counts) + " |")
    lines += ["", "| method | N | label-free | compute | images | top-1 | best prior at no more "
              "compute | its top-1 | method - prior [95 %] verdict |", "|---|" + "---|" * 8]
    for r in rows:
        versus = ("no prior costs as little", "", "") if r["prior"] is None else (
            f"{r['prior']} @ {r['prior_tokens']}", stats.number(r["prior_top1"]),
            f"{stats.signed(r['diff'], 1)} [{stats.signed(r['ci'][0], 1)}, "
            f"{stats.signed(r['ci'][1], 1)}] {r['verdict']} (p {r['p']:.3g})")
        cells = [r["method"], r["budget"], "yes" if r["label_free"] else "no (ceiling)",
                 f"{r['compute_tokens']:.1f}", r["n_images"], stats.number(r["top1"]), *versus]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


# Each row's family (matched in this order: a substring of its method) -> colour, marker, label
FAMILIES = {"best-prior": ("tab:gray", "s", "best prior at 2N"),
            "softmax": ("tab:blue", "o", "best of K by max-softmax"),
            "normlogit": ("tab:cyan", "D", "best of K by normalised max-logit"),
            "mean-logits": ("tab:green", "^", "mean logits of 2 prior passes"),
            "shuffled": ("tab:brown", "v", "positions found for another image"),
            "spot-on-self": ("tab:olive", "X", "SPoT-ON toward its own first answer"),
            "glimpses": ("tab:orange", "h", "glimpses (experiments.glimpses)"),
            "glance-and-rank": ("tab:pink", "p", "glance and rank (experiments.ranker)"),
            "learned-move": ("black", "d", "learned move (experiments.move)"),
            "sketch": ("gold", "8", "placed from a sketch (experiments.sketch)"),
            "layout-bank": ("teal", "H", "a layout of a bank, picked from a sketch "
                            "(experiments.layouts)"),
            "learned-layout": ("darkgreen", "s", "a learned fixed layout (a prior; "
                               "experiments.layouts)"),
            "oracle-of": ("tab:red", "P", "oracle of K (ceiling)"),
            "spot-on": ("tab:purple", "*", "SPoT-ON (ceiling)")}


def family(method):
    """A row's method -> its FAMILIES key (best-of-K by score, oracle-of-K, ...)."""
    return next(f for f in FAMILIES if f in method)


def draw(ax, front, rows, label="best prior (the frontier)", style="k-"):
    """On a matplotlib Axes: a frontier (the best prior at each count) as a line with its 95 %
    band, and every row a point with its 95 % interval: filled when label-free, hollow for the
    ceilings. A family already in the Axes' legend gets no second entry."""
    from matplotlib.ticker import FixedLocator, NullFormatter

    x = [f["compute_tokens"] for f in front]
    ax.plot(x, [f["top1"] for f in front], style, lw=1.5, label=label)
    ax.fill_between(x, [f["top1_low"] for f in front], [f["top1_high"] for f in front],
                    color=style[0], alpha=0.1, lw=0)
    seen = set(ax.get_legend_handles_labels()[1])
    for r in rows:
        color, marker, name = FAMILIES[family(r["method"])]
        ax.errorbar(r["compute_tokens"], r["top1"], color=color, marker=marker, ms=6,
                    yerr=[[r["top1"] - r["top1_low"]], [r["top1_high"] - r["top1"]]],
                    elinewidth=0.8, alpha=0.85, mfc=color if r["label_free"] else "white",
                    ls="none", label=None if name in seen else name)
        seen.add(name)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([2 ** i for i in range(-2, 21)]))  # 1, 2, 4, ...
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:g}")       # 16, not 1.6x10^1
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("compute per image, tokens' worth (FLOPs / marginal FLOPs per token)")
    ax.set_ylabel("top-1 %")
    ax.grid(alpha=0.3, which="both")


def figure(results, path):
    """One figure of a run, written to `path` (never a window): top-1 % vs compute in tokens'
    worth (log x), its frontier and every row (draw)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.2), layout="constrained")
    ax = fig.add_subplot()
    draw(ax, results["frontier"], results["rows"])
    s = results["settings"]
    ax.set_title(f"{s['dataset']} ({s['split']}, {s['n_images']} images); hollow markers read "
                 "the label; bars: 95 % intervals", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    utils.write_atomic(path, fig.savefig)
    return fig


# -----------------------------------------------------------------------------
# The command line: oracle.py's conventions (the same flags where they mean the same)

class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: 'python -m experiments.frontier: error: ...'."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every default shown and the description as written."""


def parse_args(argv=None):
    """The command line -> (parser, args): FrontierConfig's flags and utils.parse_eval_args's
    (--name, --data-dir, --device, --threads, --precision, --out), --device resolved and --out
    proven writable before any model or image is loaded."""
    paragraphs = __doc__.split("\n\n")
    parser = Parser(prog="python -m experiments.frontier", formatter_class=Formatter,
                    description="\n\n".join(paragraphs[1:3]),
                    epilog="\n\n".join(paragraphs[3:]))
    utils.add_fields(parser, FrontierConfig)
    add = parser.add_argument
    add("--name", help="a folder dataset's name in the rows (None: the data folder's name)")
    add("--data-dir", help="dataset folder (None: the one the checkpoint was trained on)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--threads", type=utils.int_at_least(1), help="CPU threads for torch (None: all cores)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="the model's forward (auto: bf16 on CUDA)")
    add("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    with utils.usage_errors(parser):
        args.device = utils.resolve_device(args.device)
        args.bf16 = utils.choose_precision(args.precision, args.device) == "bf16"
        utils.check_out_dir(args.out, "--out")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    return parser, args


def parse_k(text):
    """--k '2,4,8' -> (2, 4, 8); ValueError naming the flag unless every K is an int >= 2."""
    try:
        ks = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 2:
        raise ValueError(f"--k must be comma-separated ints >= 2, e.g. 2,4,8; got {text!r}")
    return tuple(ks)


def setup(argv=None):
    """Flags checked, then the checkpoint and its dataset loaded -> (args, model, dataset,
    FrontierConfig). Every bad flag or file is a one-line error (exit 2)."""
    parser, args = parse_args(argv)
    with utils.usage_errors(parser):
        args.k = parse_k(args.k)
        model, dataset, train_args = data.load_model_and_data(args.checkpoint, args.device,
                                                              args.data_dir, args.progress)
        args.data_dir = args.data_dir or train_args.get("data_dir")
        n_grid = len(oracle.patch_grid(model))
        args.tokens = tuple(utils.parse_tokens(args.tokens, n_grid))
        args.budgets = tuple(utils.parse_tokens(args.budgets, n_grid, "--budgets"))
        if 2 * max(args.budgets) > 4 * n_grid:
            raise ValueError(f"--budgets up to {max(args.budgets)}: the 2N control would read "
                             f"{2 * max(args.budgets)} tokens, more than 4x the grid ({n_grid})")
        if args.split == "val" and dataset.val is None:
            raise ValueError("--split val: this run held out no validation images (train.py "
                             "--val-size 0)")
        model, args.methods = load_designs(args, model)
    return args, model, dataset, utils.config_from(FrontierConfig, args)


def load_designs(args, model):
    """--glimpses, --ranker, --move, --sketch -> (the model to evaluate, evaluate's `methods`).
    A model fine-tuned for a design (glimpses.pt's; a move.pt or sketch.pt trained with --tune)
    replaces the checkpoint's and is judged alone, against its own priors; the other designs
    read the checkpoint's model. Raises ValueError naming the flag."""
    if args.glimpses and (args.ranker or args.move or args.sketch or args.learned or args.bank):
        raise ValueError("--glimpses replaces the checkpoint's model, which --ranker, --move, "
                         "--sketch, --learned and --bank read: evaluate them in separate runs")
    if args.glimpses:
        trained, placer = glimpses.load_glimpses(args.glimpses, args.device)
        return tuned(model, trained, "--glimpses", args), (glimpse_rows(placer),)
    designs = []                                     # (flag, rows function, tuned model or None)
    if args.ranker:
        designs.append(("--ranker", rank_rows(ranker.load_ranker(args.ranker)[0]), None))
    for flag, single in (("--learned", True), ("--bank", False)):
        path = getattr(args, flag[2:])
        if path and (layouts.load_bank(path)[0].config.choices == 1) != single:
            raise ValueError(f"{flag}: {path} holds " + ("a bank of several layouts per count: "
                             "pass it as --bank" if single else "one layout per count, a prior: "
                             "pass it as --learned"))
    if args.bank:
        designs.append(("--bank", bank_rows(layouts.load_bank(args.bank)[0]), None))
    for flag, module, rows in (("--move", move, move_rows), ("--sketch", sketch, sketch_rows)):
        path = getattr(args, flag[2:])
        if path:
            head, trained = getattr(module, f"load_{flag[2:]}")(path, args.device)
            designs.append((flag, rows(head), trained))
    for flag, _, trained in designs:
        if trained is not None and len(designs) > 1:
            raise ValueError(f"{flag}: {getattr(args, flag[2:])} holds a tuned model, which "
                             "replaces the checkpoint's that the other designs read: evaluate "
                             "them in separate runs")
        if trained is not None:
            model = tuned(model, trained, flag, args)
    return model, tuple(rows for _, rows, _ in designs)


def tuned(model, trained, flag, args):
    """A design's fine-tuned model, checked to be of the checkpoint's config -> trained."""
    if trained.config != model.config:
        raise ValueError(f"{flag}: {getattr(args, flag[2:])} holds a model of another config "
                         f"than --checkpoint's ({args.checkpoint})")
    return trained


def main(argv=None):
    """Entry point -> 0; writes OUT/frontier.json, frontier.md, frontier.png, per_image.npz."""
    args, model, dataset, config = setup(argv)
    name = args.name or (Path(args.data_dir).name if args.data_dir else None)
    results, per_image = evaluate(model, dataset, config, name, args.methods)
    # the thread count and CPU too: experiments.models check recomputes rows bit for bit
    results["settings"] |= {"out": args.out, "run": utils.run_name(args.checkpoint),
                            "threads": torch.get_num_threads(), "cpu": utils.cpu_name()}
    out = Path(args.out)
    utils.write_atomic(out / "frontier.json", json.dumps(results, indent=2))
    utils.write_atomic(out / "frontier.md", markdown(results))
    figure(results, out / "frontier.png")
    utils.save_per_image(out / "per_image.npz", per_image)
    print(markdown(results))
    print(f"wrote {out}/frontier.json, frontier.md, frontier.png and per_image.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
experiments/layouts.py -- beyond the paper: learned fixed layouts (a learned prior) and a bank of
them from which a sketch of the image picks one (a fifth design of the label-free frontier,
experiments/frontier.py).

The sketch placer (experiments.sketch) rose above the paper's priors, but its control showed why:
it moved the points of the uneven odd-count lattice to a better arrangement whatever the image.
A layout learned once for all images is a prior, so it belongs on the priors' curve before any
per-image method claims a gain over it. With --choices 1 this file learns exactly that:

    layout   N free points (y, x) in [0, 1]^2 per token count, starting at the isotropic
             lattice, learned end to end through the frozen model and the bilinear sampler
             (subpixel tokens: positions are differentiable) with the classification loss

With --choices M > 1 it learns M layouts per count that specialise, and a selector that picks
one per image from a sketch (placement.sketch_net: three convolutions on a --size px copy; a
linear layer on the map's mean: about a third of a token's worth):

    layouts  multiple choice learning: each training image's loss counts (almost) only for the
             layout that reads it best, so the layouts split the images among them
    select   the selector learns to name that layout from the sketch (cross-entropy)
    read     one pass of N tokens at the chosen layout

The bank competes with the priors at N (and the learned layouts among them); its per-image
control reads each image at the layout chosen for another. Training images train, validation
judges (every epoch: the chosen layout, every single layout of the bank, the oracle of the M,
the isotropic lattice, the same images); the test split is never read here. Writes
OUT/learned.pt (--choices 1) or OUT/bank.pt (plain tensors: load_bank), OUT/metrics.jsonl and
OUT/run.json; experiments.frontier reads them as --learned and --bank:

    python -m experiments.layouts --checkpoint results/cifar10-spot/model.pt --tokens 7,15,16 \\
        --train-limit 45000 --epochs 3 --out runs/c10-learned
    python -m experiments.layouts --checkpoint results/cifar10-spot/model.pt --tokens 7,15 \\
        --choices 4 --train-limit 45000 --epochs 3 --out runs/c10-bank
"""

import argparse
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import spot
import train
import utils
from experiments import cost, placement, stats


@dataclass
class BankConfig:
    """Everything that defines a LayoutBank."""
    tokens: tuple = (7, 15)    # the token counts N it holds layouts for
    choices: int = 1           # M layouts per count (1: a learned fixed layout, that is a prior)
    size: int = 16             # the selector's sketch side in pixels (a multiple of 4; M > 1)
    channels: int = 32         # the selector's feature channels
    spread: float = 0.5        # the layouts' initial jitter (M > 1), in lattice cells
    seed: int = 0              # the jitter's seed


class LayoutBank(nn.Module):
    """M learned layouts per token count, and (M > 1) a sketch selector that picks one per image."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        offsets = {}
        for n in config.tokens:
            # each layout is the lattice plus learned offsets: weight decay (train.make_optimizer
            # decays every matrix) pulls gently toward the lattice, never toward a corner. A
            # lattice cell is about 1 / sqrt(N) of the image; layout 0 starts as the lattice.
            jitter = torch.rand(config.choices, n, 2, generator=generator) - 0.5     # (M, N, 2)
            jitter[0] = 0
            offsets[str(n)] = nn.Parameter(config.spread * jitter / n ** 0.5)
        self.offsets = nn.ParameterDict(offsets)
        if config.choices > 1:
            self.features = placement.sketch_net(config.channels)
            self.select = nn.Linear(config.channels, config.choices * len(config.tokens))

    def bank(self, n_tokens):
        """The M layouts of a count -> (M, N, 2), (y, x) in [0, 1]."""
        if str(n_tokens) not in self.offsets:
            raise ValueError(f"n_tokens: this bank holds layouts for {self.config.tokens}, "
                             f"got {n_tokens}")
        offsets = self.offsets[str(n_tokens)]                                # (M, N, 2)
        return (spot.isotropic_positions(n_tokens).to(offsets) + offsets).clamp(0, 1)

    def scores(self, images, n_tokens):
        """images (B, C, H, W) in [0, 1] -> the selector's logits over the M layouts (B, M)."""
        maps = self.features(placement.downsample(images, self.config.size))    # (B, c, s/4, s/4)
        logits = self.select(maps.mean((2, 3)))                             # (B, T * M)
        logits = logits.view(len(images), len(self.config.tokens), self.config.choices)
        return logits[:, self.config.tokens.index(n_tokens)]                 # (B, M)

    def forward(self, images, n_tokens):
        """images (B, C, H, W) in [0, 1] -> positions (B, N, 2): the chosen layout per image."""
        bank = self.bank(n_tokens)                                           # (M, N, 2)
        if self.config.choices == 1:
            return bank.expand(len(images), -1, -1)
        return bank[self.scores(images, n_tokens).argmax(1)]


def bank_compute(bank_config, image_size):
    """FLOPs of choosing a layout for one image -> {operation: FLOPs}: nothing for a single
    layout; else the sketch's features (cost.sketch_compute) and the linear layer over the M
    layouts of one count."""
    if bank_config.choices == 1:
        return {}
    c, m = bank_config.channels, bank_config.choices
    return {**cost.sketch_compute(bank_config.size, c, image_size),
            "select": m * (2 * c + 1)}


def bank_read_compute(model_config, bank_config, n_tokens):
    """FLOPs of the whole design at N: the choice, then one pass at N tokens."""
    return {**bank_compute(bank_config, model_config.image_size),
            "read": cost.forward_flops(model_config, n_tokens)}


# -----------------------------------------------------------------------------
# Reading a split (uint8 images, labels) through the bank

@torch.no_grad()
def bank_split(model, head, split, n_tokens, device, batch_size):
    """Every image read at every layout of the count, and the selector's choice -> (right/wrong
    (n, M) bool, chosen (n,) long), on the CPU (the chosen layout's answer: right[i, chosen[i]])."""
    head.eval()
    right, chosen = [], []
    bank = head.bank(n_tokens)
    for start in range(0, len(split[1]), batch_size):
        images = split[0][start:start + batch_size].to(device).float().div_(255)
        labels = split[1][start:start + batch_size].to(device)
        hits = [model(images, layout.expand(len(images), -1, -1)).argmax(1) == labels
                for layout in bank]
        right.append(torch.stack(hits, 1).cpu())
        pick = (head.scores(images, n_tokens).argmax(1) if len(bank) > 1
                else torch.zeros_like(labels))                 # one layout: always layout 0
        chosen.append(pick.cpu())
    return torch.cat(right), torch.cat(chosen)


def place(model, head, images, n_tokens):
    """The design as a function: images (B, C, H, W) in [0, 1] -> positions (B, N, 2); the
    method's answer is model(images, place(...)). `model` is unused (the designs' place() alike)."""
    with torch.no_grad():
        return head.eval()(images, n_tokens)


# -----------------------------------------------------------------------------
# Training on training images (placement.train_head, the heads' one loop), judged on validation

RELAX = 0.05          # the share of each image's loss the layouts that lose it still learn from


def validate(model, head, split, budgets, device, batch_size):
    """Top-1 % on the same validation images, per N: the learned layout ("learned") or the
    bank's chosen one ("bank"), each layout of a bank alone ("layout0", ...), the oracle of its
    M, another image's choice ("shuffled") and the isotropic lattice; with the design's tokens'
    worth -> dict."""
    accuracy, name = {}, "learned" if head.config.choices == 1 else "bank"
    for n in budgets:
        right, chosen = bank_split(model, head, split, n, device, batch_size)
        rows = torch.arange(len(chosen))
        accuracy[f"val_{name}@{n}"] = stats.top1(right[rows, chosen])
        if head.config.choices > 1:
            accuracy[f"val_shuffled@{n}"] = stats.top1(right[rows, chosen.roll(1)])
            accuracy[f"val_oracle@{n}"] = stats.top1(right.any(1))
            for m in range(head.config.choices):
                accuracy[f"val_layout{m}@{n}"] = stats.top1(right[:, m])
        lattice = spot.isotropic_positions(n)
        accuracy[f"val_isotropic@{n}"] = stats.top1(placement.read_at(model, split, lattice,
                                                                      device, batch_size))
        flops = sum(bank_read_compute(model.config, head.config, n).values())
        accuracy[f"compute_tokens@{n}"] = cost.compute_tokens(flops, model.config)
    return accuracy


def step_loss(model, head, images, labels, args, generator, step):
    """One batch's loss at a count drawn from --tokens: the single layout's cross-entropy, or
    (M > 1) multiple choice learning, each image's loss weighted 1 - RELAX on the layout that
    reads it best and RELAX spread over the rest, plus the selector's cross-entropy toward it."""
    n_tokens = train.pick(args.tokens, generator)
    bank = head.bank(n_tokens)                                                # (M, N, 2)
    losses = torch.stack([F.cross_entropy(model(images, layout.expand(len(images), -1, -1)),
                                          labels, reduction="none") for layout in bank], 1)
    if len(bank) == 1:
        return losses.mean()
    best = losses.detach().argmin(1)                                          # (B,)
    weights = F.one_hot(best, len(bank)) * (1 - RELAX) + RELAX / len(bank)    # (B, M)
    select = F.cross_entropy(head.scores(images, n_tokens), best)
    return (weights * losses).sum(1).mean() + select


saved = placement.saved_head         # what learned.pt and bank.pt hold (train_head writes them)


def file_name(choices):
    """The file a run writes: learned.pt for one layout per count (a prior), else bank.pt."""
    return "learned.pt" if choices == 1 else "bank.pt"


def load_bank(path, map_location="cpu"):
    """learned.pt or bank.pt -> (LayoutBank in eval mode, None: the model stays frozen), read
    with weights_only=True (placement.load_head)."""
    def make(config):
        return LayoutBank(BankConfig(**{**config, "tokens": tuple(config["tokens"])}))
    return placement.load_head(path, make, "a layout bank written by experiments.layouts",
                               map_location)


load_learned = load_bank                 # experiments.models loads each kind by its name


def chosen_split(model, head, split, n_tokens, device, batch_size):
    """bank_split's answers at the chosen layouts -> (right/wrong (n,) bool, chosen (n,)): the
    frontier's "layout-bank" row, image by image."""
    right, chosen = bank_split(model, head, split, n_tokens, device, batch_size)
    return right[torch.arange(len(chosen)), chosen], chosen


def learned_split(model, head, split, n_tokens, device, batch_size, bf16=False):
    """A split read at a learned layout, as the frontier reads a prior (train.predict, the
    project's one evaluation loop) -> right/wrong (n,) bool."""
    return placement.read_at(model, split, head.bank(n_tokens)[0], device, batch_size, bf16)


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.layouts",
                                     description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="the frozen SPoT model (train.py's, with --val-size)")
    add("--tokens", default="7,15", help="token counts N (utils.parse_tokens; each >= 2)")
    add("--choices", type=utils.int_at_least(1), default=1,
        help="layouts per count (1: a learned fixed layout; more: a bank and its selector)")
    placement.add_sketch_flags(parser, "the selector's")
    add("--spread", type=utils.float_in(0), default=0.5,
        help="the layouts' initial jitter (lattice cells; layout 0 is the lattice)")
    placement.add_training_flags(parser)
    placement.add_common_flags(parser, "learned.pt or bank.pt, metrics.jsonl, run.json")
    parser.set_defaults(lr=1e-2)
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    placement.check_sketch_flags(parser, args)
    if args.tune:
        parser.error("--tune: a layout is learned for a frozen model (a tuned model would need "
                     "its own prior curve); leave it out")
    design = types.SimpleNamespace(FILE=file_name(args.choices), step_loss=step_loss,
                                   validate=validate, saved=saved)     # for train_head
    try:
        model, dataset = placement.load_frozen(args, design.FILE)
    except (ValueError, data.DataError) as error:
        parser.error(str(error))
    torch.manual_seed(args.seed)                                   # the selector's initial weights
    config = BankConfig(tuple(args.tokens), args.choices, args.size, args.channels, args.spread,
                        args.seed)
    head = LayoutBank(config).to(args.device)
    out = Path(args.out)
    placement.write_run_json(out, "experiments.layouts", argv, args)
    placement.train_head(model, head, dataset, args, out, design)
    print(f"wrote {out / design.FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

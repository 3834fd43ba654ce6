"""
experiments/ranker.py -- beyond the paper: glance and rank, a learned ranker over a fixed bank of
placements (design 1 of the label-free frontier, experiments/frontier.py).

SPoT (arXiv 2507.01654) leaves open how to place tokens without the label. Here nothing is
placed from scratch: a fixed bank of B candidate placements is chosen once, and a small MLP
learns which candidate suits an image from a cheap first look at it, in the spirit of learned
loss prediction for test-time augmentation (Kim et al., NeurIPS 2020: predict each augmentation's
loss, keep the lowest). At a budget of N = G + K tokens:

    pass 1   the class token and G glance tokens (a farthest-point subset of the N-point
             isotropic lattice, placement.split_lattice) through every block; each block's keys
             and values are kept (glimpses.run_blocks)
    rank     the MLP (LayerNorm, Linear, GELU, Linear) reads pass 1's normed class token and
             scores the B candidates of the bank, each a set of K positions
    pass 2   a second class token and the K tokens of the best-scored candidate through every
             block, attending to pass 1's cached keys and values as in experiments/glimpses.py;
             the head reads pass 2's class token, which has seen all N tokens

So a ranked read costs about one N-token pass (ranker_compute), and no label goes in. Candidate
0 is the rest of the isotropic lattice: with it alone the method is exactly the glimpses reading
of the lattice with an untrained placer.

    the bank    grown greedily on the VALIDATION split from a pool of seeded candidates
                (candidate_pool: the lattice's rest, the K-point lattice, the centre prior,
                scaled and shifted rests, Sobol and uniform draws): candidate 0 first, then each
                time the candidate that most raises the share of images at least one chosen
                candidate reads right (the oracle-of-bank coverage; grow_bank)
    the ranker  trained, model frozen, on the first --train-limit TRAINING images only: pass 1's
                class token and every candidate's cross-entropy are read once (no_grad), then
                the MLP fits softmax(-loss / --temperature) with a soft cross-entropy
    the report  on the validation split (never test): the isotropic prior at N, candidate 0,
                the ranker's pick, the best single candidate, best-of-bank by max-softmax (B
                passes, a control) and the oracle of the bank (reads the label, a ceiling). The
                bank was chosen on these images, so its oracle and best single are optimistic.

Writes OUT/ranker.pt (plain tensors and numbers: load_ranker), OUT/metrics.json, OUT/run.json:

    python -m experiments.ranker --checkpoint runs/cifar10-spot/checkpoint.pt --tokens 8,16 \\
        --bank 16 --pool 128 --train-limit 20000 --epochs 30 --threads 2 --out runs/c10-ranker
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import spot
import train
import utils
from experiments import cost, glimpses, placement, stats

SCALES = (0.7, 0.85, 1.1)     # the lattice's rest scaled about the image centre by these factors
RANKER_BATCH = 256            # rows per AdamW step of the ranker


# -----------------------------------------------------------------------------
# Two passes: the glance, then one candidate of the bank reading on from its cache

def split_budget(n_tokens, glance_fraction):
    """N -> (glance (G, 2), rest (K, 2)): the N-point lattice split as the glimpses split it."""
    return placement.split_lattice(n_tokens, placement.glance_size(n_tokens, glance_fraction))


def first_pass(model, images, glance):
    """images (B, C, H, W) in [0, 1], glance (G, 2) -> (pass 1's normed class token (B, dim),
    its (k, v) per block)."""
    points = glance.to(images.device).expand(len(images), -1, -1)             # (B, G, 2)
    first, memory = glimpses.read(model, images, points)                      # (B, 1 + G, dim)
    return first[:, 0], memory


def second_pass(model, images, memory, positions):
    """positions (B, K, 2) read on from pass 1's memory -> logits (B, classes)."""
    return model.forward_head(glimpses.read(model, images, positions, memory)[0])


def scorer(dim, width, bank):
    """The ranker at one budget: pass 1's class token (B, dim) -> a score per candidate
    (B, bank)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU(),
                         nn.Linear(width, bank))


class GlanceRanker(nn.Module):
    """Per budget N: a bank (B, K, 2) of candidate placements, shared by every image, and the
    scorer that picks one of them from pass 1's class token."""

    def __init__(self, dim, width, glance_fraction):
        super().__init__()
        self.dim, self.width, self.glance_fraction = dim, width, glance_fraction
        self.scorers = nn.ModuleDict()
        self.banks = {}                                       # N -> (B, K, 2), on the CPU

    def add(self, n_tokens, bank):
        """A bank (B, K, 2) at budget N, with a new scorer (torch's global seed draws it)."""
        self.banks[n_tokens] = bank.float().cpu()
        self.scorers[str(n_tokens)] = scorer(self.dim, self.width, len(bank))

    def forward(self, features, n_tokens):
        """features (B, dim) -> scores (B, bank) at budget N."""
        return self.scorers[str(n_tokens)](features)


def ranked_read(model, ranker, images, n_tokens):
    """Glance, rank, read on -> (logits (B, classes), glance (G, 2), the chosen candidate (B,))."""
    glance, _ = split_budget(n_tokens, ranker.glance_fraction)                # (G, 2)
    features, memory = first_pass(model, images, glance)
    choice = ranker(features, n_tokens).argmax(1)                              # (B,)
    chosen = ranker.banks[n_tokens].to(images.device)[choice]                  # (B, K, 2)
    return second_pass(model, images, memory, chosen), glance, choice


def place(model, ranker, images, n_tokens):
    """Glance, rank, read on -> (logits (B, classes), positions (B, N, 2): the G glance points,
    then the K points of the chosen candidate). No label goes in."""
    logits, glance, choice = ranked_read(model, ranker, images, n_tokens)
    chosen = ranker.banks[n_tokens].to(images.device)[choice]                  # (B, K, 2)
    glance = glance.to(images.device).expand(len(images), -1, -1)             # (B, G, 2)
    return logits, torch.cat([glance, chosen], dim=1)


@torch.no_grad()
def rank_split(model, ranker, split, n_tokens, device, batch_size):
    """The ranked read over a split (uint8 images, labels) in batches -> (right/wrong (n,) bool,
    the chosen candidate (n,) long), on the CPU."""
    model.eval()
    ranker.eval()
    right, choices = [], []
    for start in range(0, len(split[1]), batch_size):
        images = split[0][start:start + batch_size].to(device).float().div_(255)
        logits, _, choice = ranked_read(model, ranker, images, n_tokens)
        right.append(logits.argmax(1).cpu() == split[1][start:start + batch_size])
        choices.append(choice.cpu())
    return torch.cat(right), torch.cat(choices)


@torch.no_grad()
def read_bank(model, split, glance, candidates, device, batch_size, progress=False):
    """Pass 1 once per image, pass 2 once per candidate, on split = (uint8 images (n, C, H, W),
    labels (n,)) -> CPU tensors {"features": pass 1's normed class token (n, dim); per
    candidate and image (C, n): "loss" (cross-entropy), "right" (bool), "confidence"
    (max-softmax)}."""
    model.eval()
    read = {"features": [], "loss": [], "right": [], "confidence": []}
    starts = range(0, len(split[1]), batch_size)
    for start in tqdm(starts, f"{len(candidates)} candidates", disable=not progress, leave=False):
        images = split[0][start:start + batch_size].to(device).float().div_(255)
        labels = split[1][start:start + batch_size].to(device)
        features, memory = first_pass(model, images, glance)
        logits = torch.stack([second_pass(model, images, memory, c.expand(len(images), -1, -1))
                              for c in candidates.to(device)])                 # (C, B, classes)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(candidates)),
                               reduction="none")                               # (C * B,)
        read["features"].append(features.float().cpu())
        read["loss"].append(loss.view(len(candidates), -1).float().cpu())
        read["right"].append((logits.argmax(-1) == labels).cpu())
        read["confidence"].append(logits.float().softmax(-1).amax(-1).cpu())
    dims = {"features": 0, "loss": 1, "right": 1, "confidence": 1}
    return {key: torch.cat(value, dims[key]) for key, value in read.items()}


# -----------------------------------------------------------------------------
# The bank: a pool of seeded candidates, grown greedily for coverage on validation images

def candidate_pool(model_config, n_tokens, n_glance, size, seed=0):
    """`size` deterministic candidate sets of K = N - G positions -> (size, K, 2): the lattice's
    rest (candidate 0), the K-point lattice, the centre prior, the rest scaled about the centre
    (SCALES) and shifted by a quarter of a lattice cell (8 directions), then Sobol and uniform
    draws in turn (spot.sample_positions, a generator seeded by seed and N)."""
    _, rest = placement.split_lattice(n_tokens, n_glance)                      # (K, 2)
    k = len(rest)
    lattice = spot.isotropic_positions(k)                                      # (K, 2)
    step = 0.25 / round(math.sqrt(n_tokens))                 # a quarter of the N-lattice's cell
    shifts = [rest + rest.new_tensor([dy, dx]) * step
              for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    scaled = [0.5 + (rest - 0.5) * s for s in SCALES]
    fixed = torch.stack([rest, lattice, spot.center_warp(lattice), *scaled, *shifts]).clamp(0, 1)
    missing = size - len(fixed)
    if missing <= 0:
        return fixed[:size]
    generator = torch.Generator().manual_seed(train.seed_for(seed, "ranker-pool", n_tokens))
    half = (missing + 1) // 2
    draw = [spot.sample_positions(prior, half, k, model_config.image_size, model_config.window,
                                  generator=generator) for prior in ("sobol", "uniform")]
    drawn = torch.stack(draw, dim=1).flatten(0, 1)[:missing]         # sobol, uniform, sobol, ...
    return torch.cat([fixed, drawn])


def grow_bank(right, size):
    """right (P, n) bool: each pool candidate's right/wrong per image -> the pool indices of a
    bank of min(size, P): candidate 0, then each time the candidate that most raises coverage
    (the share of images some chosen candidate reads right); ties go to the candidate's own
    accuracy, then to the earlier in the pool."""
    chosen, covered = [0], right[0].clone()                                    # (n,)
    hits = right.sum(1)                                                        # (P,)
    while len(chosen) < min(size, len(right)):
        gain = (right & ~covered).sum(1)                                       # (P,)
        best = max((i for i in range(len(right)) if i not in chosen),
                   key=lambda i: (int(gain[i]), int(hits[i]), -i))
        chosen.append(best)
        covered |= right[best]
    return chosen


def coverage(right, bank):
    """% of images that at least one of the bank's first 1, 2, ..., B candidates reads right."""
    return [100 * right[bank[:j]].any(0).float().mean().item() for j in range(1, len(bank) + 1)]


# -----------------------------------------------------------------------------
# Training the ranker on cached features and losses (the model stays frozen)

def fit_scorer(ranker, features, losses, epochs=30, lr=1e-3, temperature=0.3, seed=0,
               progress=False):
    """AdamW (weight decay 0.01) on `ranker` (features (n, dim) -> scores (n, B)) so that
    softmax(scores) matches softmax(-losses / temperature), losses (n, B): the cross-entropy
    between the two, in batches of RANKER_BATCH -> the mean loss of every epoch."""
    target = (-losses / temperature).softmax(1)                                # (n, B)
    optimizer = torch.optim.AdamW(ranker.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    ranker.train()
    history = []
    for _ in tqdm(range(epochs), "ranker", disable=not progress, leave=False):
        total = 0.0
        for batch in torch.randperm(len(features), generator=generator).split(RANKER_BATCH):
            loss = F.cross_entropy(ranker(features[batch]), target[batch])    # soft targets
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        history.append(total / len(features))
    return history


def fit_budget(model, ranker, dataset, n_tokens, args):
    """At budget N: the pool read on validation, the bank grown, the ranker trained on the
    training images, everything judged on validation -> the budget's report (a dict)."""
    glance, _ = split_budget(n_tokens, args.glance_fraction)
    pool = candidate_pool(model.config, n_tokens, len(glance), args.pool, args.seed)
    val = (dataset.val.images, dataset.val.labels)
    seen = read_bank(model, val, glance, pool, args.device, args.batch_size, args.progress)
    bank = grow_bank(seen["right"], args.bank)
    torch.manual_seed(train.seed_for(args.seed, "ranker", n_tokens))      # the scorer's weights
    ranker.add(n_tokens, pool[bank])
    part = dataset.train.take(slice(0, args.train_limit))
    cached = read_bank(model, (part.images, part.labels), glance, pool[bank], args.device,
                       args.batch_size, args.progress)
    history = fit_scorer(ranker.scorers[str(n_tokens)], cached["features"], cached["loss"].T,
                         args.epochs, args.lr, args.temperature, args.seed, args.progress)
    ranked, choice = rank_split(model, ranker, val, n_tokens, args.device, args.batch_size)
    report = val_report(model, val, n_tokens, seen, bank, args)
    return {**report, "ranker": stats.top1(ranked), "train_loss": history,
            "ranker_choices": torch.bincount(choice, minlength=len(bank)).tolist()}


def val_report(model, val, n_tokens, seen, bank, args):
    """Top-1 % on validation of the isotropic prior at N (one pass), candidate 0, the best single
    candidate, best-of-bank by max-softmax and the oracle of the bank, with the bank's pool
    indices, its coverage curve and the tokens' worth of one ranked read."""
    lattice = spot.isotropic_positions(n_tokens).expand(len(val[1]), n_tokens, 2)
    prior = train.predict(model, val[0], lattice, args.device, args.batch_size)[0]
    right, confidence = seen["right"][bank], seen["confidence"][bank]         # (B, n)
    flops = ranker_compute(model.config, n_tokens, args.glance_fraction, args.width, len(bank))
    return {"glance": placement.glance_size(n_tokens, args.glance_fraction),
            "isotropic": stats.top1(prior.argmax(1) == val[1]),
            "candidate0": stats.top1(right[0]),
            "best_single": 100 * right.float().mean(1).max().item(),
            "best_of_bank_softmax": stats.top1(right.gather(0, confidence.argmax(0)[None])[0]),
            "oracle_of_bank": stats.top1(right.any(0)),
            "bank": bank, "bank_coverage": coverage(seen["right"], bank),
            "compute_tokens": cost.compute_tokens(sum(flops.values()), model.config)}


# -----------------------------------------------------------------------------
# Compute

def ranker_compute(model_config, n_tokens, glance_fraction, width, bank):
    """FLOPs of one ranked read of one image at N = G + K tokens -> {operation: FLOPs}: pass 1
    (its head, which is skipped, counted too), pass 2, pass 2's attention to pass 1's cached keys
    and values (as cost.glimpse_compute), and the ranker (its LayerNorm and MLP)."""
    g, d = placement.glance_size(n_tokens, glance_fraction), model_config.dim
    norm = cost.LAYERNORM * d + cost.LAYERNORM_ROW
    mlp = sum(cost.mlp_compute([d, width, bank]).values())
    return {"glance": cost.forward_flops(model_config, g),
            "second": cost.forward_flops(model_config, n_tokens - g),
            "cross_attention": cost.cross_attention(model_config, n_tokens - g + 1, g + 1),
            "ranker": norm + mlp}


# -----------------------------------------------------------------------------
# Saving and loading: plain tensors and numbers (torch.load with weights_only=True)

def saved(ranker, args):
    """What ranker.pt holds: the banks and scorers per budget, the settings, the checkpoint."""
    config = {"dim": ranker.dim, "width": ranker.width, "glance_fraction": ranker.glance_fraction,
              "tokens": sorted(ranker.banks), "bank": args.bank, "pool": args.pool,
              "train_limit": args.train_limit, "epochs": args.epochs, "lr": args.lr,
              "temperature": args.temperature, "seed": args.seed}
    return {"config": config, "checkpoint": str(args.checkpoint),
            "banks": {n: bank.clone() for n, bank in ranker.banks.items()},
            "scorers": {n: ranker.scorers[str(n)].state_dict() for n in ranker.banks}}


def from_saved(state):
    """ranker.pt's dict -> a GlanceRanker in eval mode, on the CPU."""
    config = state["config"]
    ranker = GlanceRanker(config["dim"], config["width"], config["glance_fraction"])
    for n, bank in state["banks"].items():
        ranker.add(int(n), bank)
        ranker.scorers[str(n)].load_state_dict(state["scorers"][n])
    return ranker.eval()


def load_ranker(path):
    """ranker.pt -> (GlanceRanker in eval mode, the saved dict). Read with weights_only=True:
    a file someone sends you cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ranker = from_saved(state)
    except Exception as error:                 # truncated, not a ranker, another format, ...
        raise ValueError(f"{path} is not a ranker written by experiments.ranker "
                         f"({type(error).__name__}: {error})") from None
    return ranker, state


# -----------------------------------------------------------------------------
# Command line

COLUMNS = (("isotropic", "isotropic"), ("candidate0", "candidate 0"), ("ranker", "ranker"),
           ("best_single", "best single"), ("best_of_bank_softmax", "best-of-B softmax"),
           ("oracle_of_bank", "oracle of B"))


def table(report):
    """{N: budget report} -> a small text table of validation top-1 %."""
    names = [name for _, name in COLUMNS] + ["tokens' worth"]
    lines = [f"{'N':>4}  {'G+K':>7}  " + "  ".join(names)]
    for n, r in report.items():
        values = [r[key] for key, _ in COLUMNS] + [r["compute_tokens"]]
        cells = "  ".join(f"{v:{len(name)}.2f}" for v, name in zip(values, names))
        split = f"{r['glance']}+{n - r['glance']}"
        lines.append(f"{n:4d}  {split:>7}  {cells}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.ranker",
                             description=__doc__.split("\n\n")[0].strip(),
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="the frozen SPoT model (train.py's, with --val-size)")
    add("--tokens", default="8,16", help="budgets N (utils.parse_tokens; each >= 2)")
    add("--glance-fraction", type=utils.float_in(0, 1, low_open=True, high_open=True),
        default=0.5, help="G = round(fraction * N) glance tokens, the rest from the bank")
    add("--bank", type=utils.int_at_least(2), default=16, help="B, candidates in the bank")
    add("--pool", type=utils.int_at_least(2), default=128, help="candidates the bank is grown from")
    add("--width", type=utils.int_at_least(1), default=128, help="the ranker's hidden width")
    add("--train-limit", type=utils.int_at_least(1), default=20000,
        help="the first N training images train the ranker")
    add("--epochs", type=utils.int_at_least(1), default=30)
    add("--lr", type=utils.float_in(0, low_open=True), default=1e-3, help="AdamW lr")
    add("--temperature", type=utils.float_in(0, low_open=True), default=0.3,
        help="the targets: softmax(-loss / temperature) over the bank")
    add("--batch-size", type=utils.int_at_least(1), default=256, help="images per forward pass")
    placement.add_common_flags(parser, "ranker.pt, metrics.json, run.json")
    return parser, parser.parse_args(argv)


def setup(parser, args):
    """The frozen model and its data, every input checked -> (model, dataset)."""
    try:
        if args.pool < args.bank:
            raise ValueError(f"--pool {args.pool} holds fewer candidates than --bank {args.bank}")
        model, dataset = placement.load_frozen(args, "ranker.pt")
    except (ValueError, data.DataError) as error:
        parser.error(str(error))
    return model.requires_grad_(False).eval(), dataset


def main(argv=None):
    parser, args = parse_args(argv)
    model, dataset = setup(parser, args)
    out = Path(args.out)
    placement.write_run_json(out, "experiments.ranker", argv, args)
    ranker = GlanceRanker(model.config.dim, args.width, args.glance_fraction)
    report = {}
    for n_tokens in args.tokens:
        report[n_tokens] = fit_budget(model, ranker, dataset, n_tokens, args)
        utils.write_atomic(out / "ranker.pt", saved(ranker, args))
    settings = {**saved(ranker, args)["config"], "checkpoint": str(args.checkpoint)}
    metrics = {"settings": settings, "split": "val", "n_images": len(dataset.val.labels),
               "budgets": {str(n): r for n, r in report.items()}}
    utils.write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    print(table(report))
    print(f"wrote {out / 'ranker.pt'} and {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

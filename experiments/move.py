"""
experiments/move.py -- beyond the paper: label-free SPoT-ON as a learned move (design 2 of the
label-free frontier, experiments/frontier.py).

SPoT-ON (arXiv 2507.01654) moves every token down the gradient of the true label's loss, and a
few moved tokens then read an image better than many fixed ones. Without the label, SPoT-ON
toward the model's own first answer keeps that answer (frontier.py's "spot-on-self" row), so
here the move is learned instead, from what the model saw at the first read:

    pass 1   the frozen model reads N tokens at the isotropic lattice
    move     a small MLP reads each output token beside the class token (as the model's final
             norm leaves them) and predicts that token's displacement, at most --max-shift of the
             image (tanh); its last layer starts at zero, so an untrained head moves nothing
    pass 2   the model reads the N moved tokens afresh, and its head answers; with --reuse, its
             queries also attend to pass 1's keys and values, block by block (experiments/
             glimpses.py's cache), so pass 2's class token has seen all 2N reads

Two N-token passes and the head cost about 2N tokens' worth (move_compute; --reuse adds pass 2's
attention to pass 1), so the move at N competes with the priors at 2N. With --reuse an untrained
head reads every token twice, and keys and values that appear twice weigh as once: it is then
exactly the N-token prior. The head learns end to end through the frozen model and the
bilinear sampler (subpixel tokens: positions are differentiable) with the classification loss on
the first --train-limit training images: the label trains the head, as it drives SPoT-ON, but
never enters at test time. With --tune the model learns too (retrofitting the move into it, as
experiments/glimpses.py does): every other batch it reads a training prior as train.py does, so
the tuned weights still read the priors, and their own prior curve is the method's baseline.
Every epoch ends with validation (the move, the isotropic prior at N and at 2N, the same images);
the test split is never read here. Writes OUT/move.pt (plain
tensors: load_move), OUT/metrics.jsonl and OUT/run.json:

    python -m experiments.move --checkpoint results/cifar10-spot/model.pt --tokens 4,8 \\
        --train-limit 45000 --epochs 5 --reuse --out runs/c10-move-reuse
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import spot
import train
import utils
from experiments import cost, glimpses, placement, stats


@dataclass
class MoveConfig:
    """Everything that defines a MoveHead."""
    dim: int = 192             # the backbone's token width
    width: int = 128           # the MLP's hidden width
    max_shift: float = 0.25    # largest move of a token, image units (the image is [0, 1]^2)
    reuse: bool = False        # pass 2 attends to pass 1's keys and values too


class MoveHead(nn.Module):
    """Pass 1's output tokens -> where each token should have been read.

    Token i's features (its own output token and the class token, side by side) go through an
    MLP to a displacement d_i; the new position is p_i + max_shift * tanh(d_i), kept inside the
    image. The class token carries what the model made of the whole image, the token what it saw
    at p_i; together they can say "the object lies to your left".
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        dim, width = config.dim, config.width
        self.mlp = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, width), nn.GELU(),
                                 nn.Linear(width, width), nn.GELU(), nn.Linear(width, 2))
        nn.init.zeros_(self.mlp[-1].weight)            # an untrained head moves nothing
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, tokens, positions):
        """tokens (B, 1 + N, dim): pass 1's normed output, class token first; positions (B, N, 2)
        where pass 1 read -> moved positions (B, N, 2) in [0, 1]."""
        cls = tokens[:, :1].expand(-1, tokens.shape[1] - 1, -1)                   # (B, N, dim)
        features = torch.cat([tokens[:, 1:], cls], dim=-1)                        # (B, N, 2 dim)
        shift = self.config.max_shift * torch.tanh(self.mlp(features))            # (B, N, 2)
        return (positions + shift).clamp(0, 1)


def move(model, head, images, n_tokens):
    """Read, move, read again: images (B, C, H, W) in [0, 1] -> (logits (B, classes) of pass 2,
    the moved positions (B, N, 2)). No label goes in."""
    lattice = spot.isotropic_positions(n_tokens).to(images.device)
    lattice = lattice.expand(len(images), n_tokens, 2)                           # (B, N, 2)
    # pass 1 does not depend on the head: it has something to learn only when the model does
    first_pass = torch.enable_grad if model.training else torch.no_grad
    if not head.config.reuse:
        with first_pass():
            first = model.forward_features(images, lattice)      # (B, 1 + N, D), normed
        moved = head(first, lattice)
        return model(images, moved), moved
    with first_pass():
        first, memory = glimpses.read(model, images, lattice)               # (B, 1 + N, D)
    moved = head(first, lattice)
    second, _ = glimpses.read(model, images, moved, memory)                 # (B, 1 + N, D)
    return model.forward_head(second), moved


@torch.no_grad()
def move_split(model, head, split, n_tokens, device, batch_size):
    """move() over a split (uint8 images, labels) in batches -> (right/wrong (n,) bool, moved
    positions (n, N, 2)), on the CPU."""
    head.eval()
    right, positions = [], []
    for start in range(0, len(split[1]), batch_size):
        images = split[0][start:start + batch_size].to(device).float().div_(255)
        logits, moved = move(model, head, images, n_tokens)
        right.append(logits.argmax(1).cpu() == split[1][start:start + batch_size])
        positions.append(moved.cpu())
    return torch.cat(right), torch.cat(positions)


def place(model, head, images, n_tokens):
    """The design as a function: images (B, C, H, W) in [0, 1] -> the N positions pass 2 reads
    (B, N, 2). The method's answer is move()'s logits: without reuse, model(images, place(...))
    too; with it, pass 2 also attends to pass 1."""
    with torch.no_grad():
        return move(model, head.eval(), images, n_tokens)[1]


# -----------------------------------------------------------------------------
# Compute

def move_compute(model_config, head_config, n_tokens):
    """FLOPs of one move on one image at N tokens -> {operation: FLOPs}: pass 1 (its head,
    which move() skips, counted too), the MoveHead (its LayerNorm, MLP, tanh, scale and add),
    pass 2 and, with reuse, pass 2's attention to pass 1's keys and values (N + 1 queries and
    N + 1 cached keys per block: cost.cross_attention)."""
    d, w, t = model_config.dim, head_config.width, n_tokens + 1
    head = n_tokens * (cost.LAYERNORM * 2 * d + cost.LAYERNORM_ROW + 2 * 3)
    head += sum(cost.mlp_compute([2 * d, w, w, 2], rows=n_tokens).values())
    return {"first": cost.forward_flops(model_config, n_tokens), "head": head,
            "second": cost.forward_flops(model_config, n_tokens),
            "cross_attention": cost.cross_attention(model_config, t, t) if head_config.reuse
            else 0}


# -----------------------------------------------------------------------------
# Training the head on training images (placement.train_head, the heads' one loop; the model
# stays frozen unless --tune), judged on validation

FILE = "move.pt"

def validate(model, head, split, budgets, device, batch_size):
    """Top-1 % on the same validation images of the move at each N and of the isotropic prior
    at N and 2N (train.predict, the one evaluation loop), with the move's tokens' worth -> dict."""
    accuracy = {}
    for n in budgets:
        right = move_split(model, head, split, n, device, batch_size)[0]
        accuracy[f"val_move@{n}"] = stats.top1(right)
        for tokens in (n, 2 * n):
            right = placement.read_at(model, split, spot.isotropic_positions(tokens), device,
                                      batch_size)
            accuracy[f"val_isotropic@{tokens}"] = stats.top1(right)
        flops = sum(move_compute(model.config, head.config, n).values())
        accuracy[f"compute_tokens@{n}"] = cost.compute_tokens(flops, model.config)
    return accuracy


def step_loss(model, head, images, labels, args, generator, step):
    """One batch's loss: the move at a budget drawn from --tokens; with --tune, every other batch
    instead reads a prior drawn from --train-priors (train.train_step's draw)."""
    n_tokens = train.pick(args.tokens, generator)
    if not args.tune or step % 2 == 0:
        return F.cross_entropy(move(model, head, images, n_tokens)[0], labels)
    return placement.prior_loss(model, images, labels, args.train_priors, n_tokens, generator)


saved = placement.saved_head             # what move.pt holds (train_head writes it)


def load_move(path, map_location="cpu"):
    """move.pt -> (MoveHead in eval mode, the tuned SPoTViT in eval mode or None when the model
    stayed frozen), read with weights_only=True (placement.load_head)."""
    return placement.load_head(path, lambda config: MoveHead(MoveConfig(**config)),
                               "a move head written by experiments.move", map_location)


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.move",
                             description=__doc__.split("\n\n")[0].strip(),
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="the frozen SPoT model (train.py's, with --val-size)")
    add("--tokens", default="4,8", help="tokens per pass N (utils.parse_tokens; each >= 2)")
    add("--width", type=utils.int_at_least(1), default=128, help="the head's hidden width")
    add("--max-shift", type=utils.float_in(0, 1, low_open=True), default=0.25,
        help="largest move of a token (image units)")
    add("--reuse", action="store_true", help="pass 2 attends to pass 1's keys and values too")
    placement.add_training_flags(parser)
    placement.add_common_flags(parser, "move.pt, metrics.jsonl, run.json")
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        model, dataset = placement.load_frozen(args, "move.pt")
    except (ValueError, data.DataError) as error:
        parser.error(str(error))
    torch.manual_seed(args.seed)                                   # the head's initial weights
    config = MoveConfig(model.config.dim, args.width, args.max_shift, args.reuse)
    head = MoveHead(config).to(args.device)
    out = Path(args.out)
    placement.write_run_json(out, "experiments.move", argv, args)
    placement.train_head(model, head, dataset, args, out, sys.modules[__name__])
    print(f"wrote {out / 'move.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

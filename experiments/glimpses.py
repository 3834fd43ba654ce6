"""
experiments/glimpses.py -- beyond the paper: sequential glimpses that do not waste the first read.

Placing tokens without the label (the open problem of arXiv 2507.01654) costs compute, and the
fair yardstick is the prior's accuracy at the same compute (experiments/frontier.py). The
glance-then-place head of experiments/placement.py reads G tokens, then the model reads all
N = G + K once more: G + N token reads. Here the second read reuses the first, as a KV cache:

    pass 1   the class token and the G glance tokens (a farthest-point subset of the N-point
             isotropic lattice, placement.split_lattice) through every block, attending among
             themselves; each block's keys and values are kept
    place    placement.GlancePlacer reads pass 1's output tokens and moves the K other points
    pass 2   a second class token and the K placed tokens through every block: their queries
             attend to their own keys and values and to pass 1's, block by block
    predict  the head reads pass 2's class token, which has seen all N tokens

The model computes G + 1 + K + 1 = N + 2 token rows, about one N-token pass (plus the head's
few FLOPs), so a glimpse at N competes with the priors at about N tokens. Pass 1's tokens never
attend to pass 2's (attention is causal between the two groups), which a model trained with full
attention has never met. Two ways to meet it:

    --freeze       the model stays as trained, only the head learns (end to end through the
                   bilinear sampler: positions are differentiable); cheap, the first experiment
    (default)      model and head are fine-tuned together (retrofitting the policy into the model),
                   every other batch read through the training priors as train.py reads it, so
                   the same weights still read the priors: their curve is the method's baseline

Every epoch ends with validation (glimpses and the isotropic prior at each budget, same images);
the test split is never read here. Writes OUT/glimpses.pt (the model and the head, weights only),
OUT/metrics.jsonl and OUT/run.json:

    python -m experiments.glimpses --checkpoint runs/cifar10-spot/checkpoint.pt --tokens 8,16 \\
        --freeze --epochs 2 --out runs/c10-glimpses-frozen
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import spot
import train
import utils
from experiments import placement


# -----------------------------------------------------------------------------
# Two passes, the second attending to the first's keys and values

def embed(model, images, positions):
    """images (B, C, H, W) in [0, 1], positions (B, N, 2) -> (B, 1 + N, dim): the class token
    and the N tokens, as SPoTViT.forward_features builds them before its blocks."""
    config = model.config
    images = (images - model.image_mean) / model.image_std
    windows = spot.extract_patches(images, positions, config.window)          # (B, N, C, k, k)
    tokens = model.patch_embed(windows.flatten(2)) + model.pos_embed(positions)   # (B, N, dim)
    cls = model.cls_token.expand(len(tokens), -1, -1)                         # (B, 1, dim)
    return torch.cat([cls, tokens], dim=1)


def run_blocks(model, x, memory=None):
    """x (B, T, dim) through every block; its queries attend to its own keys and values and to
    memory's (per block: (k, v) of earlier tokens, each (B, heads, T', dim / heads)) -> (x after
    the last block, before the final norm; this pass's (k, v) per block)."""
    cache = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).unflatten(-1, (3, attn.heads, -1))    # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                 # (B, h, T, d) each
        cache.append((k, v))
        if memory is not None:                   # the earlier tokens' keys and values first
            k = torch.cat([memory[index][0], k], dim=2)                      # (B, h, T' + T, d)
            v = torch.cat([memory[index][1], v], dim=2)
        read = spot.attention(q, k, v)                                       # (B, h, T, d)
        x = x + attn.proj(read.transpose(1, 2).flatten(2))
        x = x + block.mlp(block.norm2(x))
    return x, cache


def read(model, images, positions, memory=None):
    """One pass of two: the class token and the tokens at positions (B, N, 2) through every
    block, attending to memory too (run_blocks) -> (tokens (B, 1 + N, dim) after the final norm,
    this pass's (k, v) per block)."""
    x, cache = run_blocks(model, embed(model, images, positions), memory)
    return model.norm(x), cache


def glimpse(model, placer, images, n_tokens):
    """Glance, place, read on -> (logits (B, classes), positions (B, N, 2): the G glance points,
    then the K placed ones). No label goes in."""
    n_glance = placement.glance_size(n_tokens, placer.config.glance_fraction)
    glance, base = placement.split_lattice(n_tokens, n_glance)            # (G, 2), (K, 2)
    glance = glance.to(images.device).expand(len(images), -1, 2)          # (B, G, 2)
    first, memory = read(model, images, glance)                           # (B, 1 + G, dim)
    placed = placer(first, base.to(images.device))                        # (B, K, 2)
    second, _ = read(model, images, placed, memory)                       # (B, 1 + K, dim)
    logits = model.forward_head(second)
    return logits, torch.cat([glance, placed], dim=1)


@torch.no_grad()
def glimpse_split(model, placer, split, n_tokens, device, batch_size):
    """glimpse() over a split (uint8 images, labels) in batches -> (right/wrong (n,) bool,
    positions (n, N, 2)), on the CPU."""
    model.eval()
    placer.eval()
    right, positions = [], []
    for start in range(0, len(split[1]), batch_size):
        images = split[0][start:start + batch_size].to(device).float().div_(255)
        logits, where = glimpse(model, placer, images, n_tokens)
        right.append(logits.argmax(1).cpu() == split[1][start:start + batch_size])
        positions.append(where.cpu())
    return torch.cat(right), torch.cat(positions)


# -----------------------------------------------------------------------------
# Training: the head alone (--freeze), or the head and the model together (args.tune), in
# placement.train_head, the heads' one loop

FILE = "glimpses.pt"

def validate(model, placer, split, budgets, device, batch_size):
    """Top-1 % of glimpses and of the isotropic prior (one full pass, train.predict) at each
    budget, on the same validation images -> dict."""
    accuracy = {}
    for n in budgets:
        right = glimpse_split(model, placer, split, n, device, batch_size)[0]
        lattice = spot.isotropic_positions(n).expand(len(split[1]), n, 2)
        logits = train.predict(model, split[0], lattice, device, batch_size)[0]
        accuracy[f"val_glimpses@{n}"] = 100 * right.float().mean().item()
        accuracy[f"val_isotropic@{n}"] = 100 * (logits.argmax(1) == split[1]).float().mean().item()
    return accuracy


def step_loss(model, placer, images, labels, args, generator, step):
    """One batch's loss: glimpses at a budget drawn from --tokens; with the model trained, every
    other batch instead reads a prior drawn from --train-priors (train.train_step's draw)."""
    n_tokens = train.pick(args.tokens, generator)
    if not args.tune or step % 2 == 0:
        return F.cross_entropy(glimpse(model, placer, images, n_tokens)[0], labels)
    return placement.prior_loss(model, images, labels, args.train_priors, n_tokens, generator)


def saved(placer, args, epoch, model):
    """What glimpses.pt holds: plain tensors and numbers (read back with weights_only=True)."""
    return {"model_config": asdict(model.config), "model": model.state_dict(),
            "placer_config": asdict(placer.config), "placer": placer.state_dict(),
            "args": {"checkpoint": args.checkpoint, "tokens": list(args.tokens),
                     "freeze": args.freeze}, "epoch": epoch}


def load_glimpses(path, map_location="cpu"):
    """glimpses.pt -> (model, placer), both in eval mode."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = spot.SPoTViT(spot.SPoTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    placer = placement.GlancePlacer(placement.PlacerConfig(**state["placer_config"]))
    placer.load_state_dict(state["placer"])
    return model.to(map_location).eval(), placer.to(map_location).eval()


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.glimpses",
                                     description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="the SPoT model to start from (train.py's)")
    add("--tokens", default="8,16", help="budgets N (utils.parse_tokens; each >= 2)")
    add("--glance-fraction", type=utils.float_in(0, 1, low_open=True, high_open=True),
        default=0.5, help="G = round(fraction * N) glance tokens, the rest are placed")
    add("--freeze", action="store_true", help="train the head only; the model stays as it is")
    add("--train-priors", default=",".join(spot.PRIORS), type=utils.name_list(spot.PRIORS),
        help="the priors of the model's other batches (without --freeze)")
    add("--width", type=utils.int_at_least(4), default=128, help="the head's width")
    add("--max-shift", type=utils.float_in(0, 1, low_open=True), default=0.5,
        help="largest move of a placed token from its lattice point (image units)")
    add("--train-limit", type=utils.int_at_least(1),
        help="the first N training images train the head (none: all)")
    add("--epochs", type=utils.int_at_least(1), default=2)
    add("--warmup-epochs", type=utils.float_in(0), default=0.2)
    add("--batch-size", type=utils.int_at_least(1), default=128)
    add("--lr", type=utils.float_in(0, low_open=True), default=3e-4, help="peak AdamW lr")
    placement.add_common_flags(parser, "glimpses.pt, metrics.jsonl, run.json")
    return parser, parser.parse_args(argv)


def setup(parser, args):
    """The model, its data and a new head, every input checked -> (model, placer, dataset)."""
    try:
        model, dataset = placement.load_frozen(args, "glimpses.pt")
        config = model.config
        torch.manual_seed(args.seed)                                # the head's initial weights
        placer = placement.GlancePlacer(placement.PlacerConfig(
            config.image_size, config.window, config.dim, args.width,
            glance_fraction=args.glance_fraction, max_shift=args.max_shift)).to(args.device)
    except (ValueError, data.DataError) as error:
        parser.error(str(error))
    return model, placer, dataset


def main(argv=None):
    parser, args = parse_args(argv)
    model, placer, dataset = setup(parser, args)
    out = Path(args.out)
    args.tune = not args.freeze                       # placement.train_head's switch
    placement.write_run_json(out, "experiments.glimpses", argv, args)
    placement.train_head(model, placer, dataset, args, out, sys.modules[__name__])
    print(f"wrote {out / 'glimpses.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

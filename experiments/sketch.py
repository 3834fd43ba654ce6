"""
experiments/sketch.py -- beyond the paper: tokens placed from a sketch of the whole image (a
fourth design of the label-free frontier, experiments/frontier.py).

The other designs look at the image through the model itself: a glance of a few of its tokens
(experiments.placement, .glimpses, .ranker) or a whole first pass (experiments.move), and a pass
of the model is what they then cannot afford. Here the look is a tiny convolutional network on a
low-resolution copy of the whole image, far cheaper than one token of the model:

    sketch   the image, area-downsampled to --size x --size pixels (B, 3, s, s)
    features three 3x3 convolutions (the last two stride 2) -> a feature map (B, C, s/4, s/4)
    place    each point of the N-point isotropic lattice (or of the --start layout) reads the
             map where it lies (bilinear) beside the map's mean, and an MLP moves it by at most
             --max-shift of the image (tanh; its last layer starts at zero, so an untrained
             placer is its start)
    read     the model reads the N placed tokens once, and answers

One pass at N tokens plus the sketch (sketch_compute: about a third of a token's worth at the
defaults, on CIFAR-10's model and on Imagenette's), so the design at N competes with the priors
at N, where a glance or a second pass would have bought more tokens instead. The placer learns
end to end through the frozen model and the bilinear sampler (subpixel tokens: positions are
differentiable) with the classification loss on the first --train-limit training images; with
--tune the model learns too (every other batch a training prior, as experiments.move --tune),
and the tuned model's own prior curve is then the baseline. With --start LEARNED.PT the points
start from a layout learned for all images (experiments.layouts) instead of the lattice: what
the placer then gains can only be per image. Every epoch ends with validation (the sketch
placement, the isotropic prior at N and at N + 1, the start layout, the same images); the test
split is never read here. Writes OUT/sketch.pt (plain tensors: load_sketch), OUT/metrics.jsonl and
OUT/run.json:

    python -m experiments.sketch --checkpoint results/cifar10-spot/model.pt --tokens 7,15 \\
        --train-limit 45000 --epochs 5 --out runs/c10-sketch
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
from experiments import cost, layouts, placement, stats


@dataclass
class SketchConfig:
    """Everything that defines a SketchPlacer."""
    size: int = 16             # the sketch's side in pixels (a multiple of 4)
    channels: int = 32         # the feature map's channels (the first convolution has half)
    width: int = 64            # the MLP's hidden width
    max_shift: float = 0.25    # largest move of a token (image units: the image is [0, 1]^2)
    start: dict = None         # {"N": [[y, x], ...]}: a learned layout to move from (None: the
                               # isotropic lattice), kept as plain numbers in the saved config


class SketchPlacer(nn.Module):
    """A low-resolution image -> where each of N tokens should be read."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config.channels
        self.features = placement.sketch_net(c)
        self.mlp = nn.Sequential(nn.Linear(2 * c + 2, config.width), nn.GELU(),
                                 nn.Linear(config.width, 2))
        nn.init.zeros_(self.mlp[-1].weight)            # an untrained placer moves nothing
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, images, n_tokens):
        """images (B, C, H, W) in [0, 1] -> positions (B, N, 2), (y, x) in [0, 1]."""
        maps = self.features(placement.downsample(images, self.config.size))    # (B, c, s/4, s/4)
        lattice = self.start_positions(n_tokens).to(images.device)    # (N, 2) (y, x): the start
        lattice = lattice.expand(len(images), n_tokens, 2)                     # (B, N, 2)
        # grid_sample reads at (x, y) in [-1, 1] (align_corners=False: -1 is the image's edge,
        # as 0 is for our positions): each lattice point reads the map where it lies
        grid = (2 * lattice.flip(-1) - 1)[:, None]                             # (B, 1, N, 2)
        local = F.grid_sample(maps, grid, align_corners=False)[:, :, 0]        # (B, c, N)
        pooled = maps.mean((2, 3))[:, :, None].expand_as(local)                # (B, c, N)
        features = torch.cat([local, pooled], 1).transpose(1, 2)               # (B, N, 2c)
        shift = self.config.max_shift * torch.tanh(self.mlp(torch.cat([features, lattice], -1)))
        return (lattice + shift).clamp(0, 1)


    def start_positions(self, n_tokens):
        """Where the N points start, (N, 2): the learned layout of --start, or the lattice."""
        if self.config.start:
            return torch.tensor(self.config.start[str(n_tokens)])
        return spot.isotropic_positions(n_tokens)


def sketch_compute(head_config, image_size, n_tokens):
    """FLOPs of the sketch and the placement of N tokens on one image -> {operation: FLOPs}:
    cost.sketch_compute, the bilinear reads (4 weights per channel and point), the MLP, the tanh,
    scale and add."""
    c = head_config.channels
    mlp = cost.mlp_compute([2 * c + 2, head_config.width, 2], rows=n_tokens)
    return {**cost.sketch_compute(head_config.size, c, image_size),
            "reads": n_tokens * c * 2 * 4, "mlp": sum(mlp.values()), "place": n_tokens * 2 * 3}


def sketch_read_compute(model_config, head_config, n_tokens):
    """FLOPs of the whole design at N: the sketch and placement, then one pass at N tokens."""
    return {**sketch_compute(head_config, model_config.image_size, n_tokens),
            "read": cost.forward_flops(model_config, n_tokens)}


@torch.no_grad()
def sketch_split(model, head, split, n_tokens, device, batch_size):
    """Place and read a split (uint8 images, labels) in batches -> (right/wrong (n,) bool,
    positions (n, N, 2)), on the CPU."""
    head.eval()
    right, positions = [], []
    for start in range(0, len(split[1]), batch_size):
        images = split[0][start:start + batch_size].to(device).float().div_(255)
        placed = head(images, n_tokens)
        logits = model(images, placed)
        right.append(logits.argmax(1).cpu() == split[1][start:start + batch_size])
        positions.append(placed.cpu())
    return torch.cat(right), torch.cat(positions)


def place(model, head, images, n_tokens):
    """The design as a function: images (B, C, H, W) in [0, 1] -> positions (B, N, 2); the
    method's answer is model(images, place(...)). `model` is unused: the sketch does not need it
    (the argument keeps the designs' place() alike)."""
    with torch.no_grad():
        return head.eval()(images, n_tokens)


# -----------------------------------------------------------------------------
# Training on training images (placement.train_head, the heads' one loop), judged on validation

FILE = "sketch.pt"

def validate(model, head, split, budgets, device, batch_size):
    """Top-1 % on the same validation images of the sketch placement at each N, of the
    isotropic prior at N and N + 1 and of the --start layout (if any), with the design's tokens'
    worth -> dict."""
    accuracy = {}
    for n in budgets:
        accuracy[f"val_sketch@{n}"] = stats.top1(sketch_split(model, head, split, n, device,
                                                              batch_size)[0])
        starts = {f"isotropic@{t}": spot.isotropic_positions(t) for t in (n, n + 1)}
        if head.config.start:
            starts[f"start@{n}"] = head.start_positions(n)
        for name, layout in starts.items():
            right = placement.read_at(model, split, layout, device, batch_size)
            accuracy[f"val_{name}"] = stats.top1(right)
        flops = sum(sketch_read_compute(model.config, head.config, n).values())
        accuracy[f"compute_tokens@{n}"] = cost.compute_tokens(flops, model.config)
    return accuracy


def step_loss(model, head, images, labels, args, generator, step):
    """One batch's loss at a budget drawn from --tokens; with --tune every other batch reads a
    training prior instead (placement.prior_loss)."""
    n_tokens = train.pick(args.tokens, generator)
    if not args.tune or step % 2 == 0:
        return F.cross_entropy(model(images, head(images, n_tokens)), labels)
    return placement.prior_loss(model, images, labels, args.train_priors, n_tokens, generator)


saved = placement.saved_head             # what sketch.pt holds (train_head writes it)


def load_sketch(path, map_location="cpu"):
    """sketch.pt -> (SketchPlacer in eval mode, the tuned SPoTViT in eval mode or None when the
    model stayed frozen), read with weights_only=True (placement.load_head)."""
    return placement.load_head(path, lambda config: SketchPlacer(SketchConfig(**config)),
                               "a sketch placer written by experiments.sketch", map_location)


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.sketch",
                                     description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="the frozen SPoT model (train.py's, with --val-size)")
    add("--tokens", default="7,15", help="tokens N (utils.parse_tokens; each >= 2)")
    placement.add_sketch_flags(parser, "the placer's")
    add("--width", type=utils.int_at_least(1), default=64, help="the MLP's hidden width")
    add("--max-shift", type=utils.float_in(0, 1, low_open=True), default=0.25,
        help="largest move of a token (image units)")
    add("--start", help="learned.pt of experiments.layouts: move from its layouts (none: the "
        "isotropic lattice)")
    placement.add_training_flags(parser)
    placement.add_common_flags(parser, "sketch.pt, metrics.jsonl, run.json")
    return parser, parser.parse_args(argv)


def start_layouts(path, counts):
    """--start: a learned.pt -> {"N": its layout of N points as [[y, x], ...]} for each count;
    ValueError naming the flag when it is a bank or lacks a count."""
    learned = layouts.load_learned(path)[0]
    if learned.config.choices != 1 or not set(counts) <= set(learned.config.tokens):
        raise ValueError(f"--start: {path} holds {learned.config.choices} layout(s) per count "
                         f"for {learned.config.tokens}; one per count of --tokens {counts} is "
                         "needed (experiments.layouts --choices 1)")
    return {str(n): learned.bank(n)[0].tolist() for n in counts}


def main(argv=None):
    parser, args = parse_args(argv)
    placement.check_sketch_flags(parser, args)
    try:
        model, dataset = placement.load_frozen(args, "sketch.pt")
        start = args.start and start_layouts(args.start, args.tokens)
    except (ValueError, data.DataError) as error:
        parser.error(str(error))
    torch.manual_seed(args.seed)                                   # the placer's initial weights
    config = SketchConfig(args.size, args.channels, args.width, args.max_shift, start)
    head = SketchPlacer(config).to(args.device)
    out = Path(args.out)
    placement.write_run_json(out, "experiments.sketch", argv, args)
    placement.train_head(model, head, dataset, args, out, sys.modules[__name__])
    print(f"wrote {out / 'sketch.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

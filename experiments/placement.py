"""
experiments/placement.py -- beyond the paper: label-free token placement, learned ("glance,
then place").

The open problem of arXiv 2507.01654 is closing the gap to the oracle without labels: SPoT-ON
shows how much a few well-placed tokens can do, but it needs the label. Here a frozen SPoT model
places its own tokens, with no label at test time, in the spirit of PS-ViT's progressive sampling:

    1. glance  read G of the N points of the isotropic lattice (a fixed, image-independent
               prior), spread out by farthest-point sampling;
    2. place   a small head reads the glance's output tokens and moves the other K = N - G
               lattice points: one query per point, each attending to the glance and moving its
               point by up to `max_shift` of the image;
    3. read    the same frozen model reads all N = G + K tokens and predicts.

An untrained head moves nothing, so it starts as exactly the N-token isotropic prior.

Every token the model reads counts toward the budget: a 16-token "glance, then place" reads
4 + 12 tokens and is compared with 16-token priors. Its compute is one forward pass at G tokens
plus one at N (experiments.label_free reports the multiple of one N-token pass). The head learns
from the training split's labels with the classification loss, end to end *through the bilinear
sampler* (subpixel tokens: positions are differentiable), which is what SPoT makes possible; the
backbone never changes, so the gain over a prior is due to placement alone.

    python -m experiments.placement --checkpoint runs/cifar10-spot/checkpoint.pt --tokens 8,16 \
        --out runs/cifar10-placer
    python -m experiments.label_free evaluate --checkpoint runs/cifar10-spot/checkpoint.pt \
        --placer runs/cifar10-placer/placer.pt --out runs/cifar10-label-free
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import spot
import train
import utils


@dataclass
class PlacerConfig:
    """Everything that defines a GlancePlacer (the backbone's fields are copied from its config)."""
    image_size: tuple = (32, 32)   # the backbone's (H, W)
    window: int = 4                # the backbone's k
    dim: int = 192                 # the backbone's token width
    width: int = 128               # the head's width (divisible by 4 and by heads)
    heads: int = 4
    glance_fraction: float = 0.25  # G = round(fraction * N), at least 1 and at most N - 1
    max_shift: float = 0.5         # largest move of a placed token from its base point, image units

    def __post_init__(self):      # (the command line checks the fraction and the shift)
        self.image_size = utils.to_hw(self.image_size)
        if self.width % 4 or self.width % self.heads:
            raise ValueError(f"width must be divisible by 4 and by heads={self.heads}, "
                             f"got {self.width}")


def glance_size(n_tokens, fraction):
    """G, the tokens of the glance out of a budget of N (N >= 2: at least one is placed)."""
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be >= 2 to glance and place, got {n_tokens}")
    return min(n_tokens - 1, max(1, round(fraction * n_tokens)))


class GlancePlacer(nn.Module):
    """The placement head: glance tokens -> K positions, one per point of a base lattice.

    Each base point becomes a query (its sin-cos position embedding, projected); the queries
    attend to the glance's output tokens (class token included) and an MLP turns what they read
    into a shift of their point. The last layer starts at zero, so an untrained head places its
    tokens exactly on the base lattice: it starts as the isotropic prior and learns away from it.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        width = config.width
        self.query = nn.Linear(width, width)
        self.norm = nn.LayerNorm(config.dim)
        self.key_value = nn.Linear(config.dim, 2 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, 2))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, glance_tokens, base):
        """glance_tokens (B, 1 + G, dim): the frozen model's output tokens for the glance;
        base (K, 2): the lattice the placed tokens start from -> positions (B, K, 2) in [0, 1]."""
        config = self.config
        B, K, heads = len(glance_tokens), len(base), config.heads
        embed = spot.sincos_pos_embed(base[None], config.width, config.image_size, config.window)
        query = self.query(embed).expand(B, K, -1)                                    # (B, K, W)
        key, value = self.key_value(self.norm(glance_tokens)).chunk(2, dim=-1)        # (B, 1+G, W)
        split = lambda t: t.reshape(B, t.shape[1], heads, -1).transpose(1, 2)       # (B, h, T, W/h)
        read = F.scaled_dot_product_attention(split(query), split(key), split(value))
        x = query + self.proj(read.transpose(1, 2).reshape(B, K, -1))                 # (B, K, W)
        shift = config.max_shift * torch.tanh(self.mlp(x))                            # (B, K, 2)
        return (base + shift).clamp(0, 1)


def split_lattice(n_tokens, n_glance):
    """The N-point isotropic lattice split into (glance (G, 2), base (N - G, 2)).

    The glance points are picked by farthest-point sampling (first the point nearest the centre,
    then each time the point farthest from those picked), so a glance of a few tokens still
    covers the image; the rest of the lattice is the base the head moves.
    """
    lattice = spot.isotropic_positions(n_tokens)                                     # (N, 2)
    picked = [int((lattice - 0.5).norm(dim=1).argmin())]
    distance = (lattice - lattice[picked[0]]).norm(dim=1)                           # (N,)
    for _ in range(n_glance - 1):
        picked.append(int(distance.argmax()))
        distance = torch.minimum(distance, (lattice - lattice[picked[-1]]).norm(dim=1))
    rest = [i for i in range(n_tokens) if i not in picked]
    return lattice[picked], lattice[rest]


def place(model, placer, images, n_tokens):
    """Glance, then place: images (B, C, H, W) in [0, 1] -> positions (B, N, 2), the G glance
    positions first. No label goes in; the model reads G tokens here and the caller N."""
    glance, base = split_lattice(n_tokens, glance_size(n_tokens, placer.config.glance_fraction))
    glance = glance.to(images.device).expand(len(images), -1, 2)                   # (B, G, 2)
    with torch.no_grad():                     # the glance is fixed: nothing to learn through it
        glance_tokens = model.forward_features(images, glance)                    # (B, 1 + G, D)
    return torch.cat([glance, placer(glance_tokens, base.to(images.device))], dim=1)  # (B, N, 2)


@torch.no_grad()
def place_split(model, placer, images_uint8, n_tokens, device, batch_size=256):
    """place() over a whole split of uint8 images, in batches -> positions (n, N, 2) on the CPU."""
    placer.eval()
    positions = []
    for start in range(0, len(images_uint8), batch_size):
        images = images_uint8[start:start + batch_size].to(device).float().div_(255)
        positions.append(place(model, placer, images, n_tokens).cpu())
    return torch.cat(positions)


def load_placer(path, map_location="cpu"):
    """placer.pt (written by this file's CLI) -> (GlancePlacer in eval mode, the saved dict).
    Read with weights_only=True: a file someone sends you cannot run code."""
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
        placer = GlancePlacer(PlacerConfig(**saved["placer_config"]))
        placer.load_state_dict(saved["placer"])
    except Exception as error:                # truncated, not a placer, another torch format, ...
        raise ValueError(f"{path} is not a placer written by experiments.placement "
                         f"({type(error).__name__}: {error})") from None
    return placer.to(map_location).eval(), saved


def check_fits(placer, model):
    """Raise ValueError unless the placer was made for this model: the same image size, window
    and token width (its queries live in the model's position-embedding space)."""
    made_for = (placer.config.image_size, placer.config.window, placer.config.dim)
    if made_for != (model.config.image_size, model.config.window, model.config.dim):
        raise ValueError("the placer was trained for another model "
                         "(its image size, window or width differ)")


def read_at(model, split, layout, device, batch_size, bf16=False):
    """A split (uint8 images, labels) read at one layout (N, 2) for every image, as a prior is
    read (train.predict, the one evaluation loop) -> right/wrong (n,) bool."""
    positions = layout.detach().expand(len(split[1]), -1, -1)                 # (n, N, 2)
    logits = train.predict(model, split[0], positions, device, batch_size, bf16=bf16)[0]
    return logits.argmax(1) == split[1]


# -----------------------------------------------------------------------------
# A sketch of the whole image, what experiments.sketch places from and experiments.layouts
# chooses from: far cheaper than one token of the model

def sketch_net(channels):
    """Three 3x3 convolutions (the last two stride 2): the sketch (B, 3, s, s) -> a feature map
    (B, c, s/4, s/4), with c = channels (the first convolution has half)."""
    c = channels
    return nn.Sequential(nn.Conv2d(3, c // 2, 3, padding=1), nn.GELU(),
                         nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.GELU(),
                         nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GELU())


def add_sketch_flags(parser, whose):
    """--size and --channels of the sketch network (experiments.sketch, .layouts); `whose`
    names it in --help. check_sketch_flags checks them."""
    add = parser.add_argument
    add("--size", type=utils.int_at_least(4), default=16,
        help=f"{whose} sketch side in pixels (a multiple of 4)")
    add("--channels", type=utils.int_at_least(2), default=32, help=f"{whose} feature channels")


def check_sketch_flags(parser, args):
    """A usage error unless --size is a multiple of 4 (two stride-2 convolutions) and
    --channels even (the first convolution has half)."""
    if args.size % 4 or args.channels % 2:
        parser.error(f"--size must be a multiple of 4 and --channels even, got {args.size} and "
                     f"{args.channels}")


def downsample(images, size):
    """images (B, C, H, W) -> the sketch (B, 3, size, size): each pixel the mean of its area."""
    return F.interpolate(images[:, :3], size=(size, size), mode="area")


# -----------------------------------------------------------------------------
# Training the head on the training split (the backbone stays frozen)

def placed_accuracy(model, placer, split, budgets, device, batch_size):
    """Top-1 % with glance-then-place and with the isotropic prior, per budget -> dict, read by
    train.predict (the one evaluation loop)."""
    accuracy = {}
    for n in budgets:
        lattice = spot.isotropic_positions(n).expand(len(split.labels), n, 2)
        placed = place_split(model, placer, split.images, n, device, batch_size)
        for kind, positions in (("placed", placed), ("isotropic", lattice)):
            logits = train.predict(model, split.images, positions, device, batch_size)[0]
            hits = logits.argmax(1) == split.labels
            accuracy[f"val_{kind}@{n}"] = 100 * hits.float().mean().item()
    return accuracy


def train_batches(split, args, generator, epoch):
    """One epoch of a training split in a random order (drawn from `generator`, which also flips
    the images) -> yields (step, images (B, C, H, W) in [0, 1], labels (B,)) on args.device."""
    order = torch.randperm(len(split.labels), generator=generator)
    steps = len(split.labels) // args.batch_size
    for step in tqdm(range(steps), f"epoch {epoch}", disable=not args.progress, leave=False):
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        images = split.images[batch].float().div_(255)
        images = data.augment(images, generator, padding=0).to(args.device)
        yield step, images, split.labels[batch].to(args.device)


def prior_loss(model, images, labels, priors, n_tokens, generator):
    """The loss of one batch read through a prior drawn from `priors` (train.train_step's draw):
    the other batches of a model fine-tuned with a head, so that it keeps reading the priors."""
    prior = train.pick(priors, generator)
    positions = spot.sample_positions(prior, len(images), n_tokens, model.config.image_size,
                                      model.config.window, generator=generator,
                                      images=images)                            # (B, N, 2)
    return F.cross_entropy(model(images, positions), labels)


def train_placer(model, placer, dataset, args, out, log=print):
    """The head only, with train.py's optimizer (train.make_optimizer: AdamW with decay on its
    matrices, cosine decay of --lr; no warm-up): one budget of --tokens per batch, and each epoch
    ends with validation, a line of out/metrics.jsonl and an atomic save of out/placer.pt.
    -> the list of per-epoch metrics."""
    model.requires_grad_(False).eval()
    generator, n_train = torch.Generator().manual_seed(args.seed), len(dataset.train.labels)
    no_warmup = argparse.Namespace(**{**vars(args), "warmup_epochs": 0})
    optimizer, scheduler = train.make_optimizer(placer, no_warmup, n_train)
    steps, history = n_train // args.batch_size, []
    for epoch in range(1, args.epochs + 1):
        placer.train()
        loss_sum = 0.0
        for _, images, labels in train_batches(dataset.train, args, generator, epoch):
            n_tokens = args.tokens[torch.randint(len(args.tokens), (), generator=generator).item()]
            loss = F.cross_entropy(model(images, place(model, placer, images, n_tokens)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()                    # through the bilinear sampler into the head
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
        accuracy = placed_accuracy(model, placer, dataset.val, args.tokens, args.device,
                                   args.batch_size)
        history.append({"epoch": epoch, "train_loss": loss_sum / steps, **accuracy})
        utils.log_metrics(out, history[-1], log)
        utils.write_atomic(out / "placer.pt", {"placer_config": asdict(placer.config),
                                                "placer": placer.state_dict(), "epoch": epoch})
    return history


def train_head(model, head, dataset, args, out, design, log=print):
    """The one training loop of the heads that learn through a SPoT model (experiments.glimpses,
    .move, .sketch; `design` is the head's module), and of the model too with args.tune
    (retrofitting the design into it): AdamW (train.make_optimizer: decay on matrices, warm-up
    and cosine decay of --lr) with gradients clipped at norm 1, on the first --train-limit
    training images (None: all), one budget of --tokens per batch (design.step_loss); each epoch
    ends with validation (design.validate), a line of out/metrics.jsonl and an atomic save of
    out/design.FILE (design.saved). -> the per-epoch metrics."""
    model.requires_grad_(args.tune)
    trained = nn.ModuleList([model, head]) if args.tune else head
    part = dataset.train.take(slice(0, args.train_limit))
    generator, n_train = torch.Generator().manual_seed(args.seed), len(part.labels)
    optimizer, scheduler = train.make_optimizer(trained, args, n_train)
    val, history = (dataset.val.images, dataset.val.labels), []
    for epoch in range(1, args.epochs + 1):
        trained.train()
        model.train(args.tune)
        losses = []
        for step, images, labels in train_batches(part, args, generator, epoch):
            loss = design.step_loss(model, head, images, labels, args, generator, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()                       # through the bilinear sampler into the head
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        model.eval()
        accuracy = design.validate(model, head, val, args.tokens, args.device, args.batch_size)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), **accuracy})
        utils.log_metrics(out, history[-1], log)
        utils.write_atomic(out / design.FILE, design.saved(head, args, epoch, model))
    return history


def saved_head(head, args, epoch, model=None):
    """What a head's file holds (experiments.move's move.pt, experiments.sketch's sketch.pt):
    plain tensors and numbers, read back with weights_only=True; with --tune, the model too."""
    state = {"config": asdict(head.config), "head": head.state_dict(), "epoch": epoch,
             "checkpoint": str(args.checkpoint)}
    if getattr(args, "tune", False):
        state |= {"model_config": asdict(model.config), "model": model.state_dict()}
    return state


def load_head(path, make, what, map_location="cpu"):
    """A file of saved_head -> (the head in eval mode, the tuned SPoTViT in eval mode or None
    when the model stayed frozen); make: the head's config dict -> the head. Read with
    weights_only=True (a file someone sends you cannot run code); anything else is a ValueError
    saying the file is not `what`."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        head = make(state["config"])
        head.load_state_dict(state["head"])
        model = None
        if "model" in state:
            model = spot.SPoTViT(spot.SPoTConfig(**state["model_config"]))
            model.load_state_dict(state["model"])
            model = model.to(map_location).eval()
    except Exception as error:                 # truncated, another head, another format, ...
        raise ValueError(f"{path} is not {what} ({type(error).__name__}: {error})") from None
    return head.to(map_location).eval(), model


# -----------------------------------------------------------------------------
# The command line, and what every head trained on a frozen model shares with it (this file's,
# experiments.glimpses', experiments.ranker's and experiments.move's): run.json, the common
# flags, the checks

def write_run_json(out, module, argv, args):
    """out/run.json: the command that made the run (python -m `module` and its flags), every
    argument and the CPU (experiments.models' cards read it)."""
    flags = sys.argv[1:] if argv is None else list(argv)
    run = {"argv": ["python", "-m", module] + flags,
           "args": {**vars(args), "device": str(args.device)}, "cpu": utils.cpu_name()}
    utils.write_atomic(Path(out) / "run.json", json.dumps(run, indent=2))


def add_training_flags(parser):
    """The flags of a head trained by train_head (experiments.move, .sketch): --tune and the
    priors of the model's other batches, --train-limit, --epochs, --warmup-epochs,
    --batch-size, --lr."""
    add = parser.add_argument
    add("--tune", action="store_true", help="fine-tune the model with the head")
    add("--train-priors", default=",".join(spot.PRIORS), type=utils.name_list(spot.PRIORS),
        help="the priors of the model's other batches (with --tune)")
    add("--train-limit", type=utils.int_at_least(1), default=20000,
        help="the first N training images train the head")
    add("--epochs", type=utils.int_at_least(1), default=3)
    add("--warmup-epochs", type=utils.float_in(0), default=0.1)
    add("--batch-size", type=utils.int_at_least(1), default=128)
    add("--lr", type=utils.float_in(0, low_open=True), default=1e-3, help="peak AdamW lr")


def add_common_flags(parser, writes):
    """--seed, --device, --threads, --out (a new folder for `writes`) and --progress."""
    add = parser.add_argument
    add("--seed", type=int, default=0)
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--threads", type=utils.int_at_least(1), help="CPU threads (none: all cores)")
    add("--out", required=True, help=f"a new folder for {writes}")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")


def load_frozen(args, written):
    """The checks of every head's command, then its frozen model and the model's data ->
    (model, dataset): --device resolved; --out writable, and refused when it already holds
    `written`; --threads set (none: all cores); --tokens parsed, each >= 2 (a glance and at least
    one more token); a validation split required (a head is judged on it, never on test).
    Raises ValueError or data.DataError, for the caller's parser.error."""
    args.device = utils.resolve_device(args.device)
    utils.check_out_dir(Path(args.out), "--out")
    if (Path(args.out) / written).exists():
        raise ValueError(f"--out: {args.out} already holds a {written}; choose a new folder")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, dataset, _ = data.load_model_and_data(args.checkpoint, args.device)
    n_grid = len(spot.grid_positions(model.config.image_size, model.config.window))
    args.tokens = utils.parse_tokens(args.tokens, n_grid)
    if min(args.tokens) < 2:
        raise ValueError("--tokens: each budget must be >= 2 (a glance and at least one more "
                         "token)")
    if dataset.val is None:
        raise ValueError("the checkpoint's run held out no validation images (train.py "
                         "--val-size): a head is judged on validation, never on test")
    return model, dataset


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.placement",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="the frozen SPoT model (checkpoint.pt from train.py)")
    add("--tokens", default="8,16",
        help="token budgets N to train for (utils.parse_tokens; each >= 2)")
    utils.add_alias(parser, "tokens", "--budgets")
    add("--glance-fraction", type=utils.float_in(0, 1, low_open=True, high_open=True), default=0.25,
        help="G = round(fraction * N) glance tokens, the rest are placed")
    add("--width", type=utils.int_at_least(4), default=128, help="the head's width")
    add("--max-shift", type=utils.float_in(0, 1, low_open=True), default=0.5,
        help="largest move of a placed token from its base point (image units)")
    add("--epochs", type=utils.int_at_least(1), default=5)
    add("--batch-size", type=utils.int_at_least(1), default=128)
    add("--lr", type=utils.float_in(0, low_open=True), default=1e-3,
        help="peak AdamW lr (cosine decay)")
    add_common_flags(parser, "placer.pt, metrics.jsonl and run.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:         # every flag, the checkpoint and its data: a message, never a traceback
        model, dataset = load_frozen(args, "placer.pt")
        torch.manual_seed(args.seed)                                # the head's initial weights
        c = model.config
        config = PlacerConfig(c.image_size, c.window, c.dim, args.width,
                              glance_fraction=args.glance_fraction, max_shift=args.max_shift)
        placer = GlancePlacer(config).to(args.device)
    except (ValueError, data.DataError) as error:
        parser.error(str(error))
    write_run_json(out, "experiments.placement", argv, args)
    train_placer(model, placer, dataset, args, out)
    print(f"wrote {out / 'placer.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
oracle.py -- SPoT-ON (the oracle search) and the paper's evaluation of SPoT (arXiv 2507.01654).

First SPoT-ON, the method:

    oracle_search      freeze the ViT, move each image's token positions by gradient descent
                       on its own loss (Adam, projected back into [0, 1]).
                       objective="label":   cross-entropy with the true label = the oracle
                       objective="entropy": beyond the paper, toward its open problem (closing
                           the gap to the oracle without labels): the entropy of the model's
                           own prediction, which needs no label
    snap_to_grid       snapping: move each found position to the nearest patch-grid centre;
                       what is subpixel precision itself worth?
    saliency_read      finding 3 as a number: how salient is what the tokens read?
    gradient_saliency  the model's own saliency map (finding 3's second map)
    search_split       oracle_search over a whole split, in batches

Then the paper's evaluation (train.predict, the project's one evaluation loop, reads the splits):

    knn_predict        the kNN evaluation of retrofitting: DINO-style weighted kNN on the class
                       token
    results_table      the paper's results table: every spatial prior x budget (top-1 and kNN),
                       then the SPoT-ON rows: label oracle, snapped to the grid, transfer to
                       another model (finding 4), and finding 3's saliency read under two maps
                       (spectral residual, the model's gradient saliency); every accuracy with
                       a 95 % bootstrap interval (utils.bootstrap_interval)

Run it on a checkpoint written by train.py:

    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/shapes/oracle
    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/shapes/oracle --limit 500 \
        --transfer-checkpoint runs/shapes_seed1/checkpoint.pt          # + the transfer rows

It writes OUT/results.json (every number, plus the settings) and OUT/per_image.npz (which images
each row got right, so that any paired difference can be recomputed without the checkpoint);
`python -m experiments.tables OUT` renders OUT/results.md, a table laid out like the paper's
results table: one row per (method, prior), one column per token budget, "top1 / knn". The
(steps, lr) sweep that chose the search defaults and label-free placement live in experiments/.

Why the oracle matters: with a fixed, frozen model, the only thing it changes is *where* the
tokens look. Its accuracy is an upper bound on what any placement strategy could achieve with
that model and budget, and the gap between a prior and the oracle is the room left for a
learned, label-free placement (the paper's open problem).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import spot
import train
import utils

# -----------------------------------------------------------------------------
# SPoT-ON: the search

OBJECTIVES = ("label", "entropy")
# dsb-ifi/SPoT's spot/oracle.py runs 5 steps at lr 3e-3 (normalized coordinates, 224 px). On
# 32 px images a step of 3e-3 is a tenth of a pixel, so these defaults were chosen by a
# (steps, lr) sweep on training images of a shapes model (experiments/NOTES.md); the CIFAR-10
# and Imagenette runs chose their lr on validation images (experiments/bench.py's
# oracle-sweep, RESULTS.md).
DEFAULT_STEPS = 20
DEFAULT_LR = 1e-2


@dataclass
class OracleResult:
    positions: torch.Tensor    # (B, N, 2) final positions, in [0, 1]
    trajectory: torch.Tensor   # (steps + 1, B, N, 2), trajectory[0] = start
    losses: torch.Tensor       # (steps + 1, B) per-image objective at each trajectory entry


def per_image_objective(logits, labels, objective):
    """(B, classes) logits -> (B,) loss per image.

    "label":   cross-entropy with the true label, -log p(y | I, S). Uses y: the oracle (SPoT-ON).
    "entropy": H(p) = -sum_c p_c log p_c of the model's own prediction. No label: a placement
               that makes the model *confident* -- a real test-time method (not in the paper).
               It can only be as good as the model's first guess: confidently wrong is also low
               entropy, which is exactly why the label oracle is an upper bound.
    """
    logits = logits.float()
    if objective == "label":
        return F.cross_entropy(logits, labels, reduction="none")
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


# Every image is optimized independently, as in the paper, and that takes two details:
# 1. The batch loss is the SUM of per-image losses, not the mean. Image b's positions only
#    influence image b's logits (tokens of different images never meet), so the gradient of the
#    sum w.r.t. positions[b] is exactly the gradient of image b's own loss; a mean would divide
#    it by B, and the step would depend on the batch size.
# 2. Adam is element-wise: every coordinate keeps its own first and second moments (m, v), so no
#    statistic is shared between images (a global gradient-norm clip, for instance, would couple
#    them). Searching a batch therefore equals searching each image alone.
# Adam is written out by hand (it is five lines) rather than using torch.optim, so the update is
# visible, and there is no optimizer object that could leak state between calls. The gradient is
# taken w.r.t. the positions ONLY: torch.autograd.grad does not touch the parameters' .grad, and
# autograd skips the weight-gradient work entirely because no requested input depends on it.
# The model is *frozen*: its parameters, their .grad and its train/eval flags are exactly as
# before when the search returns. It runs in eval mode (a deterministic g, as in SPoT-ON).

def oracle_search(model, images, labels, positions, steps=DEFAULT_STEPS, lr=DEFAULT_LR,
                  objective="label"):
    """SPoT-ON, the oracle search: argmin_S L(g(I, S), y) over each image's positions, model frozen.

    model:     an SPoTViT (anything called as model(images, positions) -> logits)
    images:    (B, C, H, W) float in [0, 1]
    labels:    (B,) int64 true classes (objective="label"); may be None for "entropy"
    positions: (B, N, 2) start positions S^0, e.g. a prior sample (spot.sample_positions)
    steps, lr: Adam steps and step size in normalized coordinates (lr 1e-2 = 0.32 px at 32 px)
    -> OracleResult(positions (B, N, 2), trajectory (steps + 1, B, N, 2), losses (steps + 1, B))
    Searching a batch equals searching each image alone, the model frozen (see above).
    """
    # images and positions are checked by the model itself (spot.extract_patches); the rest here.
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "label" and getattr(labels, "shape", None) != (len(images),):
        raise ValueError(f"labels must be an integer tensor of shape ({len(images)},) for "
                         "objective='label' (the oracle uses the true label); 'entropy' "
                         "needs no label")
    if steps < 0 or not 0 < lr < float("inf"):
        raise ValueError(f"steps must be an int >= 0 and lr a finite number > 0, got {steps!r}, "
                         f"{lr!r}")
    pos = positions.detach().to(images.device, torch.float32).clone()         # (B, N, 2)
    modes = [(module, module.training) for module in model.modules()]    # mixed modes, too
    model.eval()
    # Adam's state per coordinate (B, N, 2): m the running mean of the gradient, v of its
    # square; torch.optim.Adam's defaults below: beta1 = 0.9, beta2 = 0.999, eps = 1e-8.
    m = v = torch.zeros_like(pos)
    trajectory = [pos.clone()]
    losses = []
    try:
        with torch.enable_grad():     # also works when the caller is inside torch.no_grad()
            for t in range(1, steps + 1):
                logits = model(images, pos.requires_grad_())
                loss = per_image_objective(logits, labels, objective)         # (B,)
                (grad,) = torch.autograd.grad(loss.sum(), pos)     # (B, N, 2), no graph
                losses.append(loss.detach())
                m = 0.9 * m + (1 - 0.9) * grad
                v = 0.999 * v + (1 - 0.999) * grad * grad
                m_hat = m / (1 - 0.9 ** t)             # bias correction: m and v start at 0
                v_hat = v / (1 - 0.999 ** t)
                step = lr * m_hat / (v_hat.sqrt() + 1e-8)     # about lr, whatever the scale
                pos = (pos.detach() - step).clamp_(0.0, 1.0)  # S ⊆ Ω_subpix: inside the image
                trajectory.append(pos.clone())
        with torch.no_grad():         # the objective at the final positions
            losses.append(per_image_objective(model(images, pos), labels, objective))
    finally:
        for module, mode in modes:
            module.training = mode
    return OracleResult(pos, torch.stack(trajectory), torch.stack(losses))


def patch_grid(model):
    """The model's patch-grid cell centres (G, 2): the tokens a standard grid ViT reads."""
    return spot.grid_positions(model.config.image_size, model.config.window)


def snap_to_grid(positions, image_size, window):
    """Move every position to the nearest patch-grid cell centre (spot.grid_positions).

    (..., N, 2) -> same shape. Comparing snapped with unsnapped oracle placements measures what
    subpixel precision is worth (snapping): the snapped tokens are ones a standard grid ViT could
    read (possibly the same cell twice: the budget N is kept, duplicates included). Ties (a point
    exactly between two centres) go to the first cell in row-major order.
    """
    if positions.dim() < 2 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be a tensor (..., N, 2) of (y, x), got "
                         f"{tuple(positions.shape)}")
    cells = spot.grid_positions(image_size, window).to(positions)                # (G, 2)
    # Squared distance from every position to every cell centre, written out (torch.cdist may
    # use a matmul formula that is not exact); (..., N, G) is small: G is the grid size.
    dist = ((positions[..., None, :] - cells) ** 2).sum(-1)                      # (..., N, G)
    return cells[dist.argmin(-1)]                                                # (..., N, 2)


def saliency_read(saliency, positions, window):
    """Finding 3 as a number: how salient is what the tokens read? -> (B,)

    saliency (B, H, W): a map per image (spot.saliency_map, or gradient_saliency: the model's
    own); positions (B, N, 2). The mean of the map inside the image's k x k token windows,
    divided by its mean over the image: 1 = the tokens read average pixels, 2 = twice as salient
    as average. Only the in-image part of a window counts: the sampler reads zeros off the image,
    which would score a border token as unsalient for a reason that has nothing to do with saliency.
    """
    # Read a map of ones through the same windows beside the saliency: its bilinear read is each
    # window's in-image area (1 per pixel inside, fractions at the border, 0 outside).
    stacked = torch.stack([saliency, torch.ones_like(saliency)], 1)              # (B, 2, H, W)
    total = spot.extract_patches(stacked, positions, window).sum((1, 3, 4))       # (B, 2)
    return total[:, 0] / total[:, 1] / saliency.flatten(1).mean(1)


def gradient_saliency(model, images_uint8, device, batch_size):
    """The model's own saliency, label-free (finding 3's second map, beside spectral residual):
    read the whole patch grid (a first look), back-propagate the logit of the class the model
    predicts to the pixels; |gradient| summed over channels, normalized to sum 1 per image
    -> (n, H, W) on the CPU. One forward and one backward pass per image; the model is frozen."""
    cells = patch_grid(model).to(device)
    maps = []
    was_training = model.training
    model.eval()
    for batch in images_uint8.split(batch_size):
        images = batch.to(device).float().div_(255).requires_grad_()          # (B, C, H, W)
        with torch.enable_grad():
            logits = model(images, cells.expand(len(images), -1, -1))         # (B, classes)
            top = logits.max(1).values.sum()          # each image's predicted class's logit
            (grad,) = torch.autograd.grad(top, images)                        # (B, C, H, W)
        maps.append(grad.abs().sum(1).cpu())
    model.train(was_training)
    maps = torch.cat(maps)                                                    # (n, H, W)
    return maps / maps.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]


def search_split(model, images_uint8, labels, start, config, objective="label", desc="search"):
    """oracle_search over a whole split in batches, with config's (an EvalConfig) search_steps,
    search_lr, batch_size, device and progress -> final positions (n, N, 2) on the CPU.
    labels: (n,), or None for objective="entropy"."""
    found = []
    b = config.batch_size
    device = config.device
    for i in tqdm(range(0, len(images_uint8), b), desc, leave=False, disable=not config.progress):
        batch = slice(i, i + b)
        images = images_uint8[batch].to(device).float().div_(255)
        y = None if labels is None else labels[batch].to(device)
        with utils.autocast(images.device, config.bf16):     # (the Adam update stays fp32)
            result = oracle_search(model, images, y, start[batch].to(device),
                                   config.search_steps, config.search_lr, objective)
        found.append(result.positions.cpu())
    return torch.cat(found)


# -----------------------------------------------------------------------------
# The paper's evaluation: kNN accuracy on the class-token feature (the kNN evaluation of
# retrofitting)

def knn_predict(bank_features, bank_labels, features, num_classes, k=20, temperature=0.07):
    """Weighted kNN classification, as in DINO's eval_knn -> predicted classes (Q,).

    bank_features (M, D), bank_labels (M,): the "training set" of the classifier
    features (Q, D): the images to classify
    Features are L2-normalized, so the dot product is the cosine similarity. Each query takes
    its k most similar bank entries; entry j votes for its class with weight exp(sim_j / T).
    """
    bank = F.normalize(bank_features.float())                                 # (M, D) unit rows
    queries = F.normalize(features.float())                                   # (Q, D)
    top_sim, top_idx = (queries @ bank.T).topk(min(k, len(bank)))             # (Q, k) cosine
    votes = torch.zeros(len(queries), num_classes, device=queries.device)     # (Q, classes)
    votes.scatter_add_(1, bank_labels.to(bank.device)[top_idx],
                       (top_sim / temperature).exp())
    return votes.argmax(1)


# -----------------------------------------------------------------------------
# The paper's results table: every prior x budget, then the SPoT-ON rows

option = utils.option
COUNT = utils.int_at_least(0)
ONE_OR_MORE = utils.int_at_least(1)
POSITIVE = utils.float_in(0, low_open=True)


@dataclass
class EvalConfig:
    """What results_table computes. Every field made by option is also a flag of oracle.py
    (search_steps -> --search-steps), and results.json keeps them all in its "settings" (with
    oracle.py's other flags)."""
    checkpoint: str = option(None, "checkpoint.pt written by train.py", required=True)
    tokens: tuple = option((4, 8, 16, 32, 64),
                           "token budgets: N, A,B,C, A-B, 'all' (the grid) or a mix")
    priors: tuple = option(("grid", "uniform", "gaussian", "sobol", "isotropic", "center",
                            "salient"), "priors to evaluate", type=utils.name_list(spot.PRIORS))
    draws: int = option(1, "position draws per random prior (for the interval)", type=ONE_OR_MORE)
    search_from: str = option("isotropic", "the searches' start", choices=spot.PRIORS,
                              alias="--oracle-from")
    search_steps: int = option(DEFAULT_STEPS, "Adam steps of the search", type=COUNT,
                               alias="--oracle-steps")
    search_lr: float = option(DEFAULT_LR, "Adam lr (normalized coordinates)", type=POSITIVE,
                              alias="--oracle-lr")
    split: str = option("test", "test, or val: the images train.py --val-size held out (to "
                        "choose settings)", choices=("test", "val"))
    limit: int = option(None, "the first N images of --split (None: all)", type=ONE_OR_MORE)
    search_limit: int = option(None, "search on the first N of those (None: all; 0: no SPoT-ON)",
                               type=COUNT)
    saliency_limit: int = option(500, "finding 3 on the first N searched images (0: off)",
                                 type=COUNT)
    knn_limit: int = option(5000, "kNN bank = the first N train images (0: no kNN)", type=COUNT)
    knn_k: int = option(20, "neighbours of the kNN vote", type=ONE_OR_MORE)
    knn_temperature: float = option(0.07, "kNN vote weight exp(sim / T)", type=POSITIVE)
    transfer_checkpoint: str = option(None, "a second model: its oracle positions read by "
                                      "ours, and back")
    batch_size: int = option(128, "images per forward pass", type=ONE_OR_MORE)
    seed: int = option(0, "seed of the position draws and the bootstrap", type=int)
    progress: bool = option(True, "tqdm bars", action=argparse.BooleanOptionalAction)
    device: str = "cpu"                     # --device auto picks cuda when there is one
    bf16: bool = False        # --precision: the model's forward in bf16, positions in fp32


def hits(model, test, positions, config):
    """(n,) bool: which of the images test = (uint8 images, labels) `model` classifies right
    when it reads them at `positions`."""
    logits, _ = train.predict(model, test[0], positions, config.device, config.batch_size,
                              bf16=config.bf16)
    return logits.argmax(1) == test[1]


def prior_rows(model, test, bank, config, per_image):
    """The prior rows: every prior x budget, top-1 and kNN, `draws` position draws for the random
    priors (one for the deterministic isotropic and center lattices).

    kNN: the bank is featurized with the SAME prior and budget as the queries (a fresh draw), so
    it measures how good the class token is when the model reads every image that way.
    """
    rows = []
    knn = len(bank[0]) > 0
    cells = [(prior, tokens) for prior in config.priors for tokens in config.tokens]
    for prior, tokens in tqdm(cells, "priors", disable=not config.progress):
        if prior == "grid" and tokens > len(patch_grid(model)):   # patch dropout cannot exceed
            rows.append(utils.table_row("prior", prior, tokens))  # the grid: n/a
            continue

        def read(images, *key):      # -> (logits, features) of the images at this prior's draw
            seed = train.seed_for(config.seed, prior, tokens, *key)
            positions = train.draw_positions(prior, images, tokens, model.config.window, seed,
                                             config.device)
            return train.predict(model, images, positions, config.device, config.batch_size, knn,
                                 config.bf16)
        bank_features = knn and read(bank[0], "bank")[1]
        correct = []
        knn_correct = [] if knn else None
        for index in range(config.draws if prior in train.RANDOM_PRIORS else 1):
            key = ("test", index) if index else ("test",)            # draw 0: the searches' start
            logits, features = read(test[0], *key)
            correct.append(logits.argmax(1) == test[1])
            if knn:
                knn_correct.append(knn_predict(bank_features, bank[1], features,
                                               model.config.num_classes, config.knn_k,
                                               config.knn_temperature) == test[1])
        per_image["top1", "prior", prior, tokens] = correct = torch.stack(correct)  # (draws, n)
        if knn:
            per_image["knn", "prior", prior, tokens] = knn_correct = torch.stack(knn_correct)
        rows.append(utils.table_row("prior", prior, tokens, correct, knn_correct, config.seed))
    return rows


def saliency_rows(maps, named, window, config, per_image):
    """Finding 3 at one budget: the saliency read of each named placement, {name: positions
    (n', N, 2)}, under each map of maps, {kind: (n, H, W)} of the first n <= n' images ->
    records (mean and 95 % interval); the reads per image go to per_image."""
    records = []
    for kind, saliency in maps.items():
        for name, positions in named.items():
            n = len(saliency)
            tokens = positions.shape[1]
            read = saliency_read(saliency, positions[:n], window)                     # (n,)
            per_image[f"saliency-{kind}", "read", name, tokens] = read
            mean, low, high = (value / 100 for value in
                               utils.bootstrap_interval(read, seed=config.seed))
            records.append({"saliency": kind, "positions": name, "tokens": tokens, "mean": mean,
                            "low": low, "high": high, "n_images": n})
    return records


# The SPoT-ON rows, per budget:
#   "spot-on"           the label oracle (oracle_search), from the `search_from` prior row's very
#                       positions (same seed), so the gain is measured on identical starts;
#   "spot-on-snapped"   its positions snapped to the grid (snapping);
#   "spot-on-transfer"  with a second model: positions that model's oracle found, read by ours
#                       (finding 4); transfer_reverse holds the other direction, which costs
#                       three forward passes: our oracle positions on the other model, beside
#                       its own prior and its own oracle on the same images;
#   finding 3           on the first config.saliency_limit images, under two saliency maps:
#                       spectral residual and the model's own (gradient_saliency). Each map also
#                       gives a salient prior: "salient" (spectral residual, as the prior rows
#                       draw it) and "salient-model", whose top-1 is a prior row on those images;
#                       the saliency of what every placement reads is in `saliency`.
# SPoT-ON rows get no kNN: oracle positions are chosen with the test label, so a kNN on them
# would leak it. A grid start above the grid size has no rows (the table says "n/a").

def search_rows(model, test, config, transfer_model, per_image):
    """The SPoT-ON rows of test = (uint8 images, labels) (see above) -> (rows, transfer_reverse,
    saliency)."""
    prior = config.search_from
    window = model.config.window
    rows = []
    reverse = []
    saliency = []
    first = test[0][:config.saliency_limit], test[1][:config.saliency_limit]   # finding 3's
    maps = {"spectral": spot.saliency_map(first[0].float() / 255),
            "model": gradient_saliency(model, first[0], config.device, config.batch_size)
            } if len(first[1]) else {}

    def add(method, positions, images=test, name=prior, **extra):   # `model` reads images there
        tokens = positions.shape[1]
        per_image["top1", method, name, tokens] = correct = hits(model, images, positions, config)
        rows.append(utils.table_row(method, name, tokens, correct, seed=config.seed, **extra))

    def draw(sampler, images, tokens, name):   # positions from a prior's sampler, seeded by name
        seed = train.seed_for(config.seed, name, tokens, "test")     # as the prior rows' draw 0
        return train.draw_positions(sampler, images, tokens, window, seed, config.device)
    for tokens in config.tokens:
        if prior == "grid" and tokens > len(patch_grid(model)):
            continue
        start = draw(prior, test[0], tokens, prior)                                 # (n, N, 2)
        found = search_split(model, *test, start, config, "label", f"oracle {tokens}T")
        add("spot-on", found)
        add("spot-on-snapped", snap_to_grid(found, model.config.image_size, window))
        if transfer_model is not None:
            theirs = search_split(transfer_model, *test, start, config, "label",
                                  f"transfer {tokens}T")
            add("spot-on-transfer", theirs, source=config.transfer_checkpoint)
            reverse.append(dict(model=config.transfer_checkpoint, source=config.checkpoint,
                                prior=prior, tokens=tokens))
            for name, where in ("prior", start), ("own_oracle", theirs), ("transfer", found):
                hit = hits(transfer_model, test, where, config)             # on their model
                per_image["top1", f"reverse-{name}", prior, tokens] = hit
                reverse[-1][f"top1_{name}"] = 100 * hit.float().mean().item()
        if maps:
            named = {prior: start, "spot-on": found}
            for kind, name in ("spectral", "salient"), ("model", "salient-model"):
                named[name] = draw("salient", maps[kind], tokens, name)   # the salient prior
            add("prior", named["salient-model"], first, "salient-model")
            saliency += saliency_rows(maps, named, window, config, per_image)
    return rows, reverse, saliency


def results_table(model, dataset, config, transfer_model=None, per_image=None):
    """Every prior x budget, then SPoT-ON -> the results dict oracle.py writes to results.json:
    {"settings", "rows"(, "transfer_reverse", "saliency")}.

    rows: [{"method", "prior", "tokens", "top1", "top1_low", "top1_high", "knn", "knn_low",
    "knn_high", "n_images", "draws"(, "source", "ms_per_image", "cost_vs_prior")}], accuracies in
    percent with 95 % intervals, or None where not applicable (the grid prior above the grid
    size, kNN for SPoT-ON). The images are the first `config.limit` of `config.split`, and the
    searches run on the first `config.search_limit` of those (a search costs ~2 x steps forward
    passes per image); the kNN bank is the first `config.knn_limit` train images.
    transfer_model: a second model, for the transfer rows. per_image: a dict to fill with every
    row's 0/1 correctness per image, (draws, n) or (n,) bool, keyed ("top1" or "knn", method,
    prior, tokens), and finding 3's saliency reads (n,), keyed ("saliency-spectral" or
    "saliency-model", "read", positions, tokens): what oracle.py writes to per_image.npz.
    """
    split = getattr(dataset, config.split)
    per_image = {} if per_image is None else per_image
    test = split.images[:config.limit], split.labels[:config.limit]
    bank = dataset.train.images[:config.knn_limit], dataset.train.labels[:config.knn_limit]
    searched = test[0][:config.search_limit], test[1][:config.search_limit]
    rows = prior_rows(model, test, bank, config, per_image)
    reverse, saliency = [], []
    if len(searched[1]):
        more, reverse, saliency = search_rows(model, searched, config, transfer_model, per_image)
        rows += more
    settings = {**asdict(config), "device": str(config.device), "dataset": dataset.name,
                "image_size": list(model.config.image_size), "model_config": asdict(model.config),
                "n_test": len(test[1]), "n_searched": len(searched[1]), "n_bank": len(bank[1]),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__}
    results = {"settings": settings, "rows": rows}
    if reverse:
        results["transfer_reverse"] = reverse
    if saliency:
        results["saliency"] = saliency
    return results


# -----------------------------------------------------------------------------
# Command line (utils.parse_eval_args): every flag is checked before a model or an image is
# loaded (--tokens as soon as the model is: 'all' means its grid)

def setup(argv=None):
    """oracle.py's command line (utils.parse_eval_args: EvalConfig's fields and a few more
    flags), checked, and what it names loaded -> (parser, args, model, dataset, the transfer
    model or None, EvalConfig). experiments/label_free.py reuses it."""
    parser, args = utils.parse_eval_args(EvalConfig, argv)
    with utils.usage_errors(parser):
        model, dataset, train_args = data.load_model_and_data(args.checkpoint, args.device,
                                                              args.data_dir, args.progress)
        args.data_dir = args.data_dir or train_args.get("data_dir")
        args.tokens = utils.parse_tokens(args.tokens, len(patch_grid(model)))
        other = None
        if args.transfer_checkpoint:
            other = spot.load_checkpoint(args.transfer_checkpoint, args.device)
            ours = (model.config.image_size, model.config.num_classes)
            if (other.config.image_size, other.config.num_classes) != ours:
                raise ValueError("--transfer-checkpoint: its model must read the same images "
                                 "and classes as ours")
        if args.split == "val" and dataset.val is None:
            raise ValueError("--split val: this run held out no validation images (train.py "
                             "--val-size 0)")
    return parser, args, model, dataset, other, utils.config_from(EvalConfig, args)


def main(argv=None):
    _, args, model, dataset, other, config = setup(argv)
    results = results_table(model, dataset, config, other, per_image := {})
    # The settings keep the other flags too (out, name, threads, ...).
    results["settings"] = {**vars(args), **results["settings"],
                           "run": args.name or utils.run_name(args.checkpoint)}
    utils.write_atomic(f"{args.out}/results.json", json.dumps(results, indent=2))
    utils.save_per_image(f"{args.out}/per_image.npz", per_image)   # last: the run is complete
    print(utils.summary(results))
    print(f"wrote {args.out}/results.json and per_image.npz (python -m experiments.tables "
          f"{args.out} renders it as markdown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

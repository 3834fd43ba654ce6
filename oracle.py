"""
oracle.py -- SPoT-ON (the oracle search) and the evaluation table of SPoT (arXiv 2507.01654).

    oracle_search    SPoT-ON: freeze the ViT, move each image's token positions by gradient
                     descent on its own loss (Adam, projected back into [0, 1]).
                     objective="label":   cross-entropy with the true label = the oracle
                     objective="entropy": beyond the paper, toward its open problem (closing the
                         gap to the oracle without labels): the entropy of the model's own
                         prediction, which needs no label
    snap_to_grid     snapping: move each found position to the nearest patch-grid centre; what
                     is subpixel precision itself worth?
    knn_predict      the kNN evaluation of retrofitting: DINO-style weighted kNN on the class token
    predict          THE evaluation loop of the project (train.py's per-epoch evaluation uses it)
    evaluate         the paper's results table: every spatial prior x budget (top-1 and kNN, 95 %
                     bootstrap intervals), then the SPoT-ON rows: label oracle, snapped to the
                     grid, transfer to another model (finding 4), and finding 3's saliency read
                     under two maps (spectral residual, the model's gradient saliency)

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
# The official code runs 5 Adam steps at lr 3e-3 (normalized coordinates, 224 px images). On
# 32 px images a step of 3e-3 is a tenth of a pixel, so these defaults were chosen by a
# (steps, lr) sweep on training images of a shapes model (experiments/NOTES.md); the CIFAR-10 and
# Imagenette runs chose their lr on validation images (experiments/bench.py's oracle-sweep, RESULTS.md).
DEFAULT_STEPS = 20
DEFAULT_LR = 1e-2
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


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
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


# Every image is optimized independently, as in the paper, and that takes two details:
# 1. The batch loss is the SUM of per-image losses, not the mean. Image b's positions only
#    influence image b's logits (tokens of different images never meet), so the gradient of the
#    sum w.r.t. positions[b] is exactly the gradient of image b's own loss; a mean would divide
#    it by B, and the step would depend on the batch size.
# 2. Adam is element-wise: every coordinate keeps its own first and second moments (m, v), so no
#    statistic is shared between images (a global gradient-norm clip, for instance, would couple
#    them). Searching a batch therefore equals searching each image alone.
# Adam is written out by hand (it is five lines) rather than using torch.optim, so the update is
# visible, and there is no optimizer object that could leak state between calls.

def oracle_search(model, images, labels, positions, steps=DEFAULT_STEPS, lr=DEFAULT_LR,
                  objective="label"):
    """SPoT-ON, the oracle search: argmin_S L(g(I, S), y) over each image's positions, model frozen.

    model:     an SPoTViT (anything called as model(images, positions) -> logits)
    images:    (B, C, H, W) float in [0, 1]
    labels:    (B,) int64 true classes (objective="label"); may be None for "entropy"
    positions: (B, N, 2) start positions S^0, e.g. a prior sample (spot.sample_positions)
    steps, lr: Adam steps and step size in normalized coordinates (lr 1e-2 = 0.32 px at 32 px)
    -> OracleResult(positions (B, N, 2), trajectory (steps + 1, B, N, 2), losses (steps + 1, B))

    The model is *frozen*: its parameters, their .grad and its train/eval flags are exactly as
    before when this returns. The search runs in eval mode (a deterministic g, as in SPoT-ON).
    Searching a batch equals searching each image alone (see the comment above).
    """
    # images and positions are checked by the model itself (spot.extract_patches); the rest here.
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "label" and not (torch.is_tensor(labels) and labels.shape == (len(images),)
                                     and not labels.is_floating_point()):
        raise ValueError(f"labels must be an integer tensor of shape ({len(images)},) for objective="
                         f"'label' (the oracle uses the true label); 'entropy' needs no label")
    if type(steps) is not int or steps < 0 or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"steps must be an int >= 0 and lr a finite number > 0, got {steps!r}, {lr!r}")
    images, pos = images.detach(), positions.detach().to(images.device, torch.float32).clone()  # (B, N, 2)
    # Remember every module's mode (not just the top one: a caller may have mixed modes).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    # Adam's state, per coordinate (B, N, 2): m the running mean of the gradient, v the running
    # mean of its square.
    (beta1, beta2), m, v = ADAM_BETAS, torch.zeros_like(pos), torch.zeros_like(pos)
    trajectory, losses = [pos.clone()], []
    try:
        with torch.enable_grad():     # also works when the caller is inside torch.no_grad()
            for t in range(1, steps + 1):
                loss = per_image_objective(model(images, pos.requires_grad_(True)), labels, objective)  # (B,)
                # Gradient w.r.t. the positions ONLY: torch.autograd.grad does not touch the
                # parameters' .grad, and autograd skips the weight-gradient work entirely
                # because no requested input depends on it. (The update below builds no graph:
                # grad has none, and pos is detached.)
                (grad,) = torch.autograd.grad(loss.sum(), pos)                        # (B, N, 2)
                losses.append(loss.detach())
                m = beta1 * m + (1 - beta1) * grad
                v = beta2 * v + (1 - beta2) * grad * grad
                m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)   # bias correction: m, v start at 0
                # Each coordinate moves by about lr per step whatever the gradient's scale, then the
                # projection: S must stay inside the image, S ⊆ Ω_subpix (subpixel tokens).
                pos = (pos.detach() - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)).clamp_(0.0, 1.0)
                trajectory.append(pos.clone())
        with torch.no_grad():         # the objective at the final positions
            losses.append(per_image_objective(model(images, pos), labels, objective))
    finally:
        for module, mode in modes:
            module.training = mode
    return OracleResult(pos, torch.stack(trajectory), torch.stack(losses))


def snap_to_grid(positions, image_size, window):
    """Move every position to the nearest patch-grid cell centre (spot.grid_positions).

    (..., N, 2) -> same shape. Comparing snapped with unsnapped oracle placements measures what
    subpixel precision is worth (snapping): the snapped tokens are ones a standard grid ViT could
    read (possibly the same cell twice: the budget N is kept, duplicates included). Ties (a point
    exactly between two centres) go to the first cell in row-major order.
    """
    if not torch.is_tensor(positions) or positions.dim() < 2 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be a tensor (..., N, 2) of (y, x), got {getattr(positions, 'shape', None)}")
    cells = spot.grid_positions(image_size, window).to(positions.device, positions.dtype)  # (G, 2)
    # Squared distance from every position to every cell centre, written out (torch.cdist may
    # use a matmul formula that is not exact); (..., N, G) is small: G is the grid size.
    dist = ((positions[..., None, :] - cells) ** 2).sum(-1)                                # (..., N, G)
    return cells[dist.argmin(dim=-1)]                                                      # (..., N, 2)


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
    stacked = torch.stack([saliency, torch.ones_like(saliency)], 1)                  # (B, 2, H, W)
    total = spot.extract_patches(stacked, positions, window).sum(dim=(1, 3, 4))       # (B, 2)
    return total[:, 0] / total[:, 1] / saliency.flatten(1).mean(1)


def gradient_saliency(model, images_uint8, device, batch_size):
    """The model's own saliency, label-free (finding 3's second map, beside spectral residual):
    read the whole patch grid (a first look), back-propagate the logit of the class the model
    predicts to the pixels; |gradient| summed over channels, normalized to sum 1 per image
    -> (n, H, W) on the CPU. One forward and one backward pass per image; the model is frozen."""
    cells, maps, was_training = spot.grid_positions(model.config.image_size, model.config.window), [], model.training
    model.eval()
    for batch in images_uint8.split(batch_size):
        images = batch.to(device).float().div_(255).requires_grad_(True)                  # (B, C, H, W)
        with torch.enable_grad():
            logits = model(images, cells.to(device).expand(len(images), -1, -1))         # (B, classes)
            (grad,) = torch.autograd.grad(logits.max(1).values.sum(), images)            # (B, C, H, W)
        maps.append(grad.abs().sum(1).cpu())
    model.train(was_training)
    maps = torch.cat(maps)                                                               # (n, H, W)
    return maps / maps.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]


# -----------------------------------------------------------------------------
# kNN accuracy on the class-token feature (the kNN evaluation of retrofitting)

def knn_predict(bank_features, bank_labels, features, num_classes, k=20, temperature=0.07):
    """Weighted kNN classification, as in DINO's eval_knn -> predicted classes (Q,).

    bank_features (M, D), bank_labels (M,): the "training set" of the classifier
    features (Q, D): the images to classify
    Features are L2-normalized, so the dot product is the cosine similarity. Each query takes
    its k most similar bank entries; entry j votes for its class with weight exp(sim_j / T).
    """
    bank = F.normalize(bank_features.float(), dim=1)                          # (M, D)
    queries = F.normalize(features.float(), dim=1)                            # (Q, D)
    top_sim, top_idx = (queries @ bank.T).topk(min(k, len(bank)), dim=1)      # (Q, k) cosine similarity
    votes = torch.zeros(len(queries), num_classes, device=queries.device)
    votes.scatter_add_(1, bank_labels.to(bank.device)[top_idx], (top_sim / temperature).exp())  # (Q, classes)
    return votes.argmax(1)


# -----------------------------------------------------------------------------
# Error bars: a 95 % interval for every accuracy in the table

def bootstrap_interval(correct, resamples=1000, seed=0, level=0.95):
    """(draws, n) or (n,) 0/1 correctness -> (accuracy %, low %, high %).

    The accuracy is the mean over images of each image's accuracy averaged over the position
    draws. The interval is the percentile bootstrap over images: resample the n images with
    replacement `resamples` times and take the central `level` of the resampled accuracies. It
    answers "how much would this number move on another test set of the same size?", so two
    rows whose intervals overlap are a tie. (For n = 10,000 at 50 % it is about +-1 point.)
    """
    per_image = correct.float().reshape(-1, correct.shape[-1]).mean(0)                    # (n,)
    n, generator = len(per_image), torch.Generator().manual_seed(seed)
    means = per_image[torch.randint(0, n, (resamples, n), generator=generator)].mean(1)    # (resamples,)
    tail = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means.double(), tail)
    return 100 * per_image.mean().item(), 100 * low.item(), 100 * high.item()


# -----------------------------------------------------------------------------
# SPoT-ON over a whole split in batches

def search_split(model, images_uint8, labels, start, config, objective="label", desc="search"):
    """oracle_search over a whole split in batches, with config's (an EvalConfig) search_steps,
    search_lr, batch_size, device and progress -> final positions (n, N, 2) on the CPU."""
    found, batch, device = [], config.batch_size, config.device
    for i in tqdm(range(0, len(images_uint8), batch), desc, leave=False, disable=not config.progress):
        images = images_uint8[i:i + batch].to(device).float().div_(255)
        y = None if labels is None else labels[i:i + batch].to(device)
        found.append(oracle_search(model, images, y, start[i:i + batch].to(device), config.search_steps,
                                   config.search_lr, objective).positions.cpu())
    return torch.cat(found)


# -----------------------------------------------------------------------------
# The paper's results table: every prior x budget, then the SPoT-ON rows

# Every EvalConfig field made by utils.option is also a flag of oracle.py (search_steps -> --search-steps).
option, COUNT, POSITIVE = utils.option, utils.int_at_least(0), utils.float_in(0, low_open=True)


@dataclass
class EvalConfig:
    """What evaluate computes. Every field but `device` is also a flag of oracle.py (option), and
    results.json keeps them all in its "settings" (with oracle.py's other flags)."""
    checkpoint: str = option(None, "checkpoint.pt written by train.py", required=True)
    tokens: tuple = option((4, 8, 16, 32, 64), "token budgets: N, A,B,C, A-B, 'all' (the grid) or a mix")
    priors: tuple = option(("grid", "uniform", "gaussian", "sobol", "isotropic", "center", "salient"),
                           "priors to evaluate", type=utils.name_list(spot.PRIORS))
    draws: int = option(1, "position draws per random prior (for the interval)", type=utils.int_at_least(1))
    search_from: str = option("isotropic", "the searches' start", choices=spot.PRIORS, old="--oracle-from")
    search_steps: int = option(DEFAULT_STEPS, "Adam steps of the search", type=COUNT, old="--oracle-steps")
    search_lr: float = option(DEFAULT_LR, "Adam lr (normalized coordinates)", type=POSITIVE, old="--oracle-lr")
    split: str = option("test", "test, or val: the images train.py --val-size held out (to choose settings)",
                        choices=("test", "val"))
    limit: int = option(None, "the first N images of --split (None: all)", type=utils.int_at_least(1))
    search_limit: int = option(None, "search on the first N of those (None: all; 0: no SPoT-ON)", type=COUNT)
    saliency_limit: int = option(500, "finding 3 on the first N searched images (0: off)", type=COUNT)
    knn_limit: int = option(5000, "kNN bank = the first N train images (0: no kNN)", type=COUNT)
    knn_k: int = option(20, "neighbours of the kNN vote", type=utils.int_at_least(1))
    knn_temperature: float = option(0.07, "kNN vote weight exp(sim / T)", type=POSITIVE)
    transfer_checkpoint: str = option(None, "a second model: its oracle positions read by ours, and back")
    batch_size: int = option(128, "images per forward pass", type=utils.int_at_least(1))
    seed: int = option(0, "seed of the position draws and the bootstrap", type=int)
    progress: bool = option(True, "tqdm bars", action=argparse.BooleanOptionalAction)
    device: str = "cpu"                     # --device auto picks cuda when there is one


def table_row(method, prior, tokens, correct=None, knn_correct=None, seed=0, **extra):
    """One cell of the table: accuracies with their 95 % intervals (None = not applicable).
    correct / knn_correct: (draws, n) or (n,) 0/1 per image."""
    row = {"method": method, "prior": prior, "tokens": tokens, **extra}
    for name, values in (("top1", correct), ("knn", knn_correct)):
        mean, low, high = (None, None, None) if values is None else bootstrap_interval(values, seed=seed)
        row.update({name: mean, f"{name}_low": low, f"{name}_high": high})
    row["n_images"] = None if correct is None else correct.shape[-1]
    row["draws"] = None if correct is None else (correct.shape[0] if correct.dim() == 2 else 1)
    return row


def prior_rows(model, test, bank, config, per_image):
    """The prior rows: every prior x budget, top-1 and kNN, `draws` position draws for the random
    priors (one for the deterministic isotropic and center lattices).

    kNN: the bank is featurized with the SAME prior and budget as the queries (a fresh draw), so
    it measures how good the class token is when the model reads every image that way.
    """
    (test_x, test_y), (bank_x, bank_y), rows = test, bank, []
    size, window, device, batch = model.config.image_size, model.config.window, config.device, config.batch_size
    for prior, tokens in tqdm([(p, n) for p in config.priors for n in config.tokens], "priors",
                              disable=not config.progress):
        if prior == "grid" and tokens > len(spot.grid_positions(size, window)):   # patch dropout cannot
            rows.append(table_row("prior", prior, tokens))                         # exceed the grid: n/a
            continue
        draw = lambda x, *key: train.draw_positions(prior, x, tokens, window,
                                              train.seed_for(config.seed, prior, tokens, *key), device)
        bank_features = len(bank_x) and train.predict(model, bank_x, draw(bank_x, "bank"), device, batch, True)[1]
        correct, knn_correct = [], []
        for index in range(config.draws if prior in train.RANDOM_PRIORS else 1):
            key = ("test",) + ((index,) if index else ())            # draw 0: the searches' start
            logits, features = train.predict(model, test_x, draw(test_x, *key), device, batch, len(bank_x) > 0)
            correct.append(logits.argmax(1) == test_y)
            if len(bank_x):
                knn_correct.append(knn_predict(bank_features, bank_y, features, model.config.num_classes,
                                               config.knn_k, config.knn_temperature) == test_y)
        correct, knn_correct = torch.stack(correct), torch.stack(knn_correct) if knn_correct else None
        rows.append(table_row("prior", prior, tokens, correct, knn_correct, config.seed))
        per_image["top1", "prior", prior, tokens] = correct                          # (draws, n)
        if knn_correct is not None:
            per_image["knn", "prior", prior, tokens] = knn_correct
    return rows


def hits(model, test, positions, config):
    """(n,) bool: which of the images test = (uint8 images, labels) `model` classifies right
    when it reads them at `positions`."""
    return train.predict(model, test[0], positions, config.device, config.batch_size)[0].argmax(1) == test[1]


def saliency_rows(model, test, tokens, named_positions, maps, config, per_image):
    """Finding 3 at one budget, under each saliency map: maps = {"spectral": spot.saliency_map,
    "model": gradient_saliency} of the first n images of test = (uint8 images, labels), (n, H, W).
    Each map also gives a salient prior ("salient" from spectral residual, as the prior rows draw
    it; "salient-model"). -> (the model-salient prior's top-1 row on those n images, records: the
    saliency read of each (name, positions) and salient prior under each map, mean and 95 % interval)."""
    size, window, seed, n = model.config.image_size, model.config.window, config.seed, len(maps["spectral"])
    named, records = dict(named_positions), []
    for kind, saliency in maps.items():
        name = "salient" if kind == "spectral" else f"salient-{kind}"
        named[name] = train.draw_positions("salient", saliency, tokens, window, train.seed_for(seed, name, tokens, "test"),
                                     config.device)
    per_image["top1", "prior", "salient-model", tokens] = correct = hits(
        model, (test[0][:n], test[1][:n]), named["salient-model"], config)
    for kind, name in ((kind, name) for kind in maps for name in named):
        per_image[f"saliency-{kind}", "read", name, tokens] = read = saliency_read(maps[kind], named[name][:n], window)
        mean, low, high = (value / 100 for value in bootstrap_interval(read, seed=seed))
        records.append({"saliency": kind, "positions": name, "tokens": tokens, "mean": mean, "low": low,
                        "high": high, "n_images": n})
    return table_row("prior", "salient-model", tokens, correct, seed=seed), records


def search_rows(model, test, config, transfer_model, per_image):
    """The SPoT-ON rows, per budget -> (rows, transfer_reverse, saliency):
    "spot-on"           the label oracle (oracle_search), from the `search_from` prior row's very
                        positions (same seed), so the gain is measured on identical starts;
    "spot-on-snapped"   its positions snapped to the grid (snapping);
    "spot-on-transfer"  with a second model: positions that model's oracle found, read by ours
                        (finding 4); transfer_reverse holds the other direction, which costs three
                        forward passes: our oracle positions on the other model, beside its own
                        prior and its own oracle on the same images;
    saliency            finding 3 on the first config.saliency_limit images (saliency_rows),
                        under spectral residual and the model's own gradient saliency.
    SPoT-ON rows get no kNN: oracle positions are chosen with the test label, so a kNN on them
    would leak it. A grid start above the grid size has no rows (the table says "n/a").
    """
    size, window, prior, seed = model.config.image_size, model.config.window, config.search_from, config.seed
    rows, reverse, saliency, first = [], [], [], test[0][:config.saliency_limit]
    maps = {"spectral": spot.saliency_map(first.float() / 255),
            "model": gradient_saliency(model, first, config.device, config.batch_size)} if len(first) else {}

    def add(method, tokens, positions, **extra):
        per_image["top1", method, prior, tokens] = correct = hits(model, test, positions, config)
        rows.append(table_row(method, prior, tokens, correct, seed=seed, **extra))
    for tokens in [n for n in config.tokens if prior != "grid" or n <= len(spot.grid_positions(size, window))]:
        start = train.draw_positions(prior, test[0], tokens, window, train.seed_for(seed, prior, tokens, "test"),
                               config.device)                                                  # (n, N, 2)
        found = search_split(model, test[0], test[1], start, config, "label", f"oracle {tokens}T")
        add("spot-on", tokens, found)
        add("spot-on-snapped", tokens, snap_to_grid(found, size, window))
        if transfer_model is not None:
            theirs = search_split(transfer_model, test[0], test[1], start, config, "label", f"transfer {tokens}T")
            add("spot-on-transfer", tokens, theirs, source=config.transfer_checkpoint)
            reverse.append(dict(model=config.transfer_checkpoint, source=config.checkpoint, prior=prior, tokens=tokens))
            for name, where in (("prior", start), ("own_oracle", theirs), ("transfer", found)):   # on their model
                per_image["top1", f"reverse-{name}", prior, tokens] = hit = hits(transfer_model, test, where, config)
                reverse[-1][f"top1_{name}"] = 100 * hit.float().mean().item()
        if maps:
            row, records = saliency_rows(model, test, tokens, [(prior, start), ("spot-on", found)], maps, config,
                                         per_image)
            rows, saliency = rows + [row], saliency + records
    return rows, reverse, saliency


def evaluate(model, dataset, config, transfer_model=None, per_image=None):
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
    images = getattr(dataset, config.split)
    n = len(images) if config.limit is None else min(config.limit, len(images))
    n_searched = n if config.search_limit is None else min(config.search_limit, n)
    n_bank = min(config.knn_limit, len(dataset.train))
    test, bank = (images.images[:n], images.labels[:n]), (dataset.train.images[:n_bank], dataset.train.labels[:n_bank])
    per_image = {} if per_image is None else per_image
    rows = prior_rows(model, test, bank, config, per_image)
    more, reverse, saliency = search_rows(model, (test[0][:n_searched], test[1][:n_searched]), config,
                                          transfer_model, per_image) if n_searched else ([], [], [])
    settings = {**asdict(config), "device": str(config.device), "dataset": dataset.name,
                "image_size": list(model.config.image_size), "model_config": asdict(model.config), "n_test": n,
                "n_searched": n_searched, "n_bank": n_bank, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "torch": torch.__version__}
    return {"settings": settings, "rows": rows + more, **({"transfer_reverse": reverse} if reverse else {}),
            **({"saliency": saliency} if saliency else {})}


def summary(results):
    """A plain-text view of results["rows"] for the terminal: top-1 % per (method, prior), then
    per budget. (experiments/tables.py renders results.json as the markdown tables of RESULTS.md.)"""
    table = {}
    for r in results["rows"]:
        table.setdefault(f"{r['method']}: {r['prior']}", []).append("n/a" if r["top1"] is None else f"{r['top1']:.1f}")
    return "\n".join([f"{'top-1 % at':<28}" + " ".join(f"{b:>5} T" for b in results["settings"]["tokens"])]
                     + [f"{name:<28}" + " ".join(f"{cell:>7}" for cell in cells) for name, cells in table.items()])


def run_name(checkpoint):
    """runs/cifar10-spot/checkpoint.pt -> 'cifar10-spot'; any other file -> its stem."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "checkpoint.pt" else path.stem


# -----------------------------------------------------------------------------
# Command line: every flag is checked before a model or an image is loaded (--tokens as soon as
# the model is: 'all' means its grid)

def parse_args(argv=None):
    """oracle.py's flags: EvalConfig's fields (search_steps -> --search-steps) and a few more
    -> (parser, args), --device resolved and --out proven writable."""
    parser = argparse.ArgumentParser(description="SPoT-ON (the oracle search) and the paper's results table.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_fields(parser, EvalConfig)
    add = parser.add_argument
    add("--name", help="a run name for the table, e.g. cifar10-spot (None: the checkpoint's folder)")
    add("--data-dir", help="dataset folder (None: the one the checkpoint was trained on)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--threads", type=utils.int_at_least(1), help="CPU threads for torch (None: all cores)")
    add("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        args.device = utils.resolve_device(args.device)
        utils.check_out_dir(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    return parser, args


def setup(argv=None):
    """oracle.py's command line, checked, and what it names loaded -> (parser, args, model,
    dataset, the transfer model or None, EvalConfig). experiments/label_free.py reuses it."""
    parser, args = parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())      # --threads, else all cores
    try:         # a bad file or flag is a message, never a traceback
        model, dataset, train_args = data.load_model_and_data(args.checkpoint, args.device, args.data_dir,
                                                              args.progress)
        args.data_dir = args.data_dir or train_args.get("data_dir")
        args.tokens = utils.parse_tokens(args.tokens, len(spot.grid_positions(model.config.image_size,
                                                                              model.config.window)))
        other = spot.load_checkpoint(args.transfer_checkpoint, args.device) if args.transfer_checkpoint else None
        if other is not None and (other.config.image_size, other.config.num_classes) != (
                model.config.image_size, model.config.num_classes):
            raise ValueError("--transfer-checkpoint: its model must read the same images and classes as ours")
        if args.split == "val" and dataset.val is None:
            raise ValueError("--split val: this run held out no validation images (train.py --val-size 0)")
    except ValueError as error:
        parser.error(str(error))
    except data.DataError as error:      # a paragraph for the user, no usage text
        parser.exit(2, f"error: {error}\n")
    config = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)})
    return parser, args, model, dataset, other, config


def main(argv=None):
    _, args, model, dataset, other, config = setup(argv)
    results = evaluate(model, dataset, config, other, per_image := {})
    # The settings keep the other flags too (out, name, threads, ...).
    results["settings"] = {**vars(args), **results["settings"], "run": args.name or run_name(args.checkpoint)}
    utils.write_atomic(Path(args.out) / "results.json", json.dumps(results, indent=2))
    utils.save_per_image(Path(args.out) / "per_image.npz", per_image)        # last: the run is complete
    print(summary(results) + f"\nwrote {args.out}/results.json and per_image.npz (python -m experiments.tables "
          f"{args.out} renders it as markdown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

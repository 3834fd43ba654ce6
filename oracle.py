"""
oracle.py -- SPoT-ON, the oracle-guided token placement search (PAPER §4), and the evaluation
table of PAPER §5-§6 (top-1 and kNN accuracy, with 95 % intervals, for every prior and budget).

Read beside PAPER.md:

    oracle_search    PAPER §4   freeze the ViT, move each image's token positions by gradient
                                descent on its own loss (Adam, projected back into [0, 1])
                                objective="label":   cross-entropy with the true label = the oracle
                                objective="entropy": beyond the paper (its open problem, §6): the
                                    entropy of the model's own prediction, needs no label
    snap_to_grid     PAPER §4   move each found position to the nearest patch-grid centre: what is
                                subpixel precision itself worth?
    knn_predict      PAPER §5   DINO-style weighted kNN on the class-token feature
    evaluate         PAPER §6   the table: every prior x budget, then the SPoT-ON rows
    gap_rows         §6 open    label-free placement (entropy search, placement.py's head) against
                                the best prior: points gained, share of the oracle gap closed

Run it on a checkpoint written by train.py:

    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/shapes/oracle
    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/shapes/oracle --limit 500 \
        --transfer-checkpoint runs/shapes_seed1/checkpoint.pt          # + transfer rows (§4)

It writes DIR/results.json (every number, plus the settings) and DIR/results.md (a table laid
out like PAPER §6: one row per (method, prior), one column per token budget, "top1 / knn").
(The (steps, lr) sweep that chose the search defaults and the search's timing live in bench.py.)

Why the oracle matters: with a fixed, frozen model, the only thing it changes is *where* the
tokens look. Its accuracy is an upper bound on what any placement strategy could achieve with
that model and budget, and the gap between a prior and the oracle is the room left for a
learned, label-free placement (PAPER §6, "closing the gap to the oracle without labels").
"""

import argparse
import datetime
import json
import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
import data
from experiments import placement
import spot

__all__ = ["OBJECTIVES", "DEFAULT_STEPS", "DEFAULT_LR", "OracleResult", "oracle_search",
           "per_image_objective", "snap_to_grid", "knn_predict", "knn_accuracy",
           "bootstrap_interval", "evaluate", "gap_rows", "main"]

# -----------------------------------------------------------------------------
# PAPER §4: the search

OBJECTIVES = ("label", "entropy")
# The official code runs 5 Adam steps at lr 3e-3 (normalized coordinates, 224 px images). On
# 32 px images a step of 3e-3 is a tenth of a pixel, so these defaults were chosen by a
# (steps, lr) sweep on *train* images (bench.py's oracle-sweep section; the README has the table).
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

    "label":   cross-entropy with the true label, -log p(y | I, S). Uses y: the oracle (PAPER §4).
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


def oracle_search(model, images, labels, positions, steps=DEFAULT_STEPS, lr=DEFAULT_LR,
                  objective="label"):
    """SPoT-ON (PAPER §4): argmin_S L(g(I, S), y) over each image's own positions, model frozen.

    model:     an SPoTViT (anything called as model(images, positions) -> logits)
    images:    (B, C, H, W) float in [0, 1]
    labels:    (B,) int64 true classes (objective="label"); may be None for "entropy"
    positions: (B, N, 2) start positions S^0, e.g. a prior sample (spot.sample_positions)
    steps, lr: Adam steps and step size in normalized coordinates (lr 1e-2 = 0.32 px at 32 px)
    -> OracleResult(positions (B, N, 2), trajectory (steps + 1, B, N, 2), losses (steps + 1, B))

    The model is *frozen*: its parameters, their .grad and its train/eval flags are exactly as
    before when this returns. The search runs in eval mode (a deterministic g, PAPER §4).

    Every image is optimized independently, as in the paper, and that takes two details:
    1. The batch loss is the SUM of per-image losses, not the mean. Image b's positions only
       influence image b's logits (tokens of different images never meet), so the gradient of
       the sum w.r.t. positions[b] is exactly the gradient of image b's own loss; a mean would
       divide it by B, and the step would depend on the batch size.
    2. Adam is element-wise: every coordinate keeps its own first and second moments (m, v), so
       no statistic is shared between images (a global gradient-norm clip, for instance, would
       couple them). Searching a batch therefore equals searching each image alone.
    Adam is written out by hand below (it is five lines) rather than using torch.optim, so the
    update is visible, and there is no optimizer object that could leak state between calls.
    """
    # images and positions are checked by the model itself (spot.extract_patches); the rest here.
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "label" and (labels is None or not torch.is_tensor(labels)
                                 or labels.shape != (len(images),) or labels.is_floating_point()):
        raise ValueError(f"labels must be an integer tensor of shape ({len(images)},) for "
                         f"objective='label' (the oracle uses the true label); use "
                         f"objective='entropy' for a label-free search")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    images = images.detach()
    pos = positions.detach().to(device=images.device, dtype=torch.float32).clone()   # (B, N, 2)
    # Remember every module's mode (not just the top one: a caller may have mixed modes).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    beta1, beta2 = ADAM_BETAS
    m = torch.zeros_like(pos)     # Adam's first moment: running mean of the gradient   (B, N, 2)
    v = torch.zeros_like(pos)     # second moment: running mean of the squared gradient (B, N, 2)
    trajectory, losses = [pos.clone()], []
    try:
        with torch.enable_grad():     # also works when the caller is inside torch.no_grad()
            for t in range(1, steps + 1):
                pos.requires_grad_(True)
                loss = per_image_objective(model(images, pos), labels, objective)      # (B,)
                # Gradient w.r.t. the positions ONLY: torch.autograd.grad does not touch the
                # parameters' .grad, and autograd skips the weight-gradient work entirely
                # because no requested input depends on it.
                (grad,) = torch.autograd.grad(loss.sum(), pos)                        # (B, N, 2)
                losses.append(loss.detach())
                with torch.no_grad():
                    m = beta1 * m + (1 - beta1) * grad
                    v = beta2 * v + (1 - beta2) * grad * grad
                    m_hat = m / (1 - beta1 ** t)      # bias correction: m, v start at zero
                    v_hat = v / (1 - beta2 ** t)
                    # Each coordinate moves by about lr per step whatever the gradient's scale.
                    pos = pos.detach() - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
                    # Projection: S must stay inside the image, S ⊆ Ω_subpix (PAPER §4).
                    pos = pos.clamp_(0.0, 1.0)
                trajectory.append(pos.clone())
        with torch.no_grad():         # the objective at the final positions
            losses.append(per_image_objective(model(images, pos), labels, objective))
    finally:
        for module, mode in modes:
            module.training = mode
    return OracleResult(positions=pos, trajectory=torch.stack(trajectory), losses=torch.stack(losses))


def snap_to_grid(positions, image_size, window):
    """Move every position to the nearest patch-grid cell centre (spot.grid_positions).

    (..., N, 2) -> same shape. Comparing snapped with unsnapped oracle placements measures what
    subpixel precision is worth (PAPER §4): the snapped tokens are ones a standard grid ViT could
    read (possibly the same cell twice: the budget N is kept, duplicates included). Ties (a point
    exactly between two centres) go to the first cell in row-major order.
    """
    if not torch.is_tensor(positions) or positions.dim() < 2 or positions.shape[-1] != 2:
        desc = tuple(positions.shape) if torch.is_tensor(positions) else type(positions).__name__
        raise ValueError(f"positions must be a tensor (..., N, 2) of (y, x), got {desc}")
    cells = spot.grid_positions(image_size, window).to(positions.device, positions.dtype)  # (G, 2)
    # Squared distance from every position to every cell centre, written out (torch.cdist may
    # use a matmul formula that is not exact); (..., N, G) is small: G is the grid size.
    dist = ((positions[..., None, :] - cells) ** 2).sum(-1)                                # (..., N, G)
    return cells[dist.argmin(dim=-1)]                                                      # (..., N, 2)


def saliency_read(images, positions, window, saliency=None):
    """PAPER §6, finding 3 as a number: how salient is what the tokens read? -> (B,)

    The mean of spot.saliency_map inside each image's k x k token windows, divided by the map's
    mean over the image: 1 = the tokens read average pixels, 2 = twice as salient as average.
    images (B, C, H, W) in [0, 1], positions (B, N, 2); windows hanging outside read zero.
    saliency: the images' maps (B, H, W), when already computed (they do not depend on positions).
    """
    if saliency is None:
        saliency = spot.saliency_map(images)                                 # (B, H, W), sums to 1
    windows = spot.extract_patches(saliency[:, None], positions, window)     # (B, N, 1, k, k)
    return windows.mean(dim=(1, 2, 3, 4)) * saliency[0].numel()


# -----------------------------------------------------------------------------
# PAPER §5: kNN accuracy on the class-token feature

def knn_predict(bank_features, bank_labels, features, num_classes, k=20, temperature=0.07,
                chunk=1024):
    """Weighted kNN classification, as in DINO's eval_knn -> predicted classes (Q,).

    bank_features (M, D), bank_labels (M,): the "training set" of the classifier
    features (Q, D): the images to classify
    Features are L2-normalized, so the dot product is the cosine similarity. Each query takes
    its k most similar bank entries; entry j votes for its class with weight exp(sim_j / T).
    """
    bank = F.normalize(bank_features.float(), dim=1)                     # (M, D)
    queries = F.normalize(features.float(), dim=1)                       # (Q, D)
    bank_labels = bank_labels.to(bank.device)
    k = min(k, len(bank))
    predictions = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        top_sim, top_idx = (q @ bank.T).topk(k, dim=1)                   # (q, k) cosine similarity
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())  # (q, classes)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


def knn_accuracy(bank_features, bank_labels, features, labels, num_classes, k=20, temperature=0.07):
    """knn_predict's accuracy on labelled queries, in percent."""
    predictions = knn_predict(bank_features, bank_labels, features, num_classes, k, temperature)
    return 100.0 * (predictions == labels.to(predictions.device)).sum().item() / max(len(labels), 1)


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
    per_image = correct.float().reshape(-1, correct.shape[-1]).mean(0)          # (n,)
    n = len(per_image)
    generator = torch.Generator().manual_seed(seed)
    means = torch.cat([per_image[torch.randint(0, n, (min(100, resamples - i), n),
                                               generator=generator)].mean(1)
                       for i in range(0, resamples, 100)])                       # (resamples,)
    tail = (1 - level) / 2
    low, high = torch.quantile(means.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return 100 * per_image.mean().item(), 100 * low.item(), 100 * high.item()


# -----------------------------------------------------------------------------
# Whole splits in batches. Splits stay uint8 on the CPU (data.py); each batch becomes float on
# `device`. Positions are drawn in fixed chunks, so they do not depend on --batch-size.

POSITION_CHUNK = 256
RANDOM_PRIORS = ("uniform", "gaussian", "sobol", "salient", "grid")   # a new draw, new positions


def seed_for(seed, *key):
    """A stable seed per (seed, prior, budget, role, ...). Python's hash() of a str is randomized
    per process, so use CRC32: the same command gives the same positions, run after run."""
    return (seed * 1_000_003 + zlib.crc32(":".join(map(str, key)).encode())) % (2**63 - 1)


def draw_positions(prior, images_uint8, n_tokens, image_size, window, seed, device):
    """Positions for a whole split from one prior: (n, N, 2) on the CPU, reproducible from seed.
    "salient" needs the images (spot.saliency_map)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, len(images_uint8), POSITION_CHUNK):
        chunk = images_uint8[start:start + POSITION_CHUNK]
        images = chunk.to(device).float().div_(255) if prior == "salient" else None
        out.append(spot.sample_positions(prior, len(chunk), n_tokens, image_size, window,
                                         generator=generator, images=images).cpu())
    return torch.cat(out)


@torch.no_grad()
def predict(model, images_uint8, positions, device, batch_size, features=False, bf16=False):
    """The one evaluation loop of this project: read a whole split through given positions.

    images_uint8 (n, C, H, W) uint8 on the CPU (data.py keeps splits that way; each batch becomes
    float in [0, 1] on `device`), positions (n, N, 2). Eval mode, no gradients, bf16 autocast
    when asked. -> (logits (n, classes), class-token features (n, D) or None), float32 on the CPU.
    """
    was_training = model.training
    model.eval()
    logits, feats = [], []
    for start in range(0, len(images_uint8), batch_size):
        images = images_uint8[start:start + batch_size].to(device).float().div_(255)
        with utils.autocast(images.device, bf16):
            tokens = model.forward_features(images, positions[start:start + batch_size].to(device))
            logits.append(model.forward_head(tokens).float().cpu())                      # (B, classes)
            if features:
                feats.append(model.forward_head(tokens, pre_logits=True).float().cpu())  # (B, D)
    model.train(was_training)
    return torch.cat(logits), (torch.cat(feats) if features else None)


def search_split(model, images_uint8, labels, start, device, batch_size, steps, lr, objective,
                 progress=False, desc="search"):
    """oracle_search over a whole split in batches -> final positions (n, N, 2) on the CPU."""
    found = []
    for begin in tqdm(range(0, len(images_uint8), batch_size), desc=desc, leave=False,
                      disable=not progress, dynamic_ncols=True):
        images = images_uint8[begin:begin + batch_size].to(device).float().div_(255)
        y = labels[begin:begin + batch_size].to(device) if labels is not None else None
        result = oracle_search(model, images, y, start[begin:begin + batch_size].to(device),
                               steps=steps, lr=lr, objective=objective)
        found.append(result.positions.cpu())
    return torch.cat(found)


# -----------------------------------------------------------------------------
# PAPER §6: the table

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


def prior_rows(model, test, bank, budgets, priors, draws, knn_k, knn_temperature, seed, device,
               batch_size, progress, per_image=None):
    """PAPER §6, the prior rows: every prior x budget, top-1 and kNN, `draws` position draws for
    the random priors (one for the deterministic isotropic and center lattices).

    kNN (PAPER §5): the bank is featurized with the SAME prior and budget as the queries (a fresh
    draw), so it measures how good the class token is when the model reads every image that way.
    """
    config = model.config
    n_grid = len(spot.grid_positions(config.image_size, config.window))
    (test_x, test_y), (bank_x, bank_y) = test, bank
    rows = []
    for prior, tokens in tqdm([(p, n) for p in priors for n in budgets], desc="priors",
                              disable=not progress, dynamic_ncols=True):
        if prior == "grid" and tokens > n_grid:              # patch dropout cannot exceed the grid
            rows.append(table_row("prior", prior, tokens))
            continue
        bank_features = None
        if len(bank_x):
            bank_positions = draw_positions(prior, bank_x, tokens, config.image_size, config.window,
                                            seed_for(seed, prior, tokens, "bank"), device)
            bank_features = predict(model, bank_x, bank_positions, device, batch_size, features=True)[1]
        correct, knn_correct = [], []
        for draw in range(draws if prior in RANDOM_PRIORS else 1):
            key = (prior, tokens, "test") + ((draw,) if draw else ())    # draw 0: SPoT-ON's start
            positions = draw_positions(prior, test_x, tokens, config.image_size, config.window,
                                       seed_for(seed, *key), device)
            logits, features = predict(model, test_x, positions, device, batch_size,
                                       features=bank_features is not None)
            predictions = logits.argmax(1)
            correct.append(predictions == test_y)
            if bank_features is not None:
                knn_correct.append(knn_predict(bank_features, bank_y, features,
                                               config.num_classes, knn_k, knn_temperature) == test_y)
        rows.append(table_row("prior", prior, tokens, torch.stack(correct),
                              torch.stack(knn_correct) if knn_correct else None, seed))
        if per_image is not None:
            per_image["prior", prior, tokens] = torch.stack(correct).cpu()          # (draws, n)
    return rows


def learned_rows(model, placer, test, bank, budgets, knn_k, knn_temperature, seed, device,
                 batch_size, per_image=None):
    """Beyond the paper (placement.py): glance-then-place, label-free, per budget -> rows with
    top-1 and kNN (no label is used, so the kNN bank is read the same way) and the cost:
    seconds per image, and that time as a multiple of reading the isotropic prior at the budget."""
    config = model.config
    (test_x, test_y), (bank_x, bank_y) = test, bank
    rows = []
    for tokens in budgets:
        if tokens < 2:                                   # nothing to glance with and place
            rows.append(table_row("spot-learned", "isotropic", tokens))
            continue
        lattice = draw_positions("isotropic", test_x, tokens, config.image_size, config.window, 0, device)
        started = time.perf_counter()
        predict(model, test_x, lattice, device, batch_size)
        prior_seconds = time.perf_counter() - started
        started = time.perf_counter()
        positions = placement.place_split(model, placer, test_x, tokens, device, batch_size)
        logits, features = predict(model, test_x, positions, device, batch_size, features=len(bank_x) > 0)
        predictions = logits.argmax(1)
        seconds = time.perf_counter() - started
        knn_correct = None
        if len(bank_x):
            bank_positions = placement.place_split(model, placer, bank_x, tokens, device, batch_size)
            bank_features = predict(model, bank_x, bank_positions, device, batch_size, features=True)[1]
            knn_correct = knn_predict(bank_features, bank_y, features, config.num_classes, knn_k,
                                      knn_temperature) == test_y
        if per_image is not None:
            per_image["spot-learned", "isotropic", tokens] = (predictions == test_y).cpu()
        rows.append(table_row("spot-learned", "isotropic", tokens, predictions == test_y, knn_correct,
                              seed, glance=placement.glance_size(tokens, placer.config.glance_fraction),
                              ms_per_image=1000 * seconds / len(test_x),
                              cost_vs_prior=seconds / prior_seconds))
    return rows


def search_rows(model, test, budgets, oracle_from, steps, lr, seed, device, batch_size, progress,
                transfer_model=None, transfer_source=None, model_source=None, saliency_limit=500,
                per_image=None):
    """PAPER §4 and §6, the SPoT-ON rows, per budget: the label oracle, its label-free (entropy)
    twin, the oracle snapped to the grid, and (with a second model) oracle positions found by the
    other model -> (rows, transfer_reverse, saliency). Every search starts from the very positions
    of the `oracle_from` prior row (same seed), so the gain is measured on identical starting points.
    saliency: finding 3 on the first `saliency_limit` images, the saliency read (saliency_read)
    by the start, the oracle and the salient prior, each a mean with its 95 % interval.

    SPoT-ON rows get no kNN: oracle positions are chosen with the test label, so a kNN on them
    would leak it. The oracle and entropy rows carry their cost (ms_per_image, cost_vs_prior).
    per_image: a dict to fill with each row's 0/1 correctness per image, for gap_rows.
    """
    config = model.config
    n_grid = len(spot.grid_positions(config.image_size, config.window))
    test_x, test_y = test
    search = lambda net, labels, start, objective, desc: search_split(
        net, test_x, labels, start, device, batch_size, steps, lr, objective, progress, desc)
    correct = lambda net, positions: predict(net, test_x, positions, device, batch_size)[0].argmax(1) == test_y
    rows, reverse, saliency = [], [], []
    if saliency_limit:      # the images and their saliency maps, once for every budget
        salient_x = test_x[:saliency_limit]
        salient_maps = spot.saliency_map(salient_x.float() / 255)                # (n, H, W)
    for tokens in budgets:
        methods = ["spot-on", "spot-on-entropy", "spot-on-snapped"]
        extra = {"spot-on-transfer": {"source": transfer_source}} if transfer_model else {}
        if oracle_from == "grid" and tokens > n_grid:
            rows += [table_row(m, oracle_from, tokens, **extra.get(m, {})) for m in methods + list(extra)]
            continue
        start = draw_positions(oracle_from, test_x, tokens, config.image_size, config.window,
                               seed_for(seed, oracle_from, tokens, "test"), device)   # (n, N, 2)
        # The cost of a search: its wall time per image, and that time as a multiple of one
        # forward pass at the same budget (reading the start positions), measured side by side.
        started = time.perf_counter()
        correct(model, start)
        read_seconds = time.perf_counter() - started
        found, seconds = {}, {}
        for method, labels, objective in (("spot-on", test_y, "label"), ("spot-on-entropy", None, "entropy")):
            started = time.perf_counter()
            found[method] = search(model, labels, start, objective, f"{objective} {tokens}T")
            seconds[method] = time.perf_counter() - started
        oracle_positions, entropy_positions = found["spot-on"], found["spot-on-entropy"]
        snapped_positions = snap_to_grid(oracle_positions, config.image_size, config.window)
        for method, positions in zip(methods, (oracle_positions, entropy_positions, snapped_positions)):
            hits = correct(model, positions)
            cost = {} if method not in seconds else {
                "ms_per_image": 1000 * seconds[method] / len(test_x),
                "cost_vs_prior": seconds[method] / read_seconds}
            rows.append(table_row(method, oracle_from, tokens, hits, seed=seed, **cost))
            if per_image is not None:
                per_image[method, oracle_from, tokens] = hits.cpu()
        if transfer_model is not None:
            # PAPER §4, finding 4: positions found with another, independently trained model.
            transfer_positions = search(transfer_model, test_y, start, "label", f"transfer {tokens}T")
            rows.append(table_row("spot-on-transfer", oracle_from, tokens,
                                  correct(model, transfer_positions), seed=seed, source=transfer_source))
            # The reverse direction costs three forward passes: our positions on the other model,
            # next to that model's own prior and own oracle accuracy on the same images.
            on_other = lambda positions: 100 * correct(transfer_model, positions).float().mean().item()
            reverse.append({"model": transfer_source, "source": model_source, "prior": oracle_from,
                            "tokens": tokens, "top1_prior": on_other(start),
                            "top1_own_oracle": on_other(transfer_positions),
                            "top1_transfer": on_other(oracle_positions)})
        if saliency_limit:
            salient = draw_positions("salient", salient_x, tokens, config.image_size,
                                     config.window, seed_for(seed, "salient", tokens, "test"), device)
            for name, positions in ((oracle_from, start), ("spot-on", oracle_positions), ("salient", salient)):
                read = saliency_read(None, positions[:saliency_limit], config.window, salient_maps)
                mean, low, high = bootstrap_interval(read, seed=seed)
                saliency.append({"positions": name, "tokens": tokens, "mean": mean / 100,
                                 "low": low / 100, "high": high / 100, "n_images": len(salient_x)})
    return rows, reverse, saliency


def evaluate(model, dataset, budgets, priors, oracle_from="isotropic", steps=DEFAULT_STEPS,
             lr=DEFAULT_LR, limit=None, search_limit=None, saliency_limit=500, knn_limit=5000,
             knn_k=20, knn_temperature=0.07, draws=1, transfer_model=None, transfer_source=None,
             model_source=None, split="test", batch_size=128, seed=0, device="cpu", progress=True,
             placer=None):
    """Every prior x budget, (with a placer: glance-then-place,) then SPoT-ON
    -> (rows, transfer_reverse, saliency, gap_closed).

    rows: [{"method", "prior", "tokens", "top1", "top1_low", "top1_high", "knn", "knn_low",
    "knn_high", "n_images", "draws"(, "source")}], accuracies in percent with 95 % intervals, or
    None where not applicable (the grid prior above the grid size, kNN for SPoT-ON).
    The images are the first `limit` of `split` ("test", or "val" to choose settings without
    touching the test set), and the searches run on the first `search_limit` of those (a search
    costs ~2 x steps forward passes per image); the kNN bank is the first `knn_limit` train images.
    gap_closed: gap_rows, the label-free methods against the best prior and the oracle.
    """
    images = getattr(dataset, split)
    n = len(images) if limit is None else min(limit, len(images))
    test = images.images[:n], images.labels[:n]
    n_bank = min(knn_limit, len(dataset.train))
    bank = dataset.train.images[:n_bank], dataset.train.labels[:n_bank]
    per_image = {}
    rows = prior_rows(model, test, bank, budgets, priors, draws, knn_k, knn_temperature, seed,
                      device, batch_size, progress, per_image)
    if placer is not None:
        rows += learned_rows(model, placer, test, bank, budgets, knn_k, knn_temperature, seed,
                             device, batch_size, per_image)
    if search_limit == 0:                                    # prior rows only
        return rows, [], [], []
    searched = tuple(t[:search_limit] for t in test)
    more, reverse, saliency = search_rows(model, searched, budgets, oracle_from, steps, lr, seed,
                                          device, batch_size, progress, transfer_model,
                                          transfer_source, model_source, saliency_limit, per_image)
    rows += more
    return rows, reverse, saliency, gap_rows(rows, per_image, budgets, seed)


LABEL_FREE = ("spot-learned", "spot-on-entropy")


def gap_rows(rows, per_image, budgets, seed=0, resamples=1000):
    """How much of the prior -> oracle gap each label-free method closes, per budget (issue 13).

    The baseline is the best image-independent prior at that budget (the prior row with the
    highest top-1 on all the evaluated images), and everything is compared on the images the
    oracle searched, image by image:

        gain       = acc(method) - acc(best prior)                              (points)
        gap closed = (acc(method) - acc(best prior)) / (acc(oracle) - acc(best prior))

    Both get a 95 % percentile bootstrap interval that resamples the *same* images for all
    three (a paired bootstrap: an image hard for the prior is usually hard for the method too,
    so the difference is known more precisely than either accuracy).
    -> [{"method", "tokens", "best_prior", "gain", "gain_low", "gain_high", "gap_closed",
         "gap_closed_low", "gap_closed_high", "n_images"}]
    """
    def accuracy(method, tokens, prior=None, n=None):
        """Per-image accuracy (n,) of a recorded row, averaged over its position draws."""
        key = next((k for k in per_image if k[0] == method and k[2] == tokens
                    and prior in (None, k[1])), None)
        if key is None:
            return None
        correct = per_image[key].float()
        return correct.reshape(-1, correct.shape[-1])[:, :n].mean(0)

    out, low, high = [], (1 - 0.95) / 2, (1 + 0.95) / 2
    for tokens in budgets:
        priors = [r for r in rows if r["method"] == "prior" and r["tokens"] == tokens
                  and r["top1"] is not None]
        oracle = accuracy("spot-on", tokens)
        if not priors or oracle is None:
            continue
        n = len(oracle)
        best = max(priors, key=lambda r: r["top1"])["prior"]
        prior = accuracy("prior", tokens, best, n)
        picks = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
        room = (oracle - prior)[picks].mean(1).clamp_min(1 / n)                     # (R,)
        for method in LABEL_FREE:
            found = accuracy(method, tokens, n=n)
            if found is None:
                continue
            gain = (found - prior)[picks].mean(1)                                     # (R,)
            mean_gain = (found - prior).mean()
            out.append({"method": method, "tokens": tokens, "best_prior": best,
                        "gain": 100 * mean_gain.item(),
                        "gain_low": 100 * gain.quantile(low).item(),
                        "gain_high": 100 * gain.quantile(high).item(),
                        "gap_closed": (mean_gain / (oracle - prior).mean().clamp_min(1 / n)).item(),
                        "gap_closed_low": (gain / room).quantile(low).item(),
                        "gap_closed_high": (gain / room).quantile(high).item(), "n_images": n})
    return out


def _cell(row):
    """'55.9 ±1.0 / 55.5 ±1.0': top-1 / kNN, each ± half its 95 % interval."""
    if row is None or row["top1"] is None:
        return "n/a"
    text = lambda name: (f"{row[name]:.1f} ±{(row[f'{name}_high'] - row[f'{name}_low']) / 2:.1f}"
                         if row.get(f"{name}_low") is not None else f"{row[name]:.1f}")
    return f"{text('top1')} / " + ("–" if row["knn"] is None else text("knn"))


METHOD_LABELS = {"prior": "SPoT", "spot-learned": "SPoT-learned (glance + place, label-free)",
                 "spot-on": "SPoT-ON (label oracle)",
                 "spot-on-entropy": "SPoT-ON (entropy, label-free)",
                 "spot-on-snapped": "SPoT-ON snapped to grid", "spot-on-transfer": "SPoT-ON transfer"}


def table_lines(rows, budgets, model=None):
    """Markdown rows of the §6 table: the grid row first, then the other priors in their
    command-line order, then the SPoT-ON rows; with model=, a first column naming the run."""
    table = {}
    for r in rows:
        table.setdefault((r["method"], r["prior"], r.get("source")), {})[r["tokens"]] = r
    methods = list(METHOD_LABELS)
    keys = sorted(table, key=lambda k: (methods.index(k[0]), k[0] == "prior" and k[1] != "grid"))
    lines = []
    for method, prior, source in keys:     # sorted() is stable: priors keep their order after grid
        label = "ViT (patch grid)" if (method, prior) == ("prior", "grid") else METHOD_LABELS[method]
        if source:
            label += f" from {run_name(source)}"
        cells = [_cell(table[method, prior, source].get(b)) for b in budgets]
        lines.append("| " + " | ".join(([model] if model else []) + [label, prior] + cells) + " |")
    return lines


def saliency_lines(saliency, budgets, model=None):
    """Finding 3's table rows: mean saliency read per position set and budget, ± half the interval."""
    cell = {(r["positions"], r["tokens"]): r for r in saliency}
    return ["| " + " | ".join(([model] if model else []) + [name] + [
        f"{cell[name, b]['mean']:.2f} ±{(cell[name, b]['high'] - cell[name, b]['low']) / 2:.2f}"
        if (name, b) in cell else "n/a" for b in budgets]) + " |"
        for name in dict.fromkeys(r["positions"] for r in saliency)]


def run_name(checkpoint):
    """runs/cifar10-spot/checkpoint.pt -> 'cifar10-spot'; any other file -> its stem."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "checkpoint.pt" else path.stem


def reverse_lines(reverse):
    return [f"| {run_name(r['model'])} | {r['tokens']} | {r['top1_prior']:.1f} | "
            f"{r['top1_own_oracle']:.1f} | {r['top1_transfer']:.1f} |" for r in reverse]


CELL_TEXT = ("Cell = top-1 % / kNN %, each ± half its 95 % bootstrap interval over images; \"–\" "
             "= not computed, \"n/a\" = not applicable.")
REVERSE_HEADER = ["| Model | Tokens | its prior | its own oracle | our oracle positions |",
                  "|---|---|---|---|---|"]


def results_markdown(rows, budgets, settings, reverse=(), saliency=(), gap=()):
    """The table of PAPER §6 for one model: grid row first, then the other priors, then SPoT-ON."""
    lines = [f"# SPoT evaluation: {settings.get('run') or settings['checkpoint']}", "",
             f"{settings['dataset']} {settings['split']} split, {settings['n_test']} images; kNN "
             f"bank {settings['n_bank']} train images (k={settings['knn_k']}, "
             f"T={settings['knn_temperature']}). {CELL_TEXT} {settings['draws']} position draw(s) "
             f"for random priors." + (f" SPoT-ON: {settings['oracle_steps']} Adam steps, lr "
             f"{settings['oracle_lr']}, from the {settings['oracle_from']} prior, on the first "
             f"{settings['n_searched']} images." if settings.get("n_searched") else ""), "",
             "| Method | Prior | " + " | ".join(f"{b} T" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    lines += table_lines(rows, budgets)
    if reverse:
        lines += ["", "Transfer, the other way: positions found with this model, evaluated on the "
                  "transfer model (top-1 %).", ""] + REVERSE_HEADER + reverse_lines(reverse)
    if saliency:
        lines += ["", f"Finding 3: the saliency the tokens read, relative to the image mean (1 = "
                  f"average pixels), on the first {saliency[0]['n_images']} images, ± half the 95 % "
                  f"interval.", "", "| Positions | " + " | ".join(f"{b} T" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)] + saliency_lines(saliency, budgets)
    if gap:
        lines += ["", f"{GAP_TEXT} Searched images: {gap[0]['n_images']}.", ""] + GAP_HEADER + gap_lines(gap, rows)
    return "\n".join(lines) + "\n"


GAP_TEXT = ("Label-free placement against the best fixed prior (issue 13), on the searched "
            "images: the gain in points and the fraction of the prior -> oracle gap it closes, "
            "each with its paired 95 % bootstrap interval; cost = wall time as a multiple of one "
            "forward pass at the budget.")
GAP_HEADER = ["| Method | Tokens | best prior | gain (points) | gap closed | cost |", "|---|---|---|---|---|---|"]


def _times(multiple):
    """1.34 -> '1.3x', 38.2 -> '38x'."""
    return f"{multiple:.1f}x" if multiple < 10 else f"{multiple:.0f}x"


def gap_lines(gap, rows, model=None):
    """One line per (label-free method, budget) of gap_rows; with model=, a first column."""
    cost = {(r["method"], r["tokens"]): r.get("cost_vs_prior") for r in rows}
    return [f"| {model + ' | ' if model else ''}{METHOD_LABELS[g['method']]} | {g['tokens']} | {g['best_prior']} | "
            f"{g['gain']:+.1f} [{g['gain_low']:+.1f}, {g['gain_high']:+.1f}] | "
            f"{100 * g['gap_closed']:.1f} % [{100 * g['gap_closed_low']:.1f}, "
            f"{100 * g['gap_closed_high']:.1f}] | "
            + (_times(cost[g['method'], g['tokens']]) if cost.get((g['method'], g['tokens'])) else "–")
            + " |" for g in gap]


def combined_markdown(results_list):
    """One §6 table for several models on the same data (e.g. the grid ViT, the retrofit and
    SPoT from scratch), a first column naming each run -> markdown text. results_list: the dicts
    oracle.py writes to results.json."""
    budgets = sorted({r["tokens"] for results in results_list for r in results["rows"]})
    runs = [results["settings"]["run"] for results in results_list]
    lines = [f"# SPoT evaluation: {', '.join(runs)}", "", CELL_TEXT, ""]
    for results in results_list:
        s = results["settings"]
        lines.append(f"- **{s['run']}**: {s['dataset']} {s['split']} split, {s['n_test']} images, "
                     f"{s['draws']} position draw(s) per random prior, kNN bank {s['n_bank']} "
                     f"train images" + (f"; SPoT-ON ({s['oracle_steps']} Adam steps, lr "
                                       f"{s['oracle_lr']}, from {s['oracle_from']}) on the first "
                                       f"{s['n_searched']}" if s.get("n_searched") else ""))
    lines += ["", "| Model | Method | Prior | " + " | ".join(f"{b} T" for b in budgets) + " |",
              "|---|---|---|" + "---|" * len(budgets)]
    for results in results_list:
        lines += table_lines(results["rows"], budgets, results["settings"]["run"])
    reverse = [r for results in results_list for r in results.get("transfer_reverse", [])]
    if reverse:
        lines += ["", "Transfer, the other way: oracle positions found with the first model, "
                  "evaluated on the second (top-1 %).", ""] + REVERSE_HEADER + reverse_lines(reverse)
    with_saliency = [results for results in results_list if results.get("saliency")]
    if with_saliency:
        n_images = sorted({r["n_images"] for results in with_saliency for r in results["saliency"]})
        lines += ["", f"Finding 3: the saliency the tokens read, relative to the image mean (1 = "
                  f"average pixels), on the first {'/'.join(map(str, n_images))} images, ± half "
                  f"the 95 % interval.", "",
                  "| Model | Positions | " + " | ".join(f"{b} T" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for results in with_saliency:
            lines += saliency_lines(results["saliency"], budgets, results["settings"]["run"])
    with_gap = [results for results in results_list if results.get("gap_closed")]
    if with_gap:
        lines += ["", GAP_TEXT, "", "| Model " + GAP_HEADER[0], "|---" + GAP_HEADER[1]]
        for results in with_gap:
            lines += gap_lines(results["gap_closed"], results["rows"], results["settings"]["run"])
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Command line: every flag is checked here, before a model or an image is loaded

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="SPoT-ON oracle search and the PAPER §6 evaluation table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    add("--name", default=None, help="a run name for the table and results.json, e.g. cifar10-spot "
        "(default: the checkpoint's folder name)")
    add("--dataset", default=None, choices=data.DATASETS,
        help="dataset (default: the one stored in the checkpoint)")
    add("--data-dir", default=None, help="dataset folder (default: the checkpoint's)")
    add("--image-size", type=utils.int_at_least(1), default=None, help="image side (default: the checkpoint's)")
    add("--cache-dir", default=None, help="decoded-image cache (default: the checkpoint's or data.py's)")
    add("--split", default="test", choices=("test", "val"),
        help="images to evaluate: the test split, or the validation split held out of train by "
             "train.py's --val-size (choose settings on val; read test once, for the final table)")
    add("--tokens", default="4,8,16,32,64", help="token budgets, comma-separated")
    add("--priors", type=utils.name_list(spot.PRIORS), default="grid,uniform,gaussian,sobol,isotropic,center,salient",
        help=f"priors to evaluate, from {spot.PRIORS}")
    add("--draws", type=utils.int_at_least(1), default=1, help="position draws per random prior (for the interval)")
    add("--oracle-from", default="isotropic", choices=spot.PRIORS, help="prior the SPoT-ON search starts from")
    add("--oracle-steps", type=utils.int_at_least(0), default=DEFAULT_STEPS, help="Adam steps of the search")
    add("--oracle-lr", type=utils.float_in(0, low_open=True), default=DEFAULT_LR, help="Adam lr (normalized coordinates)")
    add("--limit", type=utils.int_at_least(1), default=None, help="evaluate the first N images of --split (default: all)")
    add("--search-limit", type=utils.int_at_least(0), default=None,
        help="run the SPoT-ON searches on the first N of those (default: all; 0 = no SPoT-ON rows, "
             "e.g. for a grid-trained baseline)")
    add("--saliency-limit", type=utils.int_at_least(0), default=500,
        help="finding 3: saliency read by the tokens on the first N searched images (0 = off)")
    add("--knn-limit", type=utils.int_at_least(0), default=5000, help="kNN bank = first M train images (0 = no kNN)")
    add("--knn-k", type=utils.int_at_least(1), default=20, help="neighbours of the kNN vote")
    add("--knn-temperature", type=utils.float_in(0, low_open=True), default=0.07, help="kNN vote weight exp(sim / T)")
    add("--transfer-checkpoint", default=None,
        help="a second model: its oracle positions are evaluated on --checkpoint (and vice versa)")
    add("--placer", default=None, help="a placement head from placement.py: adds the label-free "
        "'SPoT-learned' rows (glance, then place) with their cost")
    add("--batch-size", type=utils.int_at_least(1), default=128)
    add("--seed", type=int, default=0, help="seed of the position draws and the bootstrap")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--threads", type=utils.int_at_least(1), default=None, help="CPU threads for torch (default: all cores)")
    add("--out", required=True, help="output folder")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    args = parser.parse_args(argv)

    try:
        args.tokens = utils.parse_tokens(args.tokens, 4096, "--tokens")
    except ValueError as error:
        parser.error(str(error))
    for name in ("checkpoint", "transfer_checkpoint", "placer"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{name.replace('_', '-')}: {path} " + ("is a directory; pass the checkpoint.pt "
                         "inside it" if Path(path).is_dir() else "does not exist (expected "
                         + ("a placer.pt written by placement.py)" if name == "placer" else
                            "a checkpoint.pt written by train.py)")))
    try:
        args.device = utils.resolve_device(args.device)
        utils.check_out_dir(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, saved = spot.load_checkpoint(args.checkpoint, args.device, return_checkpoint=True)
        n_grid = len(spot.grid_positions(model.config.image_size, model.config.window))
        if max(args.tokens) > 4 * n_grid:      # more is not a sparse budget, and may not fit in memory
            parser.error(f"--tokens: at most 4x the {n_grid} grid cells ({4 * n_grid}), got {max(args.tokens)}")
        transfer_model = None
        if args.transfer_checkpoint:
            transfer_model = spot.load_checkpoint(args.transfer_checkpoint, args.device)
            if (transfer_model.config.image_size, transfer_model.config.num_classes) != \
                    (model.config.image_size, model.config.num_classes):
                parser.error("--transfer-checkpoint: the model must read the same images and "
                             "predict the same classes as --checkpoint")
        placer = None
        if args.placer:
            placer = placement.load_placer(args.placer, args.device)[0]
            try:
                placement.check_fits(placer, model)
            except ValueError as error:
                parser.error(f"--placer: {error}")
        dataset = data.load_data_for(args.checkpoint, saved, args.dataset, args.data_dir,
                                args.image_size, args.cache_dir, args.progress)
    except ValueError as error:
        parser.error(str(error))
    except data.DataError as error:      # a paragraph for the user, no usage text
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.split == "val" and dataset.val is None:
        parser.error("--split val: this run held out no validation images (train.py --val-size 0)")

    rows, reverse, saliency, gap = evaluate(
        model, dataset, args.tokens, args.priors, oracle_from=args.oracle_from,
        steps=args.oracle_steps, lr=args.oracle_lr, limit=args.limit, search_limit=args.search_limit,
        saliency_limit=args.saliency_limit, knn_limit=args.knn_limit,
        knn_k=args.knn_k, knn_temperature=args.knn_temperature, draws=args.draws,
        transfer_model=transfer_model, transfer_source=args.transfer_checkpoint,
        model_source=args.checkpoint, split=args.split, batch_size=args.batch_size,
        seed=args.seed, device=args.device, progress=args.progress, placer=placer)
    n_images = len(getattr(dataset, args.split))
    settings = {**vars(args), "device": str(args.device),
                "run": args.name or run_name(args.checkpoint),
                "dataset": dataset.name, "data_dir": (saved.get("args") or {}).get("data_dir"),
                "image_size": list(model.config.image_size), "model_config": asdict(model.config),
                "n_test": min(args.limit or n_images, n_images),
                "n_searched": min(n_images if args.search_limit is None else args.search_limit,
                                  args.limit or n_images, n_images),
                "n_bank": min(args.knn_limit, len(dataset.train)),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "torch": torch.__version__}
    results = {"settings": settings, "rows": rows, **({"transfer_reverse": reverse} if reverse else {}),
               **({"saliency": saliency} if saliency else {}), **({"gap_closed": gap} if gap else {})}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = results_markdown(rows, args.tokens, settings, reverse, saliency, gap)
    utils.write_atomic(out / "results.json", json.dumps(results, indent=2))
    utils.write_atomic(out / "results.md", text)
    print(text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

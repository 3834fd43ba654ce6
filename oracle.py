"""
oracle.py -- SPoT-ON, the oracle-guided token placement search (PAPER §4), and the evaluation
table of PAPER §5-§6 (top-1 and kNN accuracy for every spatial prior and token budget).

Read beside PAPER.md:

    oracle_search    PAPER §4   freeze the ViT, move each image's token positions by gradient
                                descent on its own loss (Adam, projected back into [0, 1])
                                objective="label":   cross-entropy with the true label = the oracle
                                objective="entropy": beyond the paper (its open problem, §6): the
                                    entropy of the model's own prediction, needs no label
    snap_to_grid     PAPER §4   move each found position to the nearest patch-grid centre: what is
                                subpixel precision itself worth?
    knn_accuracy     PAPER §5   DINO-style weighted kNN on the class-token feature
    evaluate         PAPER §6   the table: every prior x budget, then the SPoT-ON rows
    sweep            (ours)     accuracy over a small (steps, lr) grid, to choose the defaults
    time_oracle      (ours)     the search's cost per image and step vs. a forward + backward

Run it on a checkpoint written by train.py:

    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/shapes/oracle
    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/shapes/oracle --limit 500 \
        --transfer-checkpoint runs/shapes_seed1/checkpoint.pt          # + transfer rows (§4)
    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/sweep --sweep --limit 500
    python oracle.py --checkpoint runs/shapes/checkpoint.pt --out runs/timing --time-oracle

It writes DIR/results.json (every number, plus the settings) and DIR/results.md (a table laid
out like PAPER §6: one row per (method, prior), one column per token budget, "top1 / knn").

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import spot

__all__ = ["OBJECTIVES", "DEFAULT_STEPS", "DEFAULT_LR", "OracleResult", "oracle_search",
           "per_image_objective", "snap_to_grid", "knn_accuracy", "sweep", "time_oracle",
           "evaluate", "main"]

# -----------------------------------------------------------------------------
# PAPER §4: the search

OBJECTIVES = ("label", "entropy")
# The official code runs 5 Adam steps at lr 3e-3 (normalized coordinates, 224 px images).
# On small images a step of 3e-3 is a tenth of a pixel, so these placeholders are larger;
# they are to be confirmed with `--sweep` on a trained model (see the README).
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


def _check_search_inputs(images, labels, positions, steps, lr, objective):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        desc = f"{tuple(images.shape)} {images.dtype}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, C, H, W) in [0, 1] (uint8 / 255), "
                         f"got {desc}")
    B = images.shape[0]
    if not torch.is_tensor(positions) or positions.dim() != 3 or positions.shape[-1] != 2:
        desc = tuple(positions.shape) if torch.is_tensor(positions) else type(positions).__name__
        raise ValueError(f"positions must be a tensor (B, N, 2) of (y, x) in [0, 1], got {desc}")
    if positions.shape[0] != B:
        raise ValueError(f"positions has batch size {positions.shape[0]} but images has {B}")
    if positions.shape[1] < 1:
        raise ValueError("positions must hold at least one token (N >= 1)")
    if not torch.isfinite(positions).all() or positions.min() < 0 or positions.max() > 1:
        raise ValueError("positions must be finite and lie in [0, 1] (normalized (y, x))")
    if objective == "label":
        if labels is None:
            raise ValueError("labels are required for objective='label' (the oracle uses the "
                             "true label); use objective='entropy' for a label-free search")
        if not torch.is_tensor(labels) or labels.shape != (B,) or labels.is_floating_point():
            desc = f"{tuple(labels.shape)} {labels.dtype}" if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must be an integer tensor of shape ({B},) (one class index "
                             f"per image), got {desc}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def oracle_search(model, images, labels, positions, steps=DEFAULT_STEPS, lr=DEFAULT_LR,
                  objective="label"):
    """SPoT-ON (PAPER §4): argmin_S L(g(I, S), y) over each image's own positions, model frozen.

    model:     an SPoTViT (anything called as model(images, positions) -> logits)
    images:    (B, C, H, W) float in [0, 1]
    labels:    (B,) int64 true classes (objective="label"); may be None for "entropy"
    positions: (B, N, 2) start positions S^0 in [0, 1], e.g. a prior sample (spot.sample_positions)
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
    _check_search_inputs(images, labels, positions, steps, lr, objective)
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


# -----------------------------------------------------------------------------
# PAPER §5: kNN accuracy on the class-token feature

def knn_accuracy(bank_features, bank_labels, features, labels, num_classes, k=20, temperature=0.07,
                 chunk=1024):
    """Weighted kNN classification, as in DINO's eval_knn -> accuracy in percent.

    bank_features (M, D), bank_labels (M,): the "training set" of the classifier
    features (Q, D), labels (Q,): the images to classify
    Features are L2-normalized, so the dot product is the cosine similarity. Each query takes
    its k most similar bank entries; entry j votes for its class with weight exp(sim_j / T).
    """
    bank = F.normalize(bank_features.float(), dim=1)                     # (M, D)
    queries = F.normalize(features.float(), dim=1)                       # (Q, D)
    bank_labels = bank_labels.to(bank.device)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        sim = q @ bank.T                                                 # (q, M) cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)                            # (q, k)
        weights = (top_sim / temperature).exp()                          # (q, k)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)             # (q, classes)
        correct += (votes.argmax(1) == labels[start:start + chunk].to(q.device)).sum().item()
    return 100.0 * correct / max(len(queries), 1)


# -----------------------------------------------------------------------------
# Batched helpers. Splits stay uint8 on the CPU (data.py); each batch becomes float on `device`.

POSITION_CHUNK = 256   # positions are drawn in fixed chunks, so they do not depend on --batch-size


def _float_images(images_uint8, device):
    return images_uint8.to(device).float().div_(255)


def _seed_for(seed, *key):
    """A stable seed per (seed, prior, budget, role). Python's hash() of a str is randomized per
    process, so use CRC32: the same command gives the same positions, run after run."""
    return (seed * 1_000_003 + zlib.crc32(":".join(map(str, key)).encode())) % (2**63 - 1)


def draw_positions(prior, images_uint8, n_tokens, image_size, window, seed, device):
    """Positions for a whole split from one prior: (n, N, 2) on the CPU.

    A fresh torch.Generator seeded from (seed, prior, N, ...) makes them reproducible; the draws
    go in fixed chunks of POSITION_CHUNK images so the batch size of the evaluation does not
    change them. "salient" needs the images (spot.saliency_map).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, len(images_uint8), POSITION_CHUNK):
        chunk = images_uint8[start:start + POSITION_CHUNK]
        imgs = _float_images(chunk, device) if prior == "salient" else None
        out.append(spot.sample_positions(prior, len(chunk), n_tokens, image_size, window,
                                         generator=generator, images=imgs).cpu())
    return torch.cat(out)


@torch.no_grad()
def predict(model, images_uint8, positions, device, batch_size, want_features=True):
    """-> (predictions (n,), class-token features (n, D) or None), all on the CPU."""
    model.eval()
    preds, feats = [], []
    for start in range(0, len(images_uint8), batch_size):
        images = _float_images(images_uint8[start:start + batch_size], device)
        pos = positions[start:start + batch_size].to(device)
        tokens = model.forward_features(images, pos)                  # (B, 1 + N, D)
        preds.append(model.forward_head(tokens).argmax(1).cpu())
        if want_features:
            feats.append(model.forward_head(tokens, pre_logits=True).float().cpu())   # (B, D)
    return torch.cat(preds), (torch.cat(feats) if want_features else None)


def search_split(model, images_uint8, labels, start, device, batch_size, steps, lr, objective,
                 progress=False, desc="search"):
    """oracle_search over a whole split in batches -> final positions (n, N, 2) on the CPU."""
    out = []
    for begin in tqdm(range(0, len(images_uint8), batch_size), desc=desc, leave=False,
                      disable=not progress, dynamic_ncols=True):
        images = _float_images(images_uint8[begin:begin + batch_size], device)
        y = labels[begin:begin + batch_size].to(device) if labels is not None else None
        result = oracle_search(model, images, y, start[begin:begin + batch_size].to(device),
                               steps=steps, lr=lr, objective=objective)
        out.append(result.positions.cpu())
    return torch.cat(out)


def _accuracy(preds, labels):
    return 100.0 * (preds == labels).sum().item() / len(labels)   # exact count, not a float32 mean


# -----------------------------------------------------------------------------
# PAPER §6: the table

def evaluate(model, dataset, budgets, priors, oracle_from="isotropic", steps=DEFAULT_STEPS,
             lr=DEFAULT_LR, limit=None, knn_limit=5000, knn_k=20, knn_temperature=0.07,
             transfer_model=None, transfer_source=None, model_source=None, batch_size=128,
             seed=0, device="cpu", progress=True):
    """Every prior x budget, then SPoT-ON -> (rows, transfer_reverse).

    rows: [{"method", "prior", "tokens", "top1", "knn"(, "source")}], accuracies in percent or
    None (None = not applicable, e.g. the grid prior above the grid size, or kNN for SPoT-ON).

    kNN (PAPER §5): the bank is the first `knn_limit` train images, featurized with the SAME
    prior and budget as the queries (a fresh draw), so it measures how good the class token is
    when the model reads every image that way. SPoT-ON rows get no kNN: oracle positions are
    chosen with the test label, so a kNN on them would leak it, and the label-free (entropy)
    search would have to be run on every bank image too to be a fair comparison.
    """
    config = model.config
    image_size, window, num_classes = config.image_size, config.window, config.num_classes
    n_grid = len(spot.grid_positions(image_size, window))
    test = dataset.test
    n_test = len(test) if limit is None else min(limit, len(test))
    test_x, test_y = test.images[:n_test], test.labels[:n_test]
    n_bank = min(knn_limit, len(dataset.train))
    bank_x, bank_y = dataset.train.images[:n_bank], dataset.train.labels[:n_bank]

    def positions_for(prior, tokens, role, images):
        return draw_positions(prior, images, tokens, image_size, window,
                              _seed_for(seed, prior, tokens, role), device)

    rows = []
    bar = tqdm(total=len(budgets) * len(priors), desc="priors", disable=not progress,
               dynamic_ncols=True)
    for prior in priors:
        for tokens in budgets:
            bar.set_postfix(prior=prior, tokens=tokens)
            if prior == "grid" and tokens > n_grid:   # patch dropout cannot exceed the grid
                rows.append({"method": "prior", "prior": prior, "tokens": tokens,
                             "top1": None, "knn": None})
                bar.update()
                continue
            preds, feats = predict(model, test_x, positions_for(prior, tokens, "test", test_x),
                                   device, batch_size, want_features=n_bank > 0)
            knn = None
            if n_bank > 0:
                _, bank_feats = predict(model, bank_x, positions_for(prior, tokens, "bank", bank_x),
                                        device, batch_size)
                knn = knn_accuracy(bank_feats, bank_y, feats, test_y, num_classes, knn_k,
                                   knn_temperature)
            rows.append({"method": "prior", "prior": prior, "tokens": tokens,
                         "top1": _accuracy(preds, test_y), "knn": knn})
            bar.update()
    bar.close()

    # SPoT-ON (PAPER §4): start from the oracle_from prior -- the very positions of its row
    # above (same seed), so the gain is measured on identical starting points.
    reverse = []
    for tokens in tqdm(budgets, desc="SPoT-ON", disable=not progress, dynamic_ncols=True):
        def row(method, top1, **extra):
            rows.append({"method": method, "prior": oracle_from, "tokens": tokens,
                         "top1": top1, "knn": None, **extra})
        if oracle_from == "grid" and tokens > n_grid:
            for method in ("spot-on", "spot-on-entropy", "spot-on-snapped"):
                row(method, None)
            if transfer_model is not None:
                row("spot-on-transfer", None, source=transfer_source)
            continue
        start = positions_for(oracle_from, tokens, "test", test_x)                  # (n, N, 2)
        found = search_split(model, test_x, test_y, start, device, batch_size, steps, lr, "label",
                             progress, desc=f"oracle {tokens}T")
        row("spot-on", _accuracy(predict(model, test_x, found, device, batch_size, False)[0], test_y))
        free = search_split(model, test_x, None, start, device, batch_size, steps, lr, "entropy",
                            progress, desc=f"entropy {tokens}T")
        row("spot-on-entropy", _accuracy(predict(model, test_x, free, device, batch_size, False)[0], test_y))
        snapped = snap_to_grid(found, image_size, window)
        row("spot-on-snapped", _accuracy(predict(model, test_x, snapped, device, batch_size, False)[0], test_y))
        if transfer_model is not None:
            # PAPER §4, finding 4: positions found with another, independently trained model.
            other = search_split(transfer_model, test_x, test_y, start, device, batch_size, steps,
                                 lr, "label", progress, desc=f"transfer {tokens}T")
            row("spot-on-transfer",
                _accuracy(predict(model, test_x, other, device, batch_size, False)[0], test_y),
                source=transfer_source)
            # The reverse direction costs three forward passes: our positions on the other model,
            # next to that model's own prior and own oracle accuracy on the same images.
            acc = lambda pos: _accuracy(predict(transfer_model, test_x, pos, device, batch_size,
                                                False)[0], test_y)
            reverse.append({"model": transfer_source, "source": model_source, "prior": oracle_from,
                            "tokens": tokens, "top1_prior": acc(start), "top1_own_oracle": acc(other),
                            "top1_transfer": acc(found)})
    return rows, reverse


def _cell(row):
    if row is None or row["top1"] is None:
        return "n/a"
    knn = "–" if row["knn"] is None else f"{row['knn']:.1f}"
    return f"{row['top1']:.1f} / {knn}"


METHOD_LABELS = {"prior": "SPoT", "spot-on": "SPoT-ON (label oracle)",
                 "spot-on-entropy": "SPoT-ON (entropy, label-free)",
                 "spot-on-snapped": "SPoT-ON snapped to grid", "spot-on-transfer": "SPoT-ON transfer"}


def results_markdown(rows, budgets, settings, reverse=()):
    """The table of PAPER §6: grid row first, then the other priors, then the SPoT-ON rows."""
    lines = [f"# SPoT evaluation: {settings['checkpoint']}", "",
             f"{settings['dataset']} test split, {settings['n_test']} images; kNN bank "
             f"{settings['n_bank']} train images (k={settings['knn_k']}, "
             f"T={settings['knn_temperature']}). Cell = top-1 % / kNN % "
             f"(\"–\" = not computed, \"n/a\" = not applicable). SPoT-ON: {settings['oracle_steps']} "
             f"Adam steps, lr {settings['oracle_lr']}, from the {settings['oracle_from']} prior.", "",
             "| Method | Prior | " + " | ".join(f"{b} T" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    table = {}
    for r in rows:
        key = (r["method"], r["prior"], r.get("source"))
        table.setdefault(key, {})[r["tokens"]] = r
    methods = list(METHOD_LABELS)
    keys = sorted(table, key=lambda k: (methods.index(k[0]), k[0] == "prior" and k[1] != "grid"))
    for key in keys:     # sorted() is stable: priors keep their command-line order after grid
        method, prior, source = key
        label = "ViT (patch grid)" if (method, prior) == ("prior", "grid") else METHOD_LABELS[method]
        if source:
            label += f" from {Path(source).parent.name or source}"
        cells = [_cell(table[key].get(b)) for b in budgets]
        lines.append(f"| {label} | {prior} | " + " | ".join(cells) + " |")
    if reverse:
        lines += ["", "Transfer, the other way: positions found with this model, evaluated on the "
                  "transfer model (top-1 %).", "",
                  "| Model | Tokens | its prior | its own oracle | our oracle positions |",
                  "|---|---|---|---|---|"]
        for r in reverse:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['top1_prior']:.1f} | "
                         f"{r['top1_own_oracle']:.1f} | {r['top1_transfer']:.1f} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Choosing the defaults: a small (steps, lr) sweep

SWEEP_STEPS = (5, 10, 20, 40)
SWEEP_LRS = (3e-3, 1e-2, 3e-2)


def sweep(model, images_uint8, labels, budgets, prior="isotropic", steps_grid=SWEEP_STEPS,
          lr_grid=SWEEP_LRS, objectives=OBJECTIVES, batch_size=128, seed=0, device="cpu",
          progress=True):
    """Top-1 accuracy and mean objective for every (objective, budget, lr, steps) -> list of dicts.

    One search of max(steps_grid) steps per (objective, budget, lr) is enough: the hand-written
    Adam has no schedule, so the first s steps of a long search ARE an s-step search, and
    trajectory[s] gives its positions. steps = 0 (the prior itself) is included as the baseline.
    """
    config = model.config
    max_steps = max(steps_grid)
    checkpoints = sorted({0, *steps_grid})
    results = []
    jobs = [(o, n, lr) for o in objectives for n in budgets for lr in lr_grid]
    for objective, tokens, lr in tqdm(jobs, desc="sweep", disable=not progress, dynamic_ncols=True):
        start = draw_positions(prior, images_uint8, tokens, config.image_size, config.window,
                               _seed_for(seed, prior, tokens, "sweep"), device)
        correct = {s: 0 for s in checkpoints}
        loss_sum = {s: 0.0 for s in checkpoints}
        for begin in range(0, len(images_uint8), batch_size):
            images = _float_images(images_uint8[begin:begin + batch_size], device)
            y = labels[begin:begin + batch_size].to(device)
            result = oracle_search(model, images, y if objective == "label" else None,
                                   start[begin:begin + batch_size].to(device), steps=max_steps,
                                   lr=lr, objective=objective)
            with torch.no_grad():
                for s in checkpoints:
                    correct[s] += (model(images, result.trajectory[s]).argmax(1) == y).sum().item()
                    loss_sum[s] += result.losses[s].sum().item()
        for s in checkpoints:
            results.append({"objective": objective, "tokens": tokens, "lr": lr, "steps": s,
                            "top1": 100.0 * correct[s] / len(images_uint8),
                            "loss": loss_sum[s] / len(images_uint8)})
    return results


def sweep_markdown(results, budgets, settings):
    lines = [f"# SPoT-ON (steps, lr) sweep: {settings['checkpoint']}", "",
             f"First {settings['n_images']} *train* images of {settings['dataset']} (the test split "
             f"is never used to choose the defaults); start prior {settings['oracle_from']}. "
             "Cell = top-1 % (mean objective). steps = 0 is the prior itself.", ""]
    best = {}
    for objective in dict.fromkeys(r["objective"] for r in results):
        lines += [f"## objective = {objective}", "",
                  "| lr | steps | " + " | ".join(f"{b} T" for b in budgets) + " | mean top-1 |",
                  "|---|---|" + "---|" * (len(budgets) + 1)]
        cells = {}
        for r in results:
            if r["objective"] == objective:
                cells.setdefault((r["lr"], r["steps"]), {})[r["tokens"]] = r
        for (lr, steps), by_tokens in sorted(cells.items(), key=lambda kv: (kv[0][1] > 0, kv[0])):
            if steps == 0 and lr != min(lr_ for lr_, _ in cells):
                continue       # the prior row is the same for every lr; show it once
            mean = sum(by_tokens[b]["top1"] for b in budgets) / len(budgets)
            if steps > 0 and (objective not in best or mean > best[objective][2]):
                best[objective] = (steps, lr, mean)
            lines.append(f"| {'-' if steps == 0 else lr} | {steps} | " + " | ".join(
                f"{by_tokens[b]['top1']:.1f} ({by_tokens[b]['loss']:.3f})" for b in budgets)
                + f" | {mean:.2f} |")
        lines.append("")
    for objective, (steps, lr, mean) in best.items():
        lines.append(f"Best for {objective}: steps={steps}, lr={lr} (mean top-1 {mean:.2f} %).")
    return "\n".join(lines) + "\n", best


# -----------------------------------------------------------------------------
# What does the oracle cost?

def time_oracle(model, images, labels, positions, steps=DEFAULT_STEPS, lr=DEFAULT_LR, repeats=3):
    """Wall-clock seconds per image: one forward, one forward + backward (training-style, w.r.t.
    the parameters), one oracle step, and a whole search; and their ratios. Median of `repeats`
    after one warm-up. Leaves no gradients behind (autograd.grad, not .backward()).

    A step is the whole search / steps, so it includes a share of the final forward that scores
    the last positions. Expect a step to cost about one forward + backward: the backward pass
    skips the weight gradients but still runs back through every layer to the positions."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    B = len(images)

    def median_time(fn):
        fn()   # warm-up (allocator, kernels)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def forward():
        with torch.no_grad():
            model(images, positions)

    def forward_backward():
        loss = F.cross_entropy(model(images, positions), labels)
        torch.autograd.grad(loss, params)

    def search():
        oracle_search(model, images, labels, positions, steps=steps, lr=lr)

    try:
        t_fwd, t_fb, t_search = median_time(forward), median_time(forward_backward), median_time(search)
    finally:
        model.train(was_training)
    step = t_search / max(steps, 1)
    return {"batch_size": B, "tokens": positions.shape[1], "steps": steps,
            "forward_s_per_image": t_fwd / B, "forward_backward_s_per_image": t_fb / B,
            "oracle_step_s_per_image": step / B, "oracle_search_s_per_image": t_search / B,
            "step_vs_forward_backward": step / t_fb, "search_vs_forward": t_search / t_fwd}


# -----------------------------------------------------------------------------
# Command line

def parse_list(text, name, cast, parser):
    try:
        values = [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        parser.error(f"{name} must be a comma-separated list, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="SPoT-ON oracle search and the PAPER §6 evaluation table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    add("--dataset", default=None, choices=data.DATASETS,
        help="dataset (default: the one stored in the checkpoint)")
    add("--data-dir", default=None, help="dataset folder (default: the checkpoint's)")
    add("--image-size", type=int, default=None, help="image side (default: the checkpoint's)")
    add("--cache-dir", default=None, help="decoded-image cache (default: the checkpoint's or data.py's)")
    add("--tokens", default="4,8,16,32,64", help="token budgets, comma-separated")
    add("--priors", default="grid,uniform,gaussian,sobol,isotropic,center,salient",
        help=f"priors to evaluate, from {spot.PRIORS}")
    add("--oracle-from", default="isotropic", help="prior the SPoT-ON search starts from")
    add("--oracle-steps", type=int, default=DEFAULT_STEPS, help="Adam steps of the search")
    add("--oracle-lr", type=float, default=DEFAULT_LR, help="Adam lr (normalized coordinates)")
    add("--limit", type=int, default=None,
        help="evaluate the first N test images (default: all); with --sweep: the first N train "
             "images (default 500)")
    add("--knn-limit", type=int, default=5000, help="kNN bank = first M train images (0 = no kNN)")
    add("--knn-k", type=int, default=20, help="neighbours of the kNN vote")
    add("--knn-temperature", type=float, default=0.07, help="kNN vote weight exp(sim / T)")
    add("--transfer-checkpoint", default=None,
        help="a second model: its oracle positions are evaluated on --checkpoint (and vice versa)")
    add("--batch-size", type=int, default=128)
    add("--seed", type=int, default=0, help="seed of the position draws")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--threads", type=int, default=None, help="CPU threads for torch")
    add("--sweep", action="store_true",
        help="instead of the table: accuracy over steps x lr on train images -> DIR/sweep.{json,md}")
    add("--time-oracle", action="store_true",
        help="instead of the table: the oracle's cost vs. forward+backward -> DIR/timing.json")
    add("--out", required=True, help="output folder")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    args = parser.parse_args(argv)

    args.tokens = parse_list(args.tokens, "--tokens", int, parser)
    if min(args.tokens) < 1:
        parser.error(f"--tokens: every token budget must be >= 1, got {args.tokens}")
    args.priors = parse_list(args.priors, "--priors", str, parser)
    unknown = [p for p in args.priors if p not in spot.PRIORS]
    if unknown:
        parser.error(f"--priors: unknown prior(s) {unknown}; choose from {spot.PRIORS}")
    if args.oracle_from not in spot.PRIORS:
        parser.error(f"--oracle-from: unknown prior {args.oracle_from!r}; choose from {spot.PRIORS}")
    for name in ("oracle_steps", "knn_limit"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "knn_k", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.oracle_lr > 0:
        parser.error(f"--oracle-lr must be > 0, got {args.oracle_lr}")
    if not args.knn_temperature > 0:
        parser.error(f"--knn-temperature must be > 0, got {args.knn_temperature}")
    for name in ("checkpoint", "transfer_checkpoint"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{name.replace('_', '-')}: {path} does not exist (expected a "
                         f"checkpoint.pt written by train.py)")
    return parser, args


def _load_model(path, device, parser, flag):
    try:
        model = spot.load_checkpoint(path, map_location=device)
    except ValueError as error:
        parser.error(f"{flag}: {error}")
    checkpoint_args = torch.load(path, map_location="cpu", weights_only=False).get("args") or {}
    return model.eval(), dict(checkpoint_args)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu")
    device = torch.device(args.device)

    model, ckpt_args = _load_model(args.checkpoint, device, parser, "--checkpoint")
    # Dataset, folder and size default to what the model was trained on (train.py stores args).
    dataset_name = args.dataset or ckpt_args.get("dataset")
    if dataset_name is None:
        parser.error("--dataset: the checkpoint stores no dataset name; pass --dataset")
    data_dir = args.data_dir if args.data_dir is not None else ckpt_args.get("data_dir")
    image_size = args.image_size or ckpt_args.get("image_size") or model.config.image_size
    cache_dir = args.cache_dir if args.cache_dir is not None else ckpt_args.get("cache_dir")
    data_seed = ckpt_args.get("seed", 0)    # the shapes data depend on train.py's --seed
    try:
        dataset = data.load_dataset(dataset_name, data_dir, image_size=image_size, seed=data_seed,
                                    cache_dir=cache_dir, progress=args.progress)
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except ValueError as error:
        parser.error(f"--dataset/--data-dir/--image-size: {error}")
    if tuple(dataset.image_size) != tuple(model.image_hw):
        parser.error(f"--image-size: the data are {dataset.image_size} but the model reads "
                     f"{model.image_hw} images")

    transfer_model = None
    if args.transfer_checkpoint:
        transfer_model, _ = _load_model(args.transfer_checkpoint, device, parser,
                                        "--transfer-checkpoint")
        if (transfer_model.image_hw != model.image_hw
                or transfer_model.config.num_classes != model.config.num_classes
                or transfer_model.config.in_chans != model.config.in_chans):
            parser.error("--transfer-checkpoint: the model must read the same images and predict "
                         "the same classes as --checkpoint")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**{k: v for k, v in vars(args).items()},
                "dataset": dataset_name, "data_dir": data_dir, "image_size": list(model.image_hw),
                "data_seed": data_seed, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "torch": torch.__version__, "model_config": spot.model_config_dict(model)}

    if args.time_oracle:
        n = min(args.batch_size, len(dataset.test))
        images = _float_images(dataset.test.images[:n], device)
        labels = dataset.test.labels[:n].to(device)
        timing = {}
        for tokens in args.tokens:
            positions = spot.sample_positions(args.oracle_from, n, tokens, model.config.image_size,
                                              model.config.window, images=images,
                                              generator=torch.Generator(device=device).manual_seed(args.seed))
            t = time_oracle(model, images, labels, positions, args.oracle_steps, args.oracle_lr)
            timing[str(tokens)] = t
            print(f"{tokens:>4} tokens: forward {1e3 * t['forward_s_per_image']:.3f} ms/img, "
                  f"forward+backward {1e3 * t['forward_backward_s_per_image']:.3f} ms/img, oracle "
                  f"step {1e3 * t['oracle_step_s_per_image']:.3f} ms/img = "
                  f"{t['step_vs_forward_backward']:.2f}x forward+backward; whole {args.oracle_steps}-"
                  f"step search = {t['search_vs_forward']:.1f}x a forward pass")
        (out / "timing.json").write_text(json.dumps({"settings": settings, "timing": timing}, indent=2))
        print(f"wrote {out / 'timing.json'}")
        return 0

    if args.sweep:
        n = min(args.limit or 500, len(dataset.train))
        settings["n_images"] = n
        results = sweep(model, dataset.train.images[:n], dataset.train.labels[:n], args.tokens,
                        prior=args.oracle_from, batch_size=args.batch_size, seed=args.seed,
                        device=device, progress=args.progress)
        text, best = sweep_markdown(results, args.tokens, settings)
        (out / "sweep.json").write_text(json.dumps(
            {"settings": settings, "results": results,
             "best": {o: {"steps": s, "lr": lr, "mean_top1": m} for o, (s, lr, m) in best.items()}},
            indent=2))
        (out / "sweep.md").write_text(text)
        print(text)
        print(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}")
        return 0

    rows, reverse = evaluate(
        model, dataset, args.tokens, args.priors, oracle_from=args.oracle_from,
        steps=args.oracle_steps, lr=args.oracle_lr, limit=args.limit, knn_limit=args.knn_limit,
        knn_k=args.knn_k, knn_temperature=args.knn_temperature, transfer_model=transfer_model,
        transfer_source=args.transfer_checkpoint, model_source=args.checkpoint,
        batch_size=args.batch_size, seed=args.seed, device=device, progress=args.progress)
    settings["n_test"] = min(args.limit or len(dataset.test), len(dataset.test))
    settings["n_bank"] = min(args.knn_limit, len(dataset.train))
    results = {"settings": settings, "rows": rows}
    if reverse:
        results["transfer_reverse"] = reverse
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = results_markdown(rows, args.tokens, settings, reverse)
    (out / "results.md").write_text(text)
    print(text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

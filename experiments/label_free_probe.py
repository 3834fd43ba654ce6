"""
experiments/label_free_probe.py -- which label-free objective should steer the search? A probe
toward the open problem (closing the gap to the oracle without labels), on the VALIDATION split:
the test split never chooses a method.

Every search starts from the isotropic lattice and runs Adam on the positions, clamped to
[0, 1], for --search-steps at --search-lr. The objectives, none of which reads the label:

    isotropic   no search: the lattice itself (the baseline)
    entropy     H(p(all N tokens)): oracle.oracle_search(objective="entropy"), oracle.py's
                label-free SPoT-ON row
    agree       H(p(all)) + symmetric KL(p(even tokens), p(odd tokens))
    agree-only  the symmetric KL alone
    consensus   H(p(all)) + cross-entropy of each half against p(all) (detached)
    multiK      K entropy searches (from the isotropic, center and sobol priors), each image
                keeps the one with the lowest final entropy (multi2, multi3)

Prints one JSON line per (budget, method). The lab notes' table came from

    python -m experiments.label_free_probe --checkpoint runs/cifar10-spot/checkpoint.pt \\
        --search-lr 3e-2 --limit 1000 --search-steps 20 --tokens 8,16 --threads 1 \\
        --methods isotropic,entropy,agree,agree-only,consensus
"""

import argparse
import json
import time

import torch

import data
import oracle
import spot
import utils

HALF_OBJECTIVES = ("agree", "agree-only", "consensus")       # this file's own: they read two halves
METHODS = ("isotropic", "entropy", *HALF_OBJECTIVES, "multi2", "multi3")


def objective(model, name, images, positions):
    """(B,) label-free loss of method `name` (one of HALF_OBJECTIVES) at positions (B, N, 2).
    The two halves are the even and the odd tokens, each read on its own."""
    full = model(images, positions).float()                                      # (B, classes)
    entropy = oracle.per_image_objective(full, None, "entropy")                  # (B,)
    a, b = (model(images, positions[:, i::2]).float().log_softmax(-1) for i in (0, 1))
    if name == "consensus":          # each half predicts the full read's (detached) distribution
        return entropy - 0.5 * (full.softmax(-1).detach() * (a + b)).sum(-1)
    # symmetric KL, halved: (KL(a || b) + KL(b || a)) / 2 = sum (p_a - p_b)(log p_a - log p_b) / 2
    agreement = 0.5 * ((a.exp() - b.exp()) * (a - b)).sum(-1)
    return agreement + entropy if name == "agree" else agreement


def search(model, name, images, n_tokens, steps, lr, seed):
    """Positions (B, N, 2) for `name`, from the isotropic lattice (for multiK, also from the
    center and sobol priors). isotropic, entropy and multiK are oracle.py's entropy search
    (isotropic: 0 steps, the start itself); K searches keep, per image, the lowest final
    entropy. HALF_OBJECTIVES run torch's Adam on the summed per-image loss: a sum, so that each
    image's positions follow their own image's gradient (as in oracle_search)."""
    start = lambda prior: spot.sample_positions(prior, len(images), n_tokens, model.config.image_size,  # noqa: E731
                                                model.config.window, torch.Generator().manual_seed(seed))
    if name not in HALF_OBJECTIVES:
        found = [oracle.oracle_search(model, images, None, start(prior), steps * (name != "isotropic"), lr, "entropy")
                 for prior in ("isotropic", "center", "sobol")[:int(name[5:]) if name[:5] == "multi" else 1]]
        pick = torch.stack([f.losses[-1] for f in found]).argmin(0)                      # (B,)
        return torch.stack([f.positions for f in found])[pick, torch.arange(len(images))]
    positions = start("isotropic").requires_grad_(True)
    optimizer = torch.optim.Adam([positions], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(model, name, images, positions).sum().backward()
        optimizer.step()
        positions.data.clamp_(0, 1)                   # stay inside the image (outside autograd)
    return positions.detach()


def main(argv=None):
    parser = argparse.ArgumentParser("python -m experiments.label_free_probe", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, count = parser.add_argument, utils.int_at_least
    add("--checkpoint", required=True, help="checkpoint.pt written by train.py (with --val-size)")
    add("--methods", type=utils.name_list(METHODS), default="isotropic,entropy", help="what to compare")
    add("--tokens", default="8,16", help="token budgets (utils.parse_tokens)")
    add("--search-steps", type=count(0), default=20, help="Adam steps of every search")
    add("--search-lr", type=utils.float_in(0, low_open=True), default=3e-2, help="their lr")
    add("--limit", type=count(1), default=1000, help="the first N validation images")
    add("--batch-size", type=count(1), default=100)
    add("--threads", type=count(1), help="CPU threads (none: all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())     # --threads, else all cores
    try:
        model, dataset, _ = data.load_model_and_data(args.checkpoint)
        config = model.config
        budgets = utils.parse_tokens(args.tokens, len(spot.grid_positions(config.image_size, config.window)))
    except (ValueError, data.DataError) as error:
        parser.error(str(error))
    val = dataset.val or parser.error("the checkpoint's run held out no validation images (train.py --val-size)")
    model.eval().requires_grad_(False)
    x, y = val.images[:args.limit], val.labels[:args.limit]
    for n_tokens, name in ((n, name) for n in budgets for name in args.methods):
        started = time.perf_counter()
        found = torch.cat([search(model, name, x[i:i + args.batch_size] / 255, n_tokens, args.search_steps,
                                  args.search_lr, i) for i in range(0, len(y), args.batch_size)])
        top1 = 100 * (oracle.predict(model, x, found, "cpu", args.batch_size)[0].argmax(1) == y).float().mean().item()
        print(json.dumps({"tokens": n_tokens, "method": name, "steps": args.search_steps, "lr": args.search_lr,
                          "val_top1": round(top1, 2), "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

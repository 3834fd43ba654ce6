"""Scratch probe for issue 13 (NOTES.md): label-free search objectives on the VALIDATION split.

    python results/probes/label-free-objectives/probe.py CHECKPOINT LR N_IMAGES STEPS METHODS BUDGETS
    e.g. ... runs/cifar10-spot/checkpoint.pt 3e-2 1000 20 isotropic,entropy,agree,agree-only,consensus 8,16

Methods (every search: Adam on the positions from the isotropic lattice, clamped to [0, 1]):
    entropy     H(p(all N tokens))                                  (oracle.py's label-free search)
    agree       H(p(all)) + symmetric KL(p(even tokens), p(odd tokens))
    agree-only  the symmetric KL alone
    consensus   H(p(all)) + cross-entropy of each half against p(all) (detached)
    multiK      K entropy searches (from isotropic, center, sobol), keep the lowest final entropy
One JSON line per (budget, method). Not product code: kept so the NOTES numbers can be rerun.
"""
import sys, json, time, torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import utils, spot, oracle
torch.set_num_threads(1)
ckpt, lr, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
STEPS = int(sys.argv[4]); METHODS = sys.argv[5].split(","); BUDGETS = [int(b) for b in sys.argv[6].split(",")]
model, dataset, _ = data.load_model_and_data(ckpt, torch.device("cpu"))
model.eval().requires_grad_(False)
val = dataset.val
x_all, y_all = val.images[:limit], val.labels[:limit]

def ent(logits):
    lp = F.log_softmax(logits.float(), -1); return -(lp.exp() * lp).sum(-1)

def objective(name, images, pos):
    full = model(images, pos)
    if name == "entropy":
        return ent(full)
    a, b = model(images, pos[:, 0::2]), model(images, pos[:, 1::2])
    la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    sym = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))
    if name == "agree":
        return ent(full) + sym
    if name == "agree-only":
        return sym
    if name == "consensus":   # each half predicts the full read's (detached) class distribution
        target = F.softmax(full.float(), -1).detach()
        return ent(full) - 0.5 * ((target * la).sum(-1) + (target * lb).sum(-1))
    raise ValueError(name)

def search(name, images, start, steps=None):
    steps = steps or STEPS
    pos = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([pos], lr=lr)
    for _ in range(steps):
        loss = objective(name, images, pos).sum()
        opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad(): pos.clamp_(0, 1)
    return pos.detach()

for n in BUDGETS:
    res = {}
    for name in METHODS:
        t0, correct = time.time(), []
        for s in range(0, limit, 100):
            images = x_all[s:s+100].float() / 255
            start = spot.isotropic_positions(n).expand(len(images), n, 2).clone()
            if name == "isotropic":
                pos = start
            elif name.startswith("multi"):
                g = torch.Generator().manual_seed(s)
                starts = [start, spot.sample_positions("center", len(images), n, model.config.image_size, model.config.window),
                          spot.sample_positions("sobol", len(images), n, model.config.image_size, model.config.window, generator=g)]
                finals = [search("entropy", images, st) for st in starts[:int(name[5:])]]
                with torch.no_grad():
                    ents = torch.stack([ent(model(images, p)) for p in finals])      # (K, B)
                pick = ents.argmin(0)
                pos = torch.stack(finals)[pick, torch.arange(len(images))]
            else:
                pos = search(name, images, start)
            with torch.no_grad():
                correct.append((model(images, pos).argmax(1) == y_all[s:s+100]))
        c = torch.cat(correct).float()
        res[name] = (round(100 * c.mean().item(), 2), time.time() - t0)
        print(json.dumps({"tokens": n, "method": name, "steps": STEPS, "lr": lr, "val_top1": res[name][0], "seconds": round(res[name][1], 1)}), flush=True)

"""
experiments/models.py -- the trained models beside their results: export them, check them.

Every number of README.md and RESULTS.md comes from a trained model, and train.py's checkpoint
(runs/NAME/checkpoint.pt) is too big to commit: it holds the optimizer's moments, the random
streams and the run's position beside the weights. This file keeps what a reader needs:

    export   runs/NAME -> results/NAME/model.pt: the model only (its config, fp32 weights, its
             classes and the train args that find its data), read back by spot.load_checkpoint
             and data.load_model_and_data exactly as a checkpoint is (weights_only=True); and
             results/NAME/MODEL.md, its card: command, data, parameters, test accuracy, sha256.
             A head's run -> its file and card the same way, with the run's run.json and
             metrics beside them: experiments.placement's placer.pt, and the label-free
             frontier's designs (experiments.glimpses' glimpses.pt, .move's move.pt, .ranker's
             ranker.pt, .sketch's sketch.pt), read back by their module's load_<kind>.
    check    re-evaluate the first --limit test images of every committed model at the cells of
             its committed per-image results (per_image.npz: oracle.py's for a model,
             experiments.label_free's for a placer, experiments.frontier's for a design) and
             compare the right/wrong bits, image by image; and all models together fit 100 MB.
    moved    after a retraining: how far each results/NAME/per_image.npz moved from the one an
             earlier commit holds (cells bit for bit equal, the largest and the mean change of
             a top-1 cell, the share of answers that changed), as a markdown table.

    python -m experiments.models export --run runs/cifar10-spot --to results/cifar10-spot
    python -m experiments.models check --data-dir-cifar10 data/cifar10 --limit 200
    python -m experiments.models moved --before 1ceba95 cifar10-spot cifar10-grid-vit

Which cells `check` reads. A model's oracle.py table has one row per (prior, budget); its first
position draw, "top1/prior/PRIOR/TOKENS" row 0, is redrawn here from the same seed,
train.seed_for(seed, prior, tokens, "test"), as oracle.prior_rows draws it (the deterministic
isotropic and center lattices ignore the seed). A placer's cells are the label-free table's
"top1/spot-learned/isotropic/TOKENS" (experiments.label_free): glance-then-place, then read.
A design's are the frontier's "top1/METHOD/N" at its --budgets (glimpses, learned-move,
glance-and-rank, sketch), read by the model the frontier read: the design's tuned model when its
file holds one, else the frontier's --checkpoint, a committed model.pt. The kNN and SPoT-ON rows
are not re-run (they need the train split, and minutes).

The rule for agreement. A float computation is exact only under the same conditions, so check
recreates the recorded ones: the same images in the same batches (the first --limit images,
rounded up to whole batches of the recorded --batch-size: a CPU kernel may add up a row in
another order when the batch has another size), the positions drawn in the same chunks
(train.POSITION_CHUNK), the recorded thread count. On the recording machine (the CPU that
run.json names: rerun.sh trains and evaluates on one machine, and the torch version that
results.json or frontier.json names) every bit must agree: one differing image fails the check
(exit 1). On another machine float kernels differ (SIMD width, fused multiply-adds), and an
image whose two best logits are within round-off may flip: there --tolerance differing images
per cell pass (default: 1 % of the checked images, at least 1), and every mismatch is still
counted in the report. A tampered weight flips far more, and the sha256 of MODEL.md catches
any change at all.
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import data
import spot
import train
import utils
from experiments import glimpses, layouts, move, placement, ranker, sketch

MAX_TOTAL_BYTES = 100 * 10**6       # every exported file of FILES in results/ together
DATA_ARGS = ("dataset", "data_dir", "seed", "val_size", "crop_pct", "image_size")
FILES = {"model": "model.pt", "placer": "placer.pt",            # what export writes, per kind
         "glimpses": "glimpses.pt", "move": "move.pt", "ranker": "ranker.pt",
         "sketch": "sketch.pt", "learned": "learned.pt", "bank": "bank.pt"}


# -----------------------------------------------------------------------------
# The heads: trained on a SPoT model's outputs, each judged by the evaluation that used it

class Evaluation(NamedTuple):
    """The evaluation whose committed per-image results a head is checked against."""
    results: str        # its results file, beside per_image.npz
    command: str        # the command that writes it (its --KIND flag names the head's file)
    budgets: str        # its settings' key of the budgets the head was read at


LABEL_FREE = Evaluation("results.json", "python -m experiments.label_free evaluate", "tokens")
FRONTIER = Evaluation("frontier.json", "python -m experiments.frontier", "budgets")
CURVE = Evaluation("frontier.json", "python -m experiments.frontier", "curve_tokens")


class Head(NamedTuple):
    """How export and check treat one kind of head: the placer or a frontier design."""
    module: str         # the module that trains it; its load_KIND reads the file
    about: str          # the card's first sentence
    load: Callable      # its file -> (the head, the SPoT model tuned with it or None)
    evaluate: Callable  # (model, head, (uint8 images, labels), N, device, batch) -> (right, ...)
    entry: str          # where the head's weights sit in its file ("": at its top level)
    row: tuple          # its cells in the per-image results, less the budget
    evaluation: Evaluation
    keep: tuple         # what export keeps of its file: what the loader reads (if there)
    metrics: str = "metrics.jsonl"      # its run's metrics, copied beside the exported file


def placed_split(model, placer, split, n_tokens, device, batch_size):
    """The label-free table's learned row (label_free.learned_rows): glance, place, read ->
    (right/wrong (n,) bool,)."""
    positions = placement.place_split(model, placer, split[0], n_tokens, device, batch_size)
    logits, _ = train.predict(model, split[0], positions, device, batch_size)
    return (logits.argmax(1) == split[1],)


def load_glimpses(path):
    """glimpses.load_glimpses in the (head, tuned model) order of the other heads, a bad file a
    ValueError naming it (as load_move and load_ranker raise)."""
    try:
        model, placer = glimpses.load_glimpses(path)
    except Exception as error:                 # truncated, not a glimpses file, ...
        raise ValueError(f"{path} is not a glimpses model written by experiments.glimpses "
                         f"({type(error).__name__}: {error})") from None
    return placer, model


HEADS = {
    "placer": Head(
        module="experiments.placement", about="A glance-then-place head "
        "(experiments.placement) for a frozen SPoT model.",
        load=lambda path: (placement.load_placer(path)[0], None), evaluate=placed_split,
        entry="placer", row=("top1", "spot-learned", "isotropic"), evaluation=LABEL_FREE,
        keep=("placer_config", "placer")),
    "glimpses": Head(
        module="experiments.glimpses", about="Sequential glimpses, a design of the label-free "
        "frontier (experiments.frontier --glimpses): a glance-then-place head and the SPoT "
        "model fine-tuned to read on from its glance (experiments.glimpses).",
        load=load_glimpses, evaluate=glimpses.glimpse_split, entry="placer",
        row=("top1", "glimpses"), evaluation=FRONTIER,
        keep=("model_config", "model", "placer_config", "placer")),
    "move": Head(
        module="experiments.move", about="The learned move, design 2 of the label-free frontier "
        "(experiments.frontier --move): a head that moves a first read's tokens for a second "
        "read, and the SPoT model when --tune fine-tuned it too (experiments.move).",
        load=move.load_move, evaluate=move.move_split, entry="head",
        row=("top1", "learned-move"), evaluation=FRONTIER,
        keep=("config", "head", "model_config", "model")),
    "ranker": Head(
        module="experiments.ranker", about="Glance and rank, design 1 of the label-free "
        "frontier (experiments.frontier --ranker): a bank of placements per budget and a scorer "
        "that picks one from a first glance, for a frozen SPoT model (experiments.ranker).",
        load=lambda path: (ranker.load_ranker(path)[0], None), evaluate=ranker.rank_split,
        entry="", row=("top1", "glance-and-rank"), evaluation=FRONTIER,
        keep=("config", "banks", "scorers"), metrics="metrics.json"),
    "sketch": Head(
        module="experiments.sketch", about="Tokens placed from a sketch, a design of the "
        "label-free frontier (experiments.frontier --sketch): a small network on a "
        "low-resolution copy of the image places the tokens of one read, and the SPoT model "
        "when --tune fine-tuned it too (experiments.sketch).",
        load=sketch.load_sketch, evaluate=sketch.sketch_split, entry="head",
        row=("top1", "sketch"), evaluation=FRONTIER,
        keep=("config", "head", "model_config", "model")),
    "learned": Head(
        module="experiments.layouts", about="Learned fixed layouts, a prior on the label-free "
        "frontier's curve (experiments.frontier --learned): one placement per token count, "
        "learned once for all images through the frozen SPoT model (experiments.layouts).",
        load=layouts.load_learned, evaluate=lambda *read: (layouts.learned_split(*read),),
        entry="head", row=("top1", "prior", "learned"), evaluation=CURVE,
        keep=("config", "head")),
    "bank": Head(
        module="experiments.layouts", about="A bank of learned layouts and a sketch that picks "
        "one per image, a design of the label-free frontier (experiments.frontier --bank; "
        "experiments.layouts).",
        load=layouts.load_bank, evaluate=layouts.chosen_split, entry="head",
        row=("top1", "layout-bank"), evaluation=FRONTIER, keep=("config", "head")),
}


# -----------------------------------------------------------------------------
# export: a finished run -> results/NAME/model.pt (or a head's file) and MODEL.md

def read_jsonl(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: the run folder holds no metrics")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is missing or not JSON ({error})") from None


def finished_run(run):
    """A run folder -> (its kind, a key of FILES; its weights file, run.json, final metrics).
    Refuses (ValueError naming the file) a run that has not finished: train.py writes a final
    line with the test accuracy; a head's run ends as final_metrics says."""
    run = Path(run)
    kind = next((kind for kind in HEADS if (run / FILES[kind]).is_file()), "model")
    if kind != "model":
        info = read_json(run / "run.json")
        return kind, run / FILES[kind], info, final_metrics(run, kind, info)
    if not (run / "checkpoint.pt").is_file():
        raise ValueError(f"{run}/checkpoint.pt does not exist: pass a run folder of train.py "
                         f"(or of a head: experiments.placement, .glimpses, .move, .ranker) "
                         f"that has finished")
    lines = read_jsonl(run / "metrics.jsonl")
    if not lines or not lines[-1].get("final"):
        raise ValueError(f"{run}/metrics.jsonl has no final test line: the run has not finished "
                         f"(python train.py --resume --out {run})")
    return "model", run / "checkpoint.pt", read_json(run / "run.json"), lines[-1]


def final_metrics(run, kind, info):
    """A head's last metrics: its --epochs-th epoch's line, or the ranker's metrics.json, which
    it writes once every budget is trained. ValueError naming the file before then: a head's
    command does not resume, so the cure is to run it again into a new --out."""
    path = run / HEADS[kind].metrics
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"{path} does not exist: the {kind}'s training has not finished "
                             f"(or was stopped: run {HEADS[kind].module} again, new --out)")
        return read_json(path)
    lines, epochs = read_jsonl(path), info.get("args", {}).get("epochs")
    if not lines or lines[-1].get("epoch") != epochs:
        raise ValueError(f"{path} does not reach epoch {epochs}: the {kind}'s training has not "
                         f"finished (or was stopped: run {HEADS[kind].module} again, new --out)")
    return lines[-1]


def given_data_dir(command, args):
    """The data folder as the command gave it (relative to the repository root, so it works on
    every machine with the same layout), else as train.py recorded it (resolved)."""
    words = shlex.split(command or "")
    for i, word in enumerate(words):
        if word == "--data-dir" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--data-dir="):
            return word.split("=", 1)[1]
    return args.get("data_dir")


def fp32(state):
    """A saved dict (state dicts nested at any depth) with float tensors in fp32, each a clone:
    torch.save writes a view's whole storage, so a slice of a bigger tensor would carry all of
    it. Anything else (configs, numbers, paths) is kept as it is."""
    if isinstance(state, dict):
        return {k: fp32(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return (state.float() if state.is_floating_point() else state).clone().contiguous()
    return state


def model_content(checkpoint_path, info):
    """train.py's checkpoint -> what model.pt holds: exactly what spot.load_checkpoint and
    data.load_model_and_data read, nothing that only --resume needs."""
    saved = utils.read_checkpoint(checkpoint_path)
    args = saved.get("args") or {}
    kept = {k: args[k] for k in DATA_ARGS if k in args}
    kept["data_dir"] = given_data_dir(info.get("command"), args)
    return {"model_config": saved["model_config"], "model": fp32(saved["model"]),
            "classes": saved.get("classes"), "args": kept}


def read_back(kind, path):
    """An exported file, read by the loader its card names -> {its entry in the file: the
    module made of it}: export proves the weights equal, the card counts the parameters."""
    if kind == "model":
        return {"model": spot.load_checkpoint(path)}
    head, tuned = HEADS[kind].load(path)
    return {HEADS[kind].entry: head, **({} if tuned is None else {"model": tuned})}


def tensors(tree, prefix=""):
    """A saved dict, or loaded modules -> {dotted name: tensor}, named as the file nests them.
    A ranker's banks are plain tensors beside its scorers, not in its state dict."""
    if isinstance(tree, torch.nn.Module):
        tree = {**tree.state_dict(), "banks": getattr(tree, "banks", {})}
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if not isinstance(tree, dict):
        return {}
    return {name: value for key, part in tree.items()
            for name, value in tensors(part, f"{prefix}.{key}".lstrip(".")).items()}


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validation(kind, last, n):
    """A head's final validation top-1 at budget N, beside the isotropic prior's on the same
    images (the move's two passes also beside the prior at 2N, which costs about as much)."""
    if kind == "ranker":
        read = last["budgets"][str(n)]
        return (f"glance and rank {read['ranker']:.2f} % vs isotropic {read['isotropic']:.2f} % "
                f"at {n} tokens")
    prior = f"isotropic {last[f'val_isotropic@{n}']:.2f} % at {n}"
    if kind == "move":
        return (f"learned move {last[f'val_move@{n}']:.2f} % (two passes of {n} tokens) vs "
                f"{prior} and {last[f'val_isotropic@{2 * n}']:.2f} % at {2 * n} tokens")
    name = "placed" if kind == "placer" else kind
    return f"{name} {last[f'val_{name}@{n}']:.2f} % vs {prior} tokens"


def accuracy_lines(kind, last, args):
    """The card's accuracy line(s), from the run's final metrics."""
    if kind != "model":
        return [f"- validation accuracy, final epoch: {validation(kind, last, n)}"
                for n in args.get("tokens", [])]
    budgets = sorted(int(k.split("@")[1]) for k in last if k.startswith("test_acc@"))
    line = f"- test accuracy: {last['test_acc']:.2f} % (every patch-grid token)"
    if budgets:
        at = " / ".join(f"{last[f'test_acc@{n}']:.2f}" for n in budgets)
        line += (f"; {at} % at {' / '.join(map(str, budgets))} tokens "
                 f"({args.get('eval_prior', 'isotropic')} prior)")
    return [line]


def parameters_line(kind, written):
    """The file's parameters; a head with a tuned model counts each part."""
    counts = {entry or kind: sum(p.numel() for p in module.parameters())
              for entry, module in read_back(kind, written).items()}
    parts = " + ".join(f"{count:,} ({entry})" for entry, count in counts.items())
    return f"- parameters: {sum(counts.values()):,}" + (f" = {parts}" if len(counts) > 1 else "")


def card(name, kind, info, last, written):
    """MODEL.md: a short card of the exported file `written` (model.pt or a head's file)."""
    args = info.get("args", {})
    if kind == "model":
        command = "python " + info.get("command", "")
        what = (f"A SPoT ViT trained by train.py (arXiv 2507.01654). Load it with "
                f"`spot.load_checkpoint(\"{written}\")`, or evaluate it with "
                f"`python oracle.py --checkpoint {written} --name {name}`.")
        folder = given_data_dir(command, args)
        data_line = (f"- data: {args.get('dataset')}, " + (
            f"folder `{folder}` (as the command gave it; --data-dir moves it)" if folder else
            f"built in (generated from seed {args.get('seed', 0)})"))
    else:
        command = shlex.join(info.get("argv", []))
        what = (f"{HEADS[kind].about} Load it with "
                f"`{HEADS[kind].module}.load_{kind}(\"{written}\")`.")
        data_line = (f"- data: that of the SPoT model it was trained with, "
                     f"`{args.get('checkpoint')}` (exported as a model.pt beside its results)")
    lines = [f"# {name}", "", what, "", f"- command: `{command}`", data_line,
             parameters_line(kind, written), *accuracy_lines(kind, last, args),
             f"- trained on: {info.get('cpu', 'an unrecorded CPU')}"
             + (f", torch {info['torch']}" if "torch" in info else ""),
             f"- file: {written.name}, {written.stat().st_size:,} bytes, "
             f"sha256 `{sha256(written)}`", "",
             "Checked against the committed per-image results by "
             "`python -m experiments.models check`.", ""]
    return "\n".join(lines)


def export(run, to):
    """runs/NAME (finished) -> to/FILE (model.pt or a head's), the run's run.json and metrics
    beside it (check finds a head's evaluation through them), then to/MODEL.md; -> the file.
    Each is written atomically, the weights first: a card never describes a file not there."""
    kind, source, info, last = finished_run(run)
    target = Path(to) / FILES[kind]
    if kind == "model":
        content = model_content(source, info)
    else:
        saved = torch.load(source, map_location="cpu", weights_only=True)
        content = fp32({k: saved[k] for k in HEADS[kind].keep if k in saved})
    utils.write_atomic(target, content)
    # Read it back the way users will, and prove that nothing was lost on the way.
    written, loaded = tensors(content), tensors(read_back(kind, target))
    if written.keys() != loaded.keys() or any(not torch.equal(loaded[k], v)
                                              for k, v in written.items()):
        raise ValueError(f"{target}: its weights do not read back as written")
    metrics = "metrics.jsonl" if kind == "model" else HEADS[kind].metrics
    for file in ("run.json", metrics):
        utils.write_atomic(Path(to) / file, (Path(run) / file).read_text())
    utils.write_atomic(Path(to) / "MODEL.md", card(Path(to).name, kind, info, last, target))
    return target


# -----------------------------------------------------------------------------
# check: re-evaluate the committed models on their committed per-image results

def card_sha256(folder):
    """The sha256 MODEL.md gives, or None."""
    path = Path(folder) / "MODEL.md"
    found = path.is_file() and re.search(r"sha256 `([0-9a-f]{64})`", path.read_text())
    return found.group(1) if found else None


def same_path(a, b):
    return a is not None and b is not None and os.path.normpath(a) == os.path.normpath(b)


def folder_of_run(root, out):
    """The results folder whose run.json says the run was written to `out` (its args.out)."""
    for path in sorted(Path(root).glob("*/run.json")):
        if same_path(read_json(path).get("args", {}).get("out"), out):
            return path.parent
    return None


def on_recording_machine(folder, settings):
    """Whether this machine is the one that recorded the per-image results (see the module's
    docstring): the CPU of results/NAME/run.json, torch's version, and a CPU evaluation."""
    info = read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
    version = settings.get("torch") or info.get("torch")
    cpu = settings.get("cpu") or info.get("cpu")       # a frontier run records its own CPU
    return (cpu == utils.cpu_name() and version in (None, torch.__version__)
            and settings.get("device", "cpu") == "cpu")


def batched(limit, settings):
    """(images compared, images evaluated): the first `limit` of the recorded ones (oracle.py's
    n_test, the frontier's n_images), evaluated in whole recorded batches, so that every batch
    is the one the evaluation computed."""
    n_test = settings.get("n_test") or settings.get("n_images") or math.inf
    n = int(min(limit, n_test))
    size = settings.get("batch_size") or n
    return n, int(min(n_test, math.ceil(n / size) * size))


@contextlib.contextmanager
def threads(count):
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(per_image, hits, n):
    """{cell: (n_eval,) bool hits} vs the committed bits -> {cell: differing images of n}.
    A cell holds (draws, n) or (n,) bits: the first draw is the one re-run."""
    differ = {}
    for cell, right in hits.items():
        committed = torch.as_tensor(per_image[cell]).reshape(-1, per_image[cell].shape[-1])[0]
        differ[cell] = int((right[:n] != committed[:n]).sum())
    return differ


def prior_hits(model, split, settings, per_image, n_eval):
    """Every plain prior row of per_image, its first draw, re-run on the first n_eval images."""
    images, labels = split.images[:settings.get("limit")], split.labels[:settings.get("limit")]
    # positions are drawn chunk by chunk from one generator: the first chunks are the same
    # whether all the images are drawn or only these
    chunk = train.POSITION_CHUNK
    drawn = images[:math.ceil(n_eval / chunk) * chunk]
    hits, seed, size = {}, settings.get("seed", 0), settings.get("batch_size") or n_eval
    for prior in settings["priors"]:
        for tokens in settings["tokens"]:
            if ("top1", "prior", prior, tokens) not in per_image:    # the grid above its size
                continue
            positions = train.draw_positions(prior, drawn, tokens, model.config.window,
                                             train.seed_for(seed, prior, tokens, "test"))
            logits, _ = train.predict(model, images[:n_eval], positions[:n_eval], "cpu", size,
                                      bf16=settings.get("bf16", False))
            hits["top1", "prior", prior, tokens] = logits.argmax(1) == labels[:n_eval]
    return hits


def head_hits(kind, model, head, split, settings, per_image, n_eval):
    """A head's cells in per_image, at every budget its evaluation read, re-run on the first
    n_eval images in the recorded batches."""
    spec = HEADS[kind]
    part, size = (split.images[:n_eval], split.labels[:n_eval]), settings.get("batch_size")
    cells = {(*spec.row, n): n for n in settings[spec.evaluation.budgets]}
    return {cell: spec.evaluate(model, head, part, n, "cpu", size or n_eval)[0]
            for cell, n in cells.items() if cell in per_image}


def committed_model(root, results, checkpoint):
    """The committed model.pt an evaluation read: its --checkpoint when that is one (relative to
    the repository root, the folder above root, where the command ran), else the export of the
    run that wrote that checkpoint (the results folder whose run.json names its folder)."""
    path = Path(checkpoint)
    if path.name == "model.pt":
        path = Path(root).resolve().parent / path        # an absolute path stays as it is
    else:
        folder = folder_of_run(root, str(path.parent))
        path = folder / "model.pt" if folder else None
    if path is None or not path.is_file():
        raise ValueError(f"{results}: the model it evaluated, {checkpoint}, has no committed "
                         f"model.pt (python -m experiments.models export --run RUN --to "
                         f"{root}/NAME)")
    return path


def head_sources(root, folder, kind):
    """A committed head -> (the results file of the evaluation that used it, the committed
    model.pt it read), found through the run folder that run.json and its settings record:
    the label-free table's results.json for a placer, a frontier.json for a design."""
    evaluation = HEADS[kind].evaluation
    out = read_json(folder / "run.json").get("args", {}).get("out")
    for path in sorted(Path(root).glob(f"*/{evaluation.results}")):
        settings = read_json(path)["settings"]
        used = os.path.dirname(settings.get(kind) or "")       # its run folder, or this one
        if same_path(used, out) or (used and same_path(os.path.abspath(used),
                                                       os.path.abspath(folder))):
            return path, committed_model(root, path, settings["checkpoint"])
    raise ValueError(f"{folder}/{FILES[kind]}: no {evaluation.results} in {root} names it "
                     f"({evaluation.command} --{kind} {out}/{FILES[kind]})")


def data_dir(options, model_path):
    """--data-dir-NAME for the model's dataset (None: the model's own folder). The model file
    names it by kind ("folder"); a frontier's settings name a folder dataset by its folder."""
    args = utils.read_checkpoint(model_path).get("args") or {}
    return options.data_dirs.get(args.get("dataset"))


def reevaluate(root, folder, kind, options):
    """One committed model (or head) -> (report lines, {cell: differing}, images compared,
    on the recording machine?). Raises ValueError or DataError naming a file."""
    results, model_path = ((folder / "results.json", folder / "model.pt") if kind == "model"
                           else head_sources(root, folder, kind))
    settings = read_json(results)["settings"]
    per_image = utils.load_per_image(results.parent / "per_image.npz")
    n, n_eval = batched(options.limit, settings)
    model, dataset, _ = data.load_model_and_data(model_path, "cpu", data_dir(options, model_path))
    split = getattr(dataset, settings.get("split", "test"))
    with threads(options.threads or settings.get("threads")):
        if kind == "model":
            hits = prior_hits(model, split, settings, per_image, n_eval)
        else:
            head, tuned = HEADS[kind].load(folder / FILES[kind])
            model = model if tuned is None else tuned      # the model the evaluation read
            hits = head_hits(kind, model, head, split, settings, per_image, n_eval)
    exact = on_recording_machine(folder, settings)
    lines = [f"  {settings.get('dataset')}: the first {n} {settings.get('split', 'test')} images "
             f"(evaluated in batches of {settings.get('batch_size')}: {n_eval}) against "
             f"{results.parent}/per_image.npz; " + (
                 "recorded on this machine: every bit must agree" if exact
                 else "recorded on another machine")]
    return lines, compare(per_image, hits, n), n, exact


def cell_lines(differ, n):
    """Agreement per cell, one line per row (a model's method and prior, a design's method):
    '4: 200/200  8: 199/200 ...'; a cell's last part is its budget."""
    rows = {}
    for cell, count in differ.items():
        row = " ".join(map(str, cell[1:-1]))
        rows.setdefault(row, []).append(f"{cell[-1]}: {n - count}/{n}")
    return [f"    {row:<24} " + "  ".join(cells) for row, cells in rows.items()]


def check_one(root, folder, kind, options):
    """-> (report lines, problems: one line each)."""
    path = folder / FILES[kind]
    size = path.stat().st_size
    lines, problems = [f"{path}: {size / 1e6:.1f} MB"], []
    recorded = card_sha256(folder)
    if recorded != sha256(path):
        problems.append(f"{path}: its sha256 is not the one {folder}/MODEL.md gives "
                        f"({recorded or 'none'}): the file changed after export")
    try:
        more, differ, n, exact = reevaluate(root, folder, kind, options)
    except (ValueError, data.DataError, OSError, KeyError) as error:
        return lines, problems + [f"{path}: {str(error).splitlines()[0]}"]
    allowed = 0 if exact else (options.tolerance if options.tolerance is not None
                               else max(1, n // 100))
    lines += more + cell_lines(differ, n)
    total = sum(differ.values())
    lines.append(f"  {len(differ)} cells, {total} differing image(s) in all; at most {allowed} "
                 f"per cell may differ here")
    over = [f"{'/'.join(map(str, c))} ({d})" for c, d in differ.items() if d > allowed]
    if over:
        problems.append(f"{path}: {len(over)} cell(s) differ from the committed per-image "
                        f"results beyond {allowed} image(s): {', '.join(over[:6])}")
    if not differ:
        problems.append(f"{path}: its per-image results hold no cell to check")
    return lines, problems


def committed(root):
    """[(folder, kind)] of every exported file under root, models before heads."""
    return [(path.parent, kind) for kind, name in FILES.items()
            for path in sorted(Path(root).glob(f"*/{name}"))]


def check(root, options, names=(), log=print):
    """Check every committed model (or those named) -> the problems found (empty: all agree)."""
    found, problems = committed(root), []
    total = sum((folder / FILES[kind]).stat().st_size for folder, kind in found)
    for card_path in sorted(Path(root).glob("*/MODEL.md")):
        if not any((card_path.parent / name).is_file() for name in FILES.values()):
            problems.append(f"{card_path}: a card without its file (one of "
                            f"{', '.join(FILES.values())})")
    if not found:
        log(f"no committed models in {root} (python -m experiments.models export --run "
            f"runs/NAME --to {root}/NAME writes one)")
    for folder, kind in found:
        if names and folder.name not in names:
            continue
        lines, more = check_one(root, folder, kind, options)
        log("\n".join(lines + [f"  FAIL {p}" for p in more]))
        problems += more
    log(f"all models together: {total / 1e6:.1f} MB (at most {MAX_TOTAL_BYTES / 1e6:.0f} MB)")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{root}: the models together are {total / 1e6:.1f} MB, more than "
                        f"{MAX_TOTAL_BYTES / 1e6:.0f} MB")
    return problems


# -----------------------------------------------------------------------------
# What a retraining moved

def committed_per_image(root, rev, folder):
    """folder/per_image.npz as commit `rev` of the git repository at root holds it."""
    path = Path(folder).resolve().relative_to(Path(root).resolve()) / "per_image.npz"
    shown = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path.as_posix()}"],
                           capture_output=True)
    if shown.returncode:
        raise ValueError(f"git show {rev}:{path}: {shown.stderr.decode().strip()}")
    return utils.load_per_image(io.BytesIO(shown.stdout))


def moved_row(name, before, after):
    """One results folder's right/wrong cells, before vs after -> a markdown row. Only cells
    of the same shape (draws, images) in both are compared: the rest are counted apart."""
    cells = sorted(k for k in after if k in before and after[k].dtype == bool
                   and before[k].shape == after[k].shape)
    equal = sum(bool((before[k] == after[k]).all()) for k in cells)
    change = {k: 100 * (after[k].mean() - before[k].mean()) for k in cells}
    answers = sum(int((before[k] != after[k]).sum()) for k in cells)
    total = sum(after[k].size for k in cells)
    largest = max(cells, key=lambda k: abs(change[k]))
    mean = sum(abs(v) for v in change.values()) / len(cells)
    others = len(set(before) | set(after)) - len(cells)
    where = f" (`{'/'.join(map(str, largest))}`)" if change[largest] else ""
    return (f"| {name} | {len(cells)} | {equal} | {change[largest]:+.2f}{where} | {mean:.2f} "
            f"| {100 * answers / total:.1f} % | {others} |")


def moved(root, rev, names):
    """-> markdown: how each named results folder's per-image results moved since `rev`."""
    lines = [f"Per-image results now against commit {rev}: the right/wrong cells (top-1 and "
             f"kNN, per image); a change is in points of accuracy; other cells are saliency "
             f"reads and cells only one side has.", "",
             "| results | cells | bit for bit equal | largest change | mean abs change "
             "| answers changed | other cells |", "|---|---|---|---|---|---|---|"]
    for name in names:
        folder = Path(root) / "results" / name
        before = committed_per_image(root, rev, folder)
        lines.append(moved_row(name, before, utils.load_per_image(folder / "per_image.npz")))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.models",
                                     description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="runs/NAME -> results/NAME/model.pt (or a head's "
                              "file) and MODEL.md")
    out.add_argument("--run", required=True, help="a finished run folder (train.py's --out, or "
                     "a head's: experiments.placement, .glimpses, .move, .ranker)")
    out.add_argument("--to", required=True, help="its results folder, e.g. results/NAME")
    chk = commands.add_parser("check", help="re-evaluate every committed model")
    chk.add_argument("names", nargs="*", help="results folders to check (none: all)")
    chk.add_argument("--results", default="results", help="the folder of results/NAME folders")
    chk.add_argument("--data-dir-cifar10", help="CIFAR-10's folder (default: the model's)")
    chk.add_argument("--data-dir-folder", help="the image folders' folder (default: the model's)")
    chk.add_argument("--limit", type=utils.int_at_least(1), default=200,
                     help="compare the first N test images of each model")
    chk.add_argument("--tolerance", type=utils.int_at_least(0), help="differing images allowed "
                     "per cell on a machine other than the recording one (default: 1 %% of "
                     "--limit, at least 1); on the recording machine every bit must agree")
    chk.add_argument("--threads", type=utils.int_at_least(1),
                     help="CPU threads (default: those the results were recorded with)")
    mov = commands.add_parser("moved", help="how far per_image.npz moved since a commit")
    mov.add_argument("names", nargs="+", help="results folders (results/NAME)")
    mov.add_argument("--before", required=True, help="the commit to compare with")
    args = parser.parse_args(argv)
    if args.command == "moved":
        try:
            print(moved(Path(__file__).resolve().parents[1], args.before, args.names))
        except (ValueError, OSError) as error:
            parser.error(str(error).splitlines()[0])
        return 0
    if args.command == "export":
        try:
            written = export(args.run, args.to)
        except (ValueError, OSError) as error:
            parser.error(str(error).splitlines()[0])
        print(f"wrote {written} and {Path(args.to) / 'MODEL.md'}")
        return 0
    args.data_dirs = {"cifar10": args.data_dir_cifar10, "folder": args.data_dir_folder}
    problems = check(Path(args.results), args, set(args.names))
    print("\n".join(f"error: {p}" for p in problems) if problems else
          "ok: every committed model agrees with its committed per-image results")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

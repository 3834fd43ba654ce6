"""experiments.models: a finished run exports to a small model.pt (and a head's file) that loads
like a checkpoint, with a card; `check` re-evaluates it against its committed per-image results bit
for bit, catches a tampered weight and a flipped bit, allows a documented tolerance on another
machine, and keeps every committed model together under 100 MB.

The fixture is a real pipeline on the built-in shapes data, in a temporary folder: train.py (a
tiny model), oracle.py (its per-image results), experiments.placement and label_free (a placer
and its per-image results), then export. A second fixture adds the label-free frontier's designs
(experiments.move, .ranker, .glimpses) and two experiments.frontier runs that used them. The
committed-models test checks results/*/model.pt on 200 real test images when the data is
present."""
import hashlib
import json
import re
import shutil
import subprocess

import pytest
import torch

import data
import oracle
import spot
import train
import utils
from conftest import ROOT, SHARED_DATA
from experiments import (frontier, glimpses, label_free, layouts, models, move, placement,
                         ranker, sketch)
from test_train import TINY

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py

LIMIT = 48            # images oracle.py and label_free evaluated, in batches of 32
COMMON = ["--tokens", "4,8", "--draws", "2", "--limit", str(LIMIT), "--search-limit", "8", "--search-steps", "1",
          "--knn-limit", "0", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """runs/ and results/ as experiments/rerun.sh leaves them, for one tiny model and its placer."""
    root = tmp_path_factory.mktemp("models")
    run, placer_run, results = root / "runs" / "tiny", root / "runs" / "placer", root / "results"
    argv = [a for a in TINY if a not in ("--train-limit", "192")]
    assert train.main(argv + ["--train-limit", "768", "--epochs", "3", "--val-size", "64", "--out", str(run)]) == 0
    checkpoint = ["--checkpoint", str(run / "checkpoint.pt")]
    assert oracle.main(checkpoint + COMMON + ["--saliency-limit", "0", "--out", str(results / "tiny")]) == 0
    assert placement.main(checkpoint + ["--tokens", "4,8", "--epochs", "1", "--width", "16", "--batch-size", "64",
                                        "--no-progress", "--out", str(placer_run)]) == 0
    assert label_free.main(["evaluate", "--placer", str(placer_run / "placer.pt"), "--against",
                            str(results / "tiny")] + checkpoint + COMMON + ["--out", str(results / "label-free")]) == 0
    for source, name in ((run, "tiny"), (placer_run, "placer")):
        (results / name).mkdir(exist_ok=True)
        for file in ("run.json", "metrics.jsonl"):                 # as rerun.sh copies them
            shutil.copy(source / file, results / name)
        assert models.main(["export", "--run", str(source), "--to", str(results / name)]) == 0
    return run, results


def check(results, *extra):
    return models.main(["check", "--results", str(results), "--limit", "20", *extra])


def test_export_keeps_only_what_loading_needs(pipeline):
    run, results = pipeline
    path = results / "tiny" / "model.pt"
    saved = torch.load(path, weights_only=True)           # a plain dict of tensors and numbers
    assert set(saved) == {"model_config", "model", "classes", "args"}
    assert set(saved["args"]) <= set(models.DATA_ARGS) and saved["args"]["dataset"] == "shapes"
    assert all(t.dtype == torch.float32 for t in saved["model"].values() if t.is_floating_point())
    assert path.stat().st_size < (run / "checkpoint.pt").stat().st_size / 2      # no optimizer state
    # it loads as the checkpoint does, with the run's data, and computes the same logits
    model, dataset, args = data.load_model_and_data(path)
    original = spot.load_checkpoint(run / "checkpoint.pt")
    positions = spot.isotropic_positions(8).expand(16, 8, 2)
    ours = train.predict(model, dataset.test.images[:16], positions, "cpu", 16)[0]
    assert torch.equal(ours, train.predict(original, dataset.test.images[:16], positions, "cpu", 16)[0])
    assert dataset.name == "shapes" and args["val_size"] == 64
    # the card: data, parameters, the final test line, size and sha256 of the file
    card = (results / "tiny" / "MODEL.md").read_text()
    final = models.read_jsonl(run / "metrics.jsonl")[-1]
    assert f"{final['test_acc']:.2f} %" in card and f"{final['test_acc@4']:.2f} % at 4 tokens" in card
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card and "shapes, built in" in card
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card and f"{path.stat().st_size:,} bytes" in card
    placer, _ = placement.load_placer(results / "placer" / "placer.pt")
    assert "python -m experiments.placement" in (results / "placer" / "MODEL.md").read_text()
    assert set(torch.load(results / "placer" / "placer.pt", weights_only=True)) == {"placer_config", "placer"}


def test_export_refuses_an_unfinished_run(pipeline, tmp_path, capsys):
    run, _ = pipeline
    with pytest.raises(SystemExit):
        models.main(["export", "--run", str(tmp_path), "--to", str(tmp_path / "out")])
    assert f"{tmp_path}/checkpoint.pt does not exist" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    lines = (unfinished / "metrics.jsonl").read_text().splitlines()
    (unfinished / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")      # no final test line
    with pytest.raises(SystemExit):
        models.main(["export", "--run", str(unfinished), "--to", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "metrics.jsonl has no final test line" in error and str(unfinished) in error
    assert not (tmp_path / "out").exists()


def test_check_agrees_bit_for_bit(pipeline, capsys):
    _, results = pipeline
    assert check(results) == 0
    out = capsys.readouterr().out
    bits = utils.load_per_image(results / "tiny" / "per_image.npz")
    cells = [key for key in bits if key[:2] == ("top1", "prior")]
    assert len(cells) == 14 and out.count(" 20/20") == 14 + 2         # 7 priors x 2 budgets; 2 placer cells
    assert "recorded on this machine: every bit must agree" in out and "evaluated in batches of 32: 32" in out
    assert "ok: every committed model agrees" in out
    assert check(results, "--limit", "1000") == 0                     # every evaluated image: 48 of 48
    assert capsys.readouterr().out.count(f" {LIMIT}/{LIMIT}") == 16


def tampered(results, tmp_path, change, update_card):
    """A copy of results whose model.pt had `change` applied (and its card's sha256, if asked)."""
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    path = copy / "tiny" / "model.pt"
    saved = torch.load(path, weights_only=True)
    change(saved["model"])
    torch.save(saved, path)
    if update_card:
        card = copy / "tiny" / "MODEL.md"
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        card.write_text(re.sub(r"sha256 `[0-9a-f]{64}`", f"sha256 `{sha}`", card.read_text()))
    return copy


def test_check_catches_a_tampered_weight(pipeline, tmp_path, capsys):
    _, results = pipeline

    def nudge(state):                 # one weight, by far less than any prediction notices
        state["head.weight"][0, 0] += 1e-6
    assert check(tampered(results, tmp_path / "a", nudge, update_card=False)) == 1
    assert "its sha256 is not the one" in capsys.readouterr().out

    def favour(state):                # a card that agrees does not help: the bits differ
        state["head.bias"][int(torch.argmin(state["head.bias"]))] += 10
    assert check(tampered(results, tmp_path / "b", favour, update_card=True)) == 1
    out = capsys.readouterr().out
    assert "sha256" not in out.split("error:", 1)[1] and "differ from the committed per-image results" in out


def test_a_flipped_bit_fails_here_and_passes_within_tolerance_elsewhere(pipeline, tmp_path, monkeypatch, capsys):
    _, results = pipeline
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    bits = {k: torch.as_tensor(v) for k, v in utils.load_per_image(copy / "tiny" / "per_image.npz").items()}
    bits["top1", "prior", "uniform", 8][0, 3] ^= True     # as if an image flipped on another CPU
    utils.save_per_image(copy / "tiny" / "per_image.npz", bits)
    assert check(copy, "tiny") == 1
    assert "1 cell(s) differ" in capsys.readouterr().out
    monkeypatch.setattr(utils, "cpu_name", lambda: "another CPU")
    assert check(copy, "tiny") == 0                       # 1 image of 20: within 1 % (at least 1)
    out = capsys.readouterr().out
    assert "recorded on another machine" in out and "1 differing image(s) in all" in out
    assert check(copy, "tiny", "--tolerance", "0") == 1


def test_all_models_together_fit_the_size_limit(pipeline, monkeypatch, capsys):
    _, results = pipeline
    monkeypatch.setattr(models, "MAX_TOTAL_BYTES", 1000)
    assert check(results) == 1
    assert "the models together are" in capsys.readouterr().out


def stage(name):
    """results/NAME -> the rerun.sh stage that retrains it: cifar10-spot -> cifar10,
    cifar10-spot-seed1 -> cifar10-seed1, shapes-default -> shapes."""
    return re.sub(r"-.*?(-seed\d+)?$", r"\1", name)


def test_every_committed_model_agrees_on_200_real_images(capsys):
    """Each committed results/NAME/model.pt (and placer.pt) against results/NAME's per-image
    results, on 200 test images of the real data (skipped where it is absent)."""
    root = ROOT / "results"
    exported = models.committed(root)
    expected = sorted(path.parent.name for path in root.glob("*/run.json"))
    strays = [path for path in root.glob("*/MODEL.md")
              if not any((path.parent / name).is_file() for name in models.FILES.values())]
    assert not strays, f"cards without their model: {strays}"
    if not exported:
        pytest.skip(f"no committed models yet, so none is missing or wrong; the {len(expected)} runs of "
                    f"results/*/run.json await export (bash experiments/rerun.sh)")
    # rerun.sh retrains a stage at a time: a dataset's runs, or CIFAR-10's second seeds; a stage
    # with one model committed has them all (a stage not yet retrained has none: README says so)
    names = {folder.name for folder, _ in exported}
    stages = {stage(name) for name in names}
    missing = [name for name in expected if stage(name) in stages and name not in names]
    assert not missing, f"results folders whose run has no committed model: {missing}"
    folders = {"cifar10": SHARED_DATA / "cifar10", "folder": SHARED_DATA / "imagenette-128"}
    needed = {torch.load(folder / "model.pt", weights_only=True)["args"]["dataset"]
              for folder, kind in exported if kind == "model"}
    absent = [str(folders[name]) for name in needed if name in folders and not folders[name].is_dir()]
    if absent:
        pytest.skip(f"real data not found at {absent}")
    argv = ["check", "--limit", "200", "--results", str(root), "--data-dir-cifar10", str(folders["cifar10"]),
            "--data-dir-folder", str(folders["folder"])]
    code = models.main(argv)
    assert code == 0, capsys.readouterr().out[-3000:]


def test_moved_counts_what_a_retraining_changed(pipeline, tmp_path):
    """`moved` reads the per-image results an earlier commit holds (git show) and counts the cells
    and answers that differ now; a commit that lacks the file is named in the error."""
    _, results = pipeline
    repo = tmp_path / "repo"
    shutil.copytree(results, repo / "results")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "results"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "before"], check=True)
    path = repo / "results" / "tiny" / "per_image.npz"
    bits = {k: torch.as_tensor(v) for k, v in utils.load_per_image(path).items()}
    cell = ("top1", "prior", "uniform", 8)
    before = bits[cell].float().mean()
    bits[cell][:, :3] = ~bits[cell][:, :3]                  # 3 answers of each draw flip
    utils.save_per_image(path, bits)
    change = 100 * float(bits[cell].float().mean() - before)
    table = models.moved(repo, "HEAD", ["tiny"]).splitlines()
    cells = [k for k, v in bits.items() if v.dtype == torch.bool]
    row = table[-1].split(" | ")
    assert row[1:3] == [str(len(cells)), str(len(cells) - 1)]
    if change:                                            # the one cell that moved is the largest
        assert row[3] == f"{change:+.2f} (`top1/prior/uniform/8`)"
    assert row[5] == f"{100 * 6 / sum(bits[k].numel() for k in cells):.1f} %"
    with pytest.raises(ValueError, match="git show"):
        models.moved(repo, "HEAD~1", ["tiny"])


# -----------------------------------------------------------------------------
# The label-free frontier's designs: exported beside the frontier runs that judged them

DESIGNS = {"move": "metrics.jsonl", "ranker": "metrics.json", "glimpses": "metrics.jsonl",
           "sketch": "metrics.jsonl", "learned": "metrics.jsonl", "bank": "metrics.jsonl"}
LAYOUTS = ["--train-limit", "64", "--epochs", "1", "--batch-size", "32", "--no-progress",
           "--threads", "1"]
HEAD = ["--tokens", "4", "--batch-size", "32", "--width", "16", "--no-progress", "--threads", "1"]
FRONTIER = ["--tokens", "4,8", "--budgets", "4", "--k", "2", "--search-limit", "0", "--limit",
            "40", "--batch-size", "16", "--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def designs(pipeline, tmp_path_factory):
    """A tree laid out as the repository, every path relative to it as rerun.sh gives them: the
    tiny model committed in results/tiny, each design trained from that model.pt in runs/, two
    frontier runs in results/ (glimpses replace the model the other two read), the designs
    exported. -> the tree's root."""
    _, results = pipeline
    root = tmp_path_factory.mktemp("designs")
    shutil.copytree(results / "tiny", root / "results" / "tiny")
    model = ["--checkpoint", "results/tiny/model.pt"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert move.main(model + HEAD + ["--train-limit", "64", "--epochs", "2",
                                         "--out", "runs/move"]) == 0
        assert ranker.main(model + HEAD + ["--train-limit", "64", "--epochs", "1", "--bank", "3",
                                           "--pool", "6", "--out", "runs/ranker"]) == 0
        assert glimpses.main(model + HEAD + ["--epochs", "1", "--out", "runs/glimpses"]) == 0
        assert sketch.main(model + HEAD + ["--train-limit", "64", "--epochs", "1", "--size", "8",
                                           "--channels", "8", "--out", "runs/sketch"]) == 0
        assert layouts.main(model + LAYOUTS + ["--tokens", "4,8", "--out", "runs/learned"]) == 0
        assert layouts.main(model + LAYOUTS + ["--tokens", "4", "--choices", "2", "--size", "8",
                                               "--channels", "8", "--out", "runs/bank"]) == 0
        assert frontier.main(model + FRONTIER + ["--move", "runs/move/move.pt", "--ranker",
                                                 "runs/ranker/ranker.pt", "--sketch",
                                                 "runs/sketch/sketch.pt", "--learned",
                                                 "runs/learned/learned.pt", "--bank",
                                                 "runs/bank/bank.pt",
                                                 "--out", "results/frontier-heads"]) == 0
        assert frontier.main(model + FRONTIER + ["--glimpses", "runs/glimpses/glimpses.pt",
                                                 "--out", "results/frontier-glimpses"]) == 0
        for kind in DESIGNS:
            assert models.main(["export", "--run", f"runs/{kind}", "--to", f"results/{kind}"]) == 0
    return root


def test_export_of_a_design_writes_its_file_its_run_and_a_card(designs):
    for kind, metrics in DESIGNS.items():
        run, folder = designs / "runs" / kind, designs / "results" / kind
        path = folder / f"{kind}.pt"
        saved = models.tensors(torch.load(path, weights_only=True))
        original = models.tensors(torch.load(run / path.name, weights_only=True))
        assert saved.keys() == original.keys() and saved
        assert all(torch.equal(saved[k], v) for k, v in original.items())
        assert all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
        for file in ("run.json", metrics):             # check finds the frontier through them
            assert (folder / file).read_text() == (run / file).read_text()
        card = (folder / "MODEL.md").read_text()
        assert hashlib.sha256(path.read_bytes()).hexdigest() in card
        assert f"{path.stat().st_size:,} bytes" in card and f"load_{kind}(" in card
        module = models.HEADS[kind].module                 # learned and bank: .layouts
        assert f"- command: `python -m {module} --checkpoint results/tiny/" in card
        assert "`results/tiny/model.pt`" in card.split("- data:")[1].splitlines()[0]
    cards = {kind: (designs / "results" / kind / "MODEL.md").read_text() for kind in DESIGNS}
    last = models.read_jsonl(designs / "runs" / "move" / "metrics.jsonl")[-1]
    assert f"learned move {last['val_move@4']:.2f} % (two passes of 4 tokens)" in cards["move"]
    assert f"{last['val_isotropic@8']:.2f} % at 8 tokens" in cards["move"]
    report = json.loads((designs / "runs" / "ranker" / "metrics.json").read_text())
    assert f"glance and rank {report['budgets']['4']['ranker']:.2f} %" in cards["ranker"]
    # glimpses' file holds the fine-tuned model beside the placer: the card counts both
    tuned, placer = glimpses.load_glimpses(designs / "results" / "glimpses" / "glimpses.pt")
    counts = [sum(p.numel() for p in m.parameters()) for m in (placer, tuned)]
    line = f"- parameters: {sum(counts):,} = {counts[0]:,} (placer) + {counts[1]:,} (model)"
    assert line in cards["glimpses"]


def test_export_refuses_an_unfinished_design_run(designs, tmp_path, capsys):
    unfinished = tmp_path / "move"
    shutil.copytree(designs / "runs" / "move", unfinished)
    lines = (unfinished / "metrics.jsonl").read_text().splitlines()
    (unfinished / "metrics.jsonl").write_text(lines[0] + "\n")        # epoch 1 of 2
    stopped = tmp_path / "ranker"
    shutil.copytree(designs / "runs" / "ranker", stopped)
    (stopped / "metrics.json").unlink()             # the ranker writes it once all is trained
    for run, error in ((unfinished, "metrics.jsonl does not reach epoch 2"),
                       (stopped, "metrics.json does not exist")):
        with pytest.raises(SystemExit):
            models.main(["export", "--run", str(run), "--to", str(tmp_path / "out")])
        assert f"{run}/{error}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_check_re_evaluates_each_design_on_its_frontier_run(designs, capsys):
    results = designs / "results"
    assert [kind for _, kind in models.committed(results)] == ["model", "glimpses", "move",
                                                                "ranker", "sketch", "learned",
                                                                "bank"]
    assert check(results) == 0
    out = capsys.readouterr().out
    for method in ("glimpses", "learned-move", "glance-and-rank", "sketch", "layout-bank"):
        assert re.search(rf"^    {method} +4: 20/20$", out, re.M), method
    assert re.search(r"^    prior learned +4: 20/20  8: 20/20$", out, re.M)   # on the curve
    assert f"against {results}/frontier-heads/per_image.npz" in out
    assert f"against {results}/frontier-glimpses/per_image.npz" in out
    assert out.count("recorded on this machine: every bit must agree") == 7
    assert out.count("evaluated in batches of 16: 32") == 6


def test_check_names_a_flipped_design_bit_and_a_design_no_frontier_used(designs, tmp_path,
                                                                          capsys):
    copy = tmp_path / "results"             # the model.pt the frontier read is the copy's own
    shutil.copytree(designs / "results", copy)
    path = copy / "frontier-heads" / "per_image.npz"
    bits = {k: torch.as_tensor(v) for k, v in utils.load_per_image(path).items()}
    bits["top1", "learned-move", 4][5] ^= True
    utils.save_per_image(path, bits)
    assert check(copy, "move") == 1
    error = capsys.readouterr().out.split("error:")[1]
    assert "1 cell(s) differ" in error and "top1/learned-move/4 (1)" in error
    assert check(copy, "ranker") == 0                  # its cells of the same file still agree
    # a frontier run given the committed file, not the run's, is found through it too
    recorded = copy / "frontier-heads" / "frontier.json"
    found = json.loads(recorded.read_text())
    found["settings"]["ranker"] = str(copy / "ranker" / "ranker.pt")
    recorded.write_text(json.dumps(found))
    assert check(copy, "ranker") == 0
    found["settings"]["ranker"] = str(copy / "elsewhere" / "ranker.pt")
    recorded.write_text(json.dumps(found))
    assert check(copy, "ranker") == 1
    shutil.rmtree(copy / "frontier-glimpses")
    assert check(copy, "glimpses") == 1
    error = capsys.readouterr().out.split("error:")[1]
    assert "no frontier.json" in error
    assert "python -m experiments.frontier --glimpses runs/glimpses/glimpses.pt" in error


def test_the_size_limit_counts_the_designs(designs, monkeypatch, capsys):
    results = designs / "results"
    sizes = [(results / kind / f"{kind}.pt").stat().st_size for kind in DESIGNS]
    total = (results / "tiny" / "model.pt").stat().st_size + sum(sizes)
    monkeypatch.setattr(models, "MAX_TOTAL_BYTES", total)
    assert check(results, "tiny") == 0
    monkeypatch.setattr(models, "MAX_TOTAL_BYTES", total - 1)
    assert check(results, "tiny") == 1
    assert "the models together are" in capsys.readouterr().out

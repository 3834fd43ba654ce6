"""experiments/ -- research beyond the paper (arXiv 2507.01654) and measurements of it. The top
level never imports this folder; these scripts import the top level. Run them from the
repository root as modules:

    python -m experiments.bench --quick          # what subpixel tokens cost next to a grid ViT
    python -m experiments.placement --help       # train the learned label-free placer
    python -m experiments.label_free --help      # evaluate it against the oracle; its figure
    python -m experiments.frontier --help        # label-free methods against the priors'
                                                 # accuracy-vs-compute curve (costs: cost.py)
    python -m experiments.ranker --help          # its designs: glance and rank,
    python -m experiments.move --help            # label-free SPoT-ON as a learned move,
    python -m experiments.glimpses --help        # sequential glimpses,
    python -m experiments.sketch --help          # tokens placed from a sketch of the image,
    python -m experiments.layouts --help         # learned fixed layouts (a prior) and a bank
    python -m experiments.tables                 # RESULTS.md's tables from results/

NOTES.md is the lab notebook: what was tried, measured and kept.
"""

"""experiments/ -- research beyond the paper and measurements of it: benchmarks, the learned
label-free placer, probes and the lab notes. The top level never imports this folder; these
scripts import the top level. Run them from the repository root as modules:

    python -m experiments.bench --quick
    python -m experiments.placement --help
"""

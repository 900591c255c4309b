"""The paper's experiments, each runnable as ``python -m nnsim.experiments.NAME [--quick] --out DIR``."""

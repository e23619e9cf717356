"""ntk-pipeline: empirical neural tangent kernels of PyTorch models, tiled over Ray into Zarr.

    import pipeline
    K = pipeline.empirical_ntk(model, x1, x2, mode="trace")      # in memory, (n1, n2)
    phi = pipeline.sketch_features(model, x1, k=4096)            # (n1, o, k): <phi_i, phi_j> ~ K, linear in n
    pipeline.run("configs/quickstart.yaml")                       # tiled, into a Zarr store

Where things are (the full map, one line per module: pipeline/README.md):
- the cost of method X: ``pipeline/methods/<X>.py`` (``flops``, ``memory``); the registry is ``methods.REGISTRY``.
- the rule for layer Y: ``pipeline/methods/structured/rules/<family>.py``, found by ``rules.rule_for(module)``.
- what the store records: ``pipeline/store/format.py`` (``Provenance``, versioned by ``format_version``).
- reading a store: ``pipeline.open_kernel`` (``pipeline/kernel.py``), the only reader (a feature store,
  ``ntk.mode: features``: ``pipeline.open_features``, ``pipeline/feature_store.py``, on top of it); one-pass
  figures of it (trace, effective rank, alignment, distance): ``pipeline.analyze`` (``pipeline/analyze.py``).
- how blocks run: ``pipeline/execute/`` (the ``Executor`` protocol); the run itself: ``pipeline/run.py``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pipeline.analyze import Analysis, analyze
from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError, DataError, ModelError, PipelineError, StoreError
from pipeline.feature_store import Features, open_features
from pipeline.features import sketch as sketch_features
from pipeline.kernel import Kernel, open_kernel
from pipeline.methods import empirical_ntk
from pipeline.run import RunSummary, run

try:
    __version__ = version("ntk-pipeline")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Analysis", "ConfigError", "DataError", "Features", "Kernel", "ModelError", "PipelineError", "RunConfig",
    "RunSummary", "StoreError", "__version__", "analyze", "empirical_ntk", "load_config", "open_features",
    "open_kernel", "run", "sketch_features",
]

"""Evidence experiments (docs/method.md §10, §11): mislabeled-task detection, the removal table, and the accuracy
of influence estimates against leave-one-out re-optimisation.

    run_experiment(name, config, quick, out, log) -> dict     one experiment, results in ``out``
    report_run(run_dir) -> Path                                 report.md + report.html of a run folder

A config file (TOML/YAML/JSON) holds the run's sections (``[data] [model] [inner] [objective]
[train] [refine]``, as for ``metainfluence train``), an ``[influence]`` section (hessian, solver,
damping, …) and one section named after the experiment (``[detection]``, ``[removal]`` or
``[estimates]``). ``quick`` replaces the run sections by a small embedded-digits run (sinusoid for
``estimates``) that finishes in about a minute on two CPU cores.

Every run folder holds ``results.json`` (settings, seeds, sign convention, timings, all numbers),
``results.safetensors`` (score vectors, rankings, corruption flags), PNG figures, and after
:func:`report_run` ``report.md`` / ``report.html``. Files are written atomically.
"""

from .common import EXPERIMENTS, METHODS
from .detection import DetectionSettings, run_detection
from .estimates import EstimatesSettings, run_estimates
from .removal import PAPER_TABLE1, RemovalSettings, run_removal
from .runner import load_experiment_settings, report_run, run_experiment

__all__ = [
    "EXPERIMENTS", "METHODS", "PAPER_TABLE1", "DetectionSettings", "EstimatesSettings", "RemovalSettings",
    "load_experiment_settings", "report_run", "run_detection", "run_estimates", "run_experiment", "run_removal",
]

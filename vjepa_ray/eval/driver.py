"""Evaluation's driver side: the probe run on Ray Train, its results written to the run folder.

``run`` is what ``python -m vjepa_ray.evaluate`` and every Tune trial (after its pretraining) call; the
workers run ``vjepa_ray.eval.loop.train_func``.
"""

from __future__ import annotations

import json
from typing import Any

from vjepa_ray import cluster, runs
from vjepa_ray.config import Config, ConfigError, to_dict
from vjepa_ray.eval.loop import check_runnable, labelled_refs, load_encoder, train_func
from vjepa_ray.train.trainer import build_trainer


def run(cfg: Config) -> dict[str, Any]:
    """Runs the evaluation on Ray Train; writes the results to ``<run folder>/probe_results.json`` and returns
    them, with ``results_file`` saying where they went."""
    import ray.train

    # Config mistakes fail here, in one line, rather than inside a worker.
    check_runnable(cfg)
    load_encoder(cfg)
    labelled_refs(cfg.probe.train_manifest, "probe.train_manifest")
    labelled_refs(cfg.probe.val_manifest, "probe.val_manifest")
    cluster.connect(cfg)
    # A fixed number of workers (the most ray.num_workers allows): the probes hold no checkpoint to resize from.
    trainer = build_trainer(cfg, train_func, {"cfg": to_dict(cfg)}, name=runs.probe_run_name(cfg), elastic=False)
    try:
        result = trainer.fit()
    except ray.train.ControllerError as err:
        # A config or data error on a worker (not retried): the command's one line, exit 2.
        if isinstance(err.controller_failure, ConfigError):
            raise err.controller_failure from None
        raise
    results = json.loads(result.metrics["results"])
    path = runs.join(runs.run_dir(cfg), runs.PROBE_RESULTS_FILE)
    runs.write_json(path, results)
    results["results_file"] = path
    return results

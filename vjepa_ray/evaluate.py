"""``python -m vjepa_ray.evaluate``: attentive probes on a frozen (or fine-tuned) encoder, on Ray Train.

    python -m vjepa_ray.evaluate --config job.yaml probe.checkpoint=RUN_OR_FILE \\
        probe.train_manifest=train.txt probe.val_manifest=val.txt "probe.lr=[1e-3,3e-4]"

The encoder comes from ``probe.checkpoint``: a file in Meta's released layout, one our export wrote,
or a pretraining run folder (its checkpoint; a local folder or a URI such as ``s3://bucket/runs/demo``)
or one of its ``step_*`` checkpoints; the weights under ``probe.checkpoint_key``
(the EMA target encoder by default) are loaded into ``model.*`` built for ``data.frames_per_clip`` x
``data.crop_size``. Manifests hold ``path label`` lines (or CSV/JSONL); entries may be videos or
images (an image is evaluated as a static clip).

Every (probe.lr, probe.weight_decay) pair is a probe; all of them train in the same pass, fed by one
encoder forward per batch. Training uses one random crop of all ``probe.num_segments`` segments
(``probe.train_augmentation=false``: one fixed crop and start per video, ``probe.cache_features=true``: their
tokens computed once and reused every epoch); validation averages each probe's softmax over
``probe.num_views`` spatial views. Workers
(``ray.num_workers``, gloo on CPUs) split the examples and average gradients. The results (each
probe's val top-1 and the best) are printed and written to ``<ray.storage_path>/<meta.name>/
probe_results.json`` (a local folder or a URI, see ``vjepa_ray.runs``); the loop is ``vjepa_ray.eval.loop``.
"""

from __future__ import annotations

from vjepa_ray.cli import run_command
from vjepa_ray.config import Config

PROG = "python -m vjepa_ray.evaluate"


def check(cfg: Config) -> None:
    from vjepa_ray.eval.loop import check_runnable

    check_runnable(cfg)


def evaluate(cfg: Config) -> dict:
    from vjepa_ray.eval import driver

    return driver.run(cfg)


def main(argv: list[str] | None = None) -> int:
    results = run_command(PROG, "Attentive-probe evaluation of a frozen V-JEPA encoder on Ray Train.", argv,
                          check, evaluate)
    from vjepa_ray import console

    console.wait_for_workers()
    for probe in results["probes"]:
        print(f"lr={probe['lr']:g} wd={probe['weight_decay']:g}: top-1 {probe['top1']:.2f}")
    print(f"best top-1 {results['top1']:.2f} (lr={results['best']['lr']:g}, wd={results['best']['weight_decay']:g})"
          f", written to {results['results_file']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

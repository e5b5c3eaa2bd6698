"""What a Train worker's process imports: DeepSpeed without the MLflow its autotuner would pull in."""

from __future__ import annotations

import json
import subprocess
import sys

IMPORT_IN_A_FRESH_WORKER = """
import json, sys
from vjepa_ray.worker_env import import_deepspeed
import_deepspeed()
loaded = {name: name in sys.modules for name in ("deepspeed", "mlflow", "pandas", "scipy", "fastapi")}
import mlflow  # still importable afterwards, for code that needs it
from deepspeed.autotuning import autotuner
print(json.dumps({"loaded": loaded, "autotuner_has_mlflow": autotuner.has_mlflow}))
"""


def test_deepspeed_is_imported_without_mlflow_and_its_dependencies_which_stay_importable():
    proc = subprocess.run([sys.executable, "-c", IMPORT_IN_A_FRESH_WORKER], capture_output=True, text=True,
                          timeout=120, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == {"deepspeed": True, "mlflow": False, "pandas": False, "scipy": False,
                                "fastapi": False}
    assert result["autotuner_has_mlflow"] is False

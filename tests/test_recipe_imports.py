"""The recipe layer runs without Ray and DeepSpeed: importing all of it loads neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, json, pkgutil, sys
import vjepa_ray.recipe as recipe
modules = sorted(m.name for m in pkgutil.iter_modules(recipe.__path__))
for name in modules:
    importlib.import_module(f"vjepa_ray.recipe.{name}")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed"))
print(json.dumps({"modules": modules, "heavy": heavy}))
"""


def test_importing_every_recipe_module_loads_neither_ray_nor_deepspeed():
    # A fresh interpreter: this one may have imported Ray for other tests.
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["modules"] == ["clipping", "ema", "masks", "objective", "optimizer", "regulation", "schedules", "step"]
    assert found["heavy"] == []

"""Cluster definitions: launcher YAMLs validate against Ray's own schema; KubeRay manifests carry what
an elastic, preemptible, token-authenticated deployment needs; nothing holds a credential."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_YAMLS = sorted((ROOT / "cluster_configs").glob("*.yaml"))
KUBERAY_YAMLS = sorted((ROOT / "cluster_configs" / "kuberay").glob("*.yaml"))


def test_there_are_aws_gcp_and_kuberay_definitions():
    assert {p.stem for p in LAUNCHER_YAMLS} >= {"aws", "gcp"}
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY_YAMLS}
    assert kinds == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises jsonschema.ValidationError on a bad field

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not run training or decoding work"
    assert "InstanceMarketOptions" not in head["node_config"] and "scheduling" not in head["node_config"]
    decode, train = types["cpu_decode"], types["gpu_train"]
    assert decode["labels"] == {"vjepa-role": "decode"} and train["labels"] == {"vjepa-role": "train"}
    node_config = yaml.safe_dump(train["node_config"])
    assert "spot" in node_config.lower(), "GPU nodes are spot/preemptible"
    for node_type in (decode, train):
        assert 0 <= node_type["min_workers"] < node_type["max_workers"]
    assert raw["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "vjepa_ray" in c for c in raw["setup_commands"])
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard stays off the internet"
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), "token auth"
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}, "one token on every node"


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifest_fields(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", "no public dashboard"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-train"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] < group["maxReplicas"], "autoscaling range"
    gpu = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    cpu = groups["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu
    assert groups["gpu-train"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python -m vjepa_ray.pretrain")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("path", LAUNCHER_YAMLS + KUBERAY_YAMLS, ids=lambda p: p.name)
def test_no_credentials_in_cluster_files(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "AWS access key id"
    for word in ("aws_secret_access_key", "secretAccessKey", "private_key", "password", "RAY_AUTH_TOKEN"):
        assert word.lower() not in text.lower(), word

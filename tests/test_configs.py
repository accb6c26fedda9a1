"""Cluster configs: the AWS launcher config against Ray's own schema, the KubeRay manifests
against what a RayJob needs, and every entrypoint against insect's own argument parser."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from insectlib.cli.main import parser
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def test_aws_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    head, workers = nodes[config["head_node_type"]], nodes["gpu_worker"]
    assert head["resources"] == {"CPU": 0}  # the head does not compute
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU instances
    assert 0 <= workers["min_workers"] <= workers["max_workers"] <= config["max_workers"]
    for node in (head, workers):  # S3 through an instance profile, no keys
        assert "instance-profile" in node["node_config"]["IamInstanceProfile"]["Arn"]
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws.yaml").read_text()
    # Token authentication on every node, the token from the secret store, never inline.
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (start,) = [c for c in commands if "ray start" in c]
        assert "export RAY_AUTH_MODE=token" in start
        assert 'RAY_AUTH_TOKEN="$(aws secretsmanager get-secret-value' in start
        assert '[ -n "$RAY_AUTH_TOKEN" ] && export RAY_AUTH_TOKEN && ray start' in start


def test_aws_config_with_a_wrong_field_is_rejected():
    """The schema check above can fail: a misspelt field is caught."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def gpu_groups(cluster_spec: dict) -> list[dict]:
    groups = []
    for group in cluster_spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            if int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1:
                groups.append(group)
    return groups


@pytest.mark.parametrize("command", ["train", "classify"])
def test_kuberay_rayjob(command):
    job = yaml.safe_load((CLUSTER / "kuberay" / f"rayjob-{command}.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{command}.py"] and (REPO / argv[1]).exists()
    args = parser().parse_args([command, *argv[2:]])  # every flag is one insect knows
    assert args.gpu
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    assert gpu_groups(cluster), "no worker group with GPUs"
    assert "AWS_SECRET" not in json.dumps(job)


def test_kuberay_raycluster():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == ray.__version__
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    (group,) = gpu_groups(cluster["spec"])
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_dockerfile_builds_on_the_ray_gpu_image_of_our_version():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any("pip install" in line and "constraints.txt" in line for line in lines)

"""ray-cluster.yaml: valid for Ray's own cluster launcher, and holding the properties the
pipeline and our security defaults rely on."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray-cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, config) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


def test_config_matches_rays_schema(validator, config):
    assert schema_errors(validator, config) == []


def test_schema_check_rejects_broken_configs(validator, config):
    # The check above can fail: typical mistakes are caught by the same schema.
    typo = copy.deepcopy(config)
    typo["setup_comands"] = typo.pop("setup_commands")
    assert any("setup_comands" in e for e in schema_errors(validator, typo))
    fractional = copy.deepcopy(config)
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    assert any("gpu_worker/resources/GPU" in e for e in schema_errors(validator, fractional))
    no_node_config = copy.deepcopy(config)
    del no_node_config["available_node_types"]["cpu_worker"]["node_config"]
    assert any("node_config" in e for e in schema_errors(validator, no_node_config))


def test_ray_launcher_accepts_config(config):
    # What `ray up` does before it talks to the cloud: fill in the provider defaults, validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker", "cpu_worker"}


def test_node_groups_and_their_resources(config):
    types = config["available_node_types"]
    head, gpu, cpu = types[config["head_node_type"]], types["gpu_worker"], types["cpu_worker"]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["gpu_group"] >= 1
    assert "cpu_group" not in gpu["resources"]
    assert cpu["resources"]["CPU"] >= 1 and cpu["resources"]["cpu_group"] >= 1
    assert not cpu["resources"].get("GPU") and "gpu_group" not in cpu["resources"]
    # The names the pipeline requests are documented in the file's comments.
    text = CONFIG.read_text()
    for name in ("gpu_group", "cpu_group"):
        assert re.search(rf"^#.*\b{name}\b", text, re.M), name
    # The GPU group runs a CUDA image; the rest the CPU one.
    assert gpu["docker"]["worker_image"].endswith("-gpu")
    assert config["docker"]["head_image"].endswith("-cpu")


def test_autoscaling_bounds(config):
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert all(t["max_workers"] > t["min_workers"] for t in workers), "every group can scale"
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]


def test_setup_installs_this_project_with_the_lock_file(config):
    mounts = config["file_mounts"]
    remote = next(r for r, local in mounts.items() if local in (".", "./"))
    commands = config["setup_commands"]
    lock = f"-c {remote}/requirements-lock.txt"
    assert any(lock in c and re.search(r"\btorch\b.*\btorchvision\b", c) for c in commands)
    assert any(lock in c and c.rstrip().endswith(f"-e {remote}") for c in commands)
    # torch first, as in the Makefile.
    torch_at = next(i for i, c in enumerate(commands) if "torchvision" in c)
    project_at = next(i for i, c in enumerate(commands) if f"-e {remote}" in c)
    assert torch_at < project_at
    assert {"**/.venv", "**/.git"} <= set(config["rsync_exclude"])


def test_ray_version_on_the_nodes_is_the_pinned_one(config):
    pins = dict(line.split("==") for line in (ROOT / "requirements-lock.txt").read_text().split() if "==" in line)
    images = [config["docker"]["head_image"], config["docker"]["worker_image"],
              config["available_node_types"]["gpu_worker"]["docker"]["worker_image"]]
    for image in images:
        assert image.startswith(f"rayproject/ray:{pins['ray']}-py311-"), image
    assert pins["ray"] == ray.__version__


def test_safe_defaults_for_ports_and_auth(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # No extra inbound rule may open Ray's ports to the outside.
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert rule["FromPort"] == rule["ToPort"] == 22, rule


def test_kuberay_manifest_matches_the_launcher_config(config):
    job = yaml.safe_load((ROOT / "deploy" / "kuberay.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"} and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {}
    for group in spec["workerGroupSpecs"]:
        # KubeRay passes this string to `ray start --resources`: quoted JSON.
        custom = json.loads(json.loads(group["rayStartParams"]["resources"]))
        (container,) = group["template"]["spec"]["containers"]
        groups[group["groupName"]] = (custom, container["resources"]["limits"], group)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0
    launcher = config["available_node_types"]
    gpu_custom, gpu_limits, gpu_group = groups["gpu-group"]
    assert set(gpu_custom) == {"gpu_group"} and gpu_custom["gpu_group"] == launcher["gpu_worker"]["resources"]["gpu_group"]
    assert gpu_limits["nvidia.com/gpu"] == str(launcher["gpu_worker"]["resources"]["GPU"])
    cpu_custom, cpu_limits, _ = groups["cpu-group"]
    assert set(cpu_custom) == {"cpu_group"} and "nvidia.com/gpu" not in cpu_limits
    # The image is built from the pinned Ray image with the project installed from the lock.
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "-c requirements-lock.txt -e ." in dockerfile
    assert "jobs/auto_annotate.py" in job["spec"]["entrypoint"]

"""cluster/: every file parses, validates against the schema its tool publishes, and refers only
to images and paths that this repository builds or holds.

- cluster/aws.yaml: the Ray autoscaler's own schema (ray/autoscaler/ray-schema.json, shipped in
  the installed ray) through jsonschema, then Ray's prepare_config + validate_config, the steps
  `ray up` runs before it touches the cloud.
- cluster/kuberay/*.yaml: tests/kuberay_schema.py, the fields of KubeRay's v1.7.0 CRDs that we
  use, plus the operator's admission rules.
- cluster/Dockerfile + requirements-gpu.txt: a tag-pinned base, COPY sources that exist, exact
  pins that cover the project's runtime dependencies at the versions CI tests.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests import kuberay_schema
from tests.helpers import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def dockerfile_lines() -> list[str]:
    """Instructions of cluster/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def image_name() -> str:
    """The image cluster/Dockerfile builds: glotok:<pyproject version>-cu<CUDA major+minor>, in
    the registry its header names."""
    base = next(line.split()[1] for line in dockerfile_lines() if line.startswith("FROM "))
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    build = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.",
                      (CLUSTER / "Dockerfile").read_text())
    assert cuda and build, "cluster/Dockerfile: FROM nvidia/cuda:X.Y.Z-... and its build command"
    name = build.group(1)
    assert name.endswith(f"/glotok:{version}-cu{cuda.group(1)}{cuda.group(2)}"), name
    return name


def images_in(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in images_in(v)]
    if isinstance(node, list):
        return [i for v in node for i in images_in(v)]
    return []


# --- Ray autoscaler (AWS) ---------------------------------------------------------------------


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_autoscaler_config_validates_against_the_schema_ray_ships():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_yaml(CLUSTER / "aws.yaml")
    jsonschema.validate(cfg, ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does before any cloud call


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(max_worker=8),  # a misspelled top-level key
    lambda c: c["available_node_types"]["p4d_spot"].pop("node_config"),
    lambda c: c["available_node_types"]["head"].update(resources={"CPU": -1}),
])
def test_the_autoscaler_schema_check_rejects_a_broken_config(break_it):
    cfg = load_yaml(CLUSTER / "aws.yaml")
    break_it(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema())


def test_autoscaler_workers_are_spot_gpu_nodes_reaching_s3_through_an_instance_profile():
    cfg = load_yaml(CLUSTER / "aws.yaml")
    types = cfg["available_node_types"]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for name, t in workers.items():
        node = t["node_config"]
        assert re.match(r"p(4d|4de|5|5e|5en)\.", node["InstanceType"]), name
        assert node["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node["IamInstanceProfile"]["Name"], name
    assert types[cfg["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no rank on the head
    assert cfg["docker"]["image"] == image_name()


# --- KubeRay ----------------------------------------------------------------------------------


def test_raycluster_manifest_follows_the_kuberay_crd():
    assert kuberay_schema.check_raycluster(load_yaml(KUBERAY / "raycluster.yaml")) == []


def test_rayjob_manifest_follows_the_kuberay_crd():
    assert kuberay_schema.check_rayjob(load_yaml(KUBERAY / "rayjob.yaml")) == []


@pytest.mark.parametrize("break_it,problem", [
    (lambda s: s["workerGroupSpecs"][0].pop("groupName"), "missing required field 'groupName'"),
    (lambda s: s["headGroupSpec"].update(rayStartParam={}), "unknown field 'rayStartParam'"),
    (lambda s: s["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=4), "minReplicas 5"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update(memory="32 GB"), "quantity"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"].update(containers=[]),
     "at least 1"),
])
def test_the_kuberay_check_rejects_a_broken_cluster(break_it, problem):
    doc = load_yaml(KUBERAY / "raycluster.yaml")
    break_it(doc["spec"])
    assert any(problem in e for e in kuberay_schema.check_raycluster(doc))


def test_rayjob_runs_on_the_raycluster_spec():
    assert (load_yaml(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]
            == load_yaml(KUBERAY / "raycluster.yaml")["spec"])


def test_kuberay_pods_use_our_image_the_irsa_service_account_and_volumes_they_define():
    sa = load_yaml(KUBERAY / "service-account.yaml")
    assert (sa["apiVersion"], sa["kind"]) == ("v1", "ServiceAccount")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
                        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = load_yaml(KUBERAY / name)
        assert doc["metadata"]["namespace"] == sa["metadata"]["namespace"], name
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == Version(_installed("ray")).base_version
        limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"]
                  for g in spec["workerGroupSpecs"]]
        gpus = [lim for lim in limits if "nvidia.com/gpu" in lim]
        assert gpus, f"{name}: no GPU worker group"
        assert set(images_in(doc)) == {image_name()}, name
        for pod in kuberay_schema.pod_specs(spec):
            assert pod["serviceAccountName"] == sa["metadata"]["name"], name
            volumes = {v["name"] for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{name}: mount {m['name']} has no volume"


def test_rayjob_entrypoint_trains_a_config_of_this_repo_with_valid_overrides(tmp_path):
    """The entrypoint is `cd /opt/glotok && glotok train CONFIG k=v ... --ray-address auto`
    (the image's checkout); its config exists here and loads with its overrides (the files it
    names exist only on the cluster, so stand-ins are put in for them)."""
    from glotok.jobs import load_job_config
    from tests.test_config import paper_files

    entry = load_yaml(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]
    cd, rest = entry.split("&&", 1)
    assert shlex.split(cd) == ["cd", "/opt/glotok"] and "WORKDIR /opt/glotok" in dockerfile_lines()
    argv = shlex.split(rest)
    assert argv[:2] == ["glotok", "train"]
    assert argv[-2:] == ["--ray-address", "auto"]
    config, overrides = argv[2], argv[3:-2]
    assert (REPO / config).is_file(), config
    stand_ins = {o.split("=", 1)[0]: o for o in paper_files(tmp_path)}
    overrides = [stand_ins.get(o.split("=", 1)[0], o) for o in overrides]
    load_job_config(REPO / config, overrides + list(stand_ins.values()))


# --- no credentials anywhere ------------------------------------------------------------------


def test_no_cluster_file_holds_a_credential():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|"
                         r"aws_session_token|(password|secret|token)\s*[:=]", re.I)
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 6
    leaks = {str(p.relative_to(REPO)): m.group(0) for p in files
             if (m := pattern.search(p.read_text()))}
    assert not leaks, leaks


# --- the image --------------------------------------------------------------------------------


def test_dockerfile_base_is_pinned_and_it_copies_only_paths_of_this_repo():
    lines = dockerfile_lines()
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(froms) == 1 and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z0-9.-]+", froms[0])
    assert "latest" not in froms[0]
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [s for c in copies for s in c if not s.startswith("--")]
    assert "cluster/requirements-gpu.txt" in sources and "glotok" in sources
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, missing
    # The build context is cut down to what the COPY lines need (BuildKit's per-Dockerfile
    # ignore file); every COPY source must be let through it.
    allowed = {line[1:] for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert set(sources) <= allowed, set(sources) - allowed
    assert image_name()


def _installed(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def requirement_pins() -> dict[str, Requirement]:
    pins = {}
    for line in (CLUSTER / "requirements-gpu.txt").read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {line}"
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = req
    return pins


def test_gpu_requirements_pin_every_runtime_dependency_at_a_version_it_allows():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = [Requirement(r) for r in project["dependencies"] + extras["gpu"] + extras["teacher"]]
    pins = requirement_pins()
    for req in needed:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req} (pyproject.toml) is not in cluster/requirements-gpu.txt"
        pinned = Version(next(iter(pins[name].specifier)).version)
        assert req.specifier.contains(pinned, prereleases=True), f"{name}=={pinned} vs {req}"
        assert req.extras <= pins[name].extras, f"{name}: extras {req.extras}"


def test_gpu_image_runs_the_versions_ci_tests():
    pins = requirement_pins()
    ci = {}
    for line in (REPO / "constraints/cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line.split(" #")[0].strip())
            ci[req.name.lower()] = Version(next(iter(req.specifier)).version)
    shared = set(ci) & set(pins)
    assert {"torch", "deepspeed", "ray"} <= shared
    for name in shared:
        pinned = Version(next(iter(pins[name].specifier)).version)
        assert pinned.public == ci[name].public, f"{name}: image {pinned}, CI {ci[name]}"

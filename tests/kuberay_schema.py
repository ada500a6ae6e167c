"""The part of the KubeRay API that our manifests use, as a small structural validator.

Source: KubeRay v1.7.0, API version ray.io/v1 (ray-project/kuberay,
ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml: the required
fields and types below are theirs, with the core/v1 pod template fields the CRD embeds), and the
operator's admission rules in ray-operator/controllers/ray/utils/validation.go
(``ValidateRayClusterSpec``, ``ValidateRayJobSpec``, ``ValidateRay{Cluster,Job}Metadata``).

Objects are checked the way ``kubectl apply`` checks them with strict field validation (its
default): an unknown field is an error. Only the fields we use are described, so a field we
start using must be added here from the CRD first; :data:`ANY` marks the subtrees passed through
unchecked (object metadata). Each check returns a list of "path: problem" strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                      r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")  # the CRD's pattern
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYCLUSTER_NAME = 53  # utils.MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # utils.MaxRayJobNameLength
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


class _Scalar:
    def __init__(self, name: str, ok):
        self.name, self.ok = name, ok

    def check(self, value: Any, path: str) -> list[str]:
        return [] if self.ok(value) else [f"{path}: expected {self.name}, got {value!r}"]


STR = _Scalar("a string", lambda v: isinstance(v, str))
BOOL = _Scalar("a boolean", lambda v: isinstance(v, bool))
INT32 = _Scalar("an int32", lambda v: isinstance(v, int) and not isinstance(v, bool)
                and -2**31 <= v < 2**31)
NUMBER = _Scalar("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
QTY = _Scalar("a quantity (int or string like 8, 500m, 32Gi)",
              lambda v: (isinstance(v, int) and not isinstance(v, bool))
              or (isinstance(v, str) and bool(QUANTITY.match(v))))
ANY = _Scalar("anything", lambda v: True)


@dataclass
class Obj:
    required: dict = field(default_factory=dict)
    optional: dict = field(default_factory=dict)

    def check(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        errors = [f"{path}: missing required field '{k}'" for k in self.required if k not in value]
        known = {**self.required, **self.optional}
        for k, v in value.items():
            if k not in known:
                errors.append(f"{path}: unknown field '{k}'")
            else:
                errors += known[k].check(v, f"{path}.{k}")
        return errors


@dataclass
class ListOf:
    item: Any
    min_items: int = 0

    def check(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        errors = []
        if len(value) < self.min_items:
            errors.append(f"{path}: needs at least {self.min_items} item(s)")
        for i, v in enumerate(value):
            errors += self.item.check(v, f"{path}[{i}]")
        return errors


@dataclass
class MapOf:
    value: Any

    def check(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in self.value.check(v, f"{path}.{k}")]


# --- core/v1 pod template, as embedded in the CRD --------------------------------------------
RESOURCES = Obj(optional={"requests": MapOf(QTY), "limits": MapOf(QTY)})
CONTAINER = Obj(required={"name": STR}, optional={
    "image": STR, "imagePullPolicy": STR, "command": ListOf(STR), "args": ListOf(STR),
    "env": ListOf(Obj(required={"name": STR}, optional={"value": STR, "valueFrom": ANY})),
    "ports": ListOf(Obj(required={"containerPort": INT32},
                        optional={"name": STR, "protocol": STR})),
    "resources": RESOURCES,
    "volumeMounts": ListOf(Obj(required={"name": STR, "mountPath": STR},
                               optional={"readOnly": BOOL, "subPath": STR})),
})
VOLUME = Obj(required={"name": STR}, optional={
    "emptyDir": Obj(optional={"medium": STR, "sizeLimit": QTY}),
    "configMap": Obj(optional={"name": STR, "optional": BOOL, "defaultMode": INT32,
                               "items": ListOf(Obj(required={"key": STR, "path": STR}))}),
    "persistentVolumeClaim": Obj(required={"claimName": STR}, optional={"readOnly": BOOL}),
})
TOLERATION = Obj(optional={"key": STR, "operator": STR, "value": STR, "effect": STR,
                           "tolerationSeconds": INT32})
POD_SPEC = Obj(required={"containers": ListOf(CONTAINER, min_items=1)}, optional={
    "serviceAccountName": STR, "nodeSelector": MapOf(STR), "tolerations": ListOf(TOLERATION),
    "volumes": ListOf(VOLUME), "terminationGracePeriodSeconds": INT32, "restartPolicy": STR,
})
POD_TEMPLATE = Obj(optional={"metadata": ANY, "spec": POD_SPEC})

# --- ray.io/v1 --------------------------------------------------------------------------------
HEAD_GROUP = Obj(required={"template": POD_TEMPLATE}, optional={
    "rayStartParams": MapOf(STR), "serviceType": STR, "enableIngress": BOOL, "labels": MapOf(STR),
    "resources": MapOf(STR),
})
WORKER_GROUP = Obj(required={"groupName": STR, "maxReplicas": INT32, "minReplicas": INT32,
                             "template": POD_TEMPLATE}, optional={
    "replicas": INT32, "rayStartParams": MapOf(STR), "idleTimeoutSeconds": INT32,
    "numOfHosts": INT32, "suspend": BOOL, "labels": MapOf(STR), "resources": MapOf(STR),
})
RAYCLUSTER_SPEC = Obj(required={"headGroupSpec": HEAD_GROUP}, optional={
    "rayVersion": STR, "enableInTreeAutoscaling": BOOL, "suspend": BOOL,
    "autoscalerOptions": Obj(optional={"idleTimeoutSeconds": INT32, "upscalingMode": STR,
                                       "resources": RESOURCES, "image": STR}),
    "workerGroupSpecs": ListOf(WORKER_GROUP),
})
RAYJOB_SPEC = Obj(optional={
    "entrypoint": STR, "submissionMode": STR, "backoffLimit": INT32,
    "shutdownAfterJobFinishes": BOOL, "ttlSecondsAfterFinished": INT32,
    "activeDeadlineSeconds": INT32, "runtimeEnvYAML": STR, "rayClusterSpec": RAYCLUSTER_SPEC,
    "clusterSelector": MapOf(STR), "suspend": BOOL, "entrypointNumCpus": NUMBER,
    "entrypointNumGpus": NUMBER,
})
METADATA = Obj(required={"name": STR}, optional={"namespace": STR, "labels": MapOf(STR),
                                                 "annotations": MapOf(STR)})


def _document(kind: str, spec) -> Obj:
    return Obj(required={"apiVersion": _Scalar("ray.io/v1", lambda v: v == "ray.io/v1"),
                         "kind": _Scalar(kind, lambda v: v == kind),
                         "metadata": METADATA, "spec": spec})


def _operator_cluster_rules(spec: dict, path: str) -> list[str]:
    """ValidateRayClusterSpec (v1.7.0), the rules that apply to the fields above."""
    errors = []
    groups = [("Head", spec["headGroupSpec"])] + [
        (g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    for name, g in groups:
        params = g.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) \
                and g.get("resources"):
            errors.append(f"{path}: group {name}: resources set both in rayStartParams and "
                          f"resources")
        if "labels" in params:
            errors.append(f"{path}: group {name}: rayStartParams['labels'] is not supported")
    for g in spec.get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            errors.append(f"{path}: worker group {g['groupName']}: negative replicas")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{path}: worker group {g['groupName']}: minReplicas {lo} > "
                          f"maxReplicas {hi}")
    return errors


def _name_rules(doc: dict, max_len: int) -> list[str]:
    name = doc["metadata"]["name"]
    errors = [] if DNS1035.match(name) else [f"metadata.name: '{name}' is not a DNS-1035 label"]
    if len(name) > max_len:
        errors.append(f"metadata.name: longer than {max_len} characters")
    return errors


def check_raycluster(doc: Any) -> list[str]:
    errors = _document("RayCluster", RAYCLUSTER_SPEC).check(doc, "RayCluster")
    if errors:
        return errors
    return _name_rules(doc, MAX_RAYCLUSTER_NAME) + _operator_cluster_rules(doc["spec"], "spec")


def check_rayjob(doc: Any) -> list[str]:
    errors = _document("RayJob", RAYJOB_SPEC).check(doc, "RayJob")
    if errors:
        return errors
    s, errors = doc["spec"], _name_rules(doc, MAX_RAYJOB_NAME)
    mode = s.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: '{mode}' is not one of {SUBMISSION_MODES}")
    shutdown = s.get("shutdownAfterJobFinishes", False)
    if s.get("suspend") and not shutdown:
        errors.append("spec: suspend needs shutdownAfterJobFinishes")
    if s.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("spec.ttlSecondsAfterFinished: must be >= 0")
    if not shutdown and s.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("spec: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if "rayClusterSpec" not in s and not s.get("clusterSelector"):
        errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
    if s.get("backoffLimit", 0) < 0:
        errors.append("spec.backoffLimit: must be >= 0")
    if mode == "InteractiveMode" and s.get("backoffLimit", 0) > 0:
        errors.append("spec.backoffLimit: incompatible with InteractiveMode")
    if s.get("activeDeadlineSeconds") is not None and s["activeDeadlineSeconds"] <= 0:
        errors.append("spec.activeDeadlineSeconds: must be > 0")
    try:
        env = yaml.safe_load(s.get("runtimeEnvYAML", "") or "{}")
        if not isinstance(env, dict):
            errors.append("spec.runtimeEnvYAML: must be a YAML mapping")
    except yaml.YAMLError as e:
        errors.append(f"spec.runtimeEnvYAML: not YAML ({e})")
    if "rayClusterSpec" in s:
        errors += _operator_cluster_rules(s["rayClusterSpec"], "spec.rayClusterSpec")
    return errors


def pod_specs(cluster_spec: dict) -> list[dict]:
    """The pod specs of the head and every worker group."""
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec.get("workerGroupSpecs", [])]

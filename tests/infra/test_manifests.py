"""infra/'s Kubernetes manifests: valid against the Kubernetes schemas that kubernetes-validate ships,
and wired as the service needs (credentials from Secrets, GPUs, shared memory, the shared work volume)."""

from __future__ import annotations

import copy
import tomllib

import kubernetes_validate
import pytest
import yaml

from rayquant.jobs.cli import build_parser
from tests.infra.manifests import (DOCKERFILE, INFRA, KUBERAY_KINDS, ROOT, Manifest, all_pod_templates, manifests,
                                   pod_templates, ray_cluster_spec, rayquant_commands)

# the oldest Kubernetes the manifests claim (README), and the newest the validator ships
KUBERNETES_VERSIONS = ("1.31", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
CREDENTIALS = ("RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "HF_TOKEN")
RAY_AUTH_TOKEN_KEY = "auth_token"  # the Secret key KubeRay's authOptions.secretName reads
MANIFESTS = manifests()
CORE = [m for m in MANIFESTS if m.doc["kind"] not in KUBERAY_KINDS]
KUBERAY = [m for m in MANIFESTS if m.doc["kind"] in KUBERAY_KINDS]
PODS = all_pod_templates()


def _ids(manifests: list[Manifest]) -> list[str]:
    return [m.name for m in manifests]


def _as_pod_template(template: dict, name: str) -> dict:
    """A PodTemplateSpec as the core/v1 PodTemplate object, the kind kubernetes-validate looks up."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_manifest_parses_and_infra_has_each_kind():
    for path in INFRA.glob("*.yaml"):
        with path.open(encoding="utf-8") as f:
            assert all(isinstance(d, dict) for d in yaml.safe_load_all(f) if d is not None), path
    assert sorted(m.doc["kind"] for m in MANIFESTS) == ["CronJob", "PersistentVolumeClaim", "RayCluster", "RayJob"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", CORE, ids=_ids(CORE))
def test_kubernetes_objects_validate_strictly(manifest: Manifest, version: str):
    assert kubernetes_validate.validate(manifest.doc, version, strict=True) == version  # that version's schema


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_pod_templates_validate_strictly_as_core_pod_templates(manifest: Manifest, version: str):
    """UNVALIDATED here: the KubeRay-only fields of RayCluster and RayJob (apiVersion ray.io/v1, spec's
    rayVersion, authOptions, enableInTreeAutoscaling, autoscalerOptions, headGroupSpec.rayStartParams,
    workerGroupSpecs[].groupName/replicas/minReplicas/maxReplicas/rayStartParams, and RayJob's
    entrypoint, backoffLimit, shutdownAfterJobFinishes, ttlSecondsAfterFinished): no PyPI package ships
    KubeRay's CRD schemas (kubernetes-validate has the built-in kinds only; codeflare-sdk and the other
    KubeRay clients on PyPI carry no CRD). Every pod template inside them is validated here, strictly,
    as a core/v1 PodTemplateSpec; the checks below cover the fields rayquant depends on."""
    templates = pod_templates(manifest)
    assert [t.role for t in templates] == ["head", "worker"]
    for t in templates:
        kubernetes_validate.validate(_as_pod_template(t.template, "rayquant"), version, strict=True)


def test_strict_validation_rejects_a_misspelled_container_field():
    template = copy.deepcopy(PODS[0].template)
    container = template["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(_as_pod_template(template, "typo"), KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("pod", PODS, ids=[p.where for p in PODS])
def test_every_container_reads_credentials_from_secrets_and_turns_ray_token_auth_on(pod):
    for container in pod.template["spec"]["containers"]:
        env = _env(container)
        assert env["RAY_AUTH_MODE"].get("value") == "token", container["name"]
        for name in CREDENTIALS:
            assert set(env[name]) == {"name", "valueFrom"}, f"{pod.where}: {name} must come from a Secret"
            assert env[name]["valueFrom"]["secretKeyRef"]["name"].startswith("rayquant-")
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == RAY_AUTH_TOKEN_KEY


@pytest.mark.parametrize("manifest", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_token_secret_is_the_one_the_containers_read(manifest: Manifest):
    """KubeRay injects the token into the containers it adds (autoscaler, RayJob submitter) from
    authOptions.secretName; ours must read the same Secret or the cluster splits in two."""
    auth = ray_cluster_spec(manifest.doc)["authOptions"]
    assert auth["mode"] == "token"
    for pod in pod_templates(manifest):
        for container in pod.template["spec"]["containers"]:
            assert _env(container)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == auth["secretName"]


@pytest.mark.parametrize("manifest", KUBERAY, ids=_ids(KUBERAY))
def test_ray_pods_request_cpu_memory_mount_shared_memory_and_workers_limit_gpus(manifest: Manifest):
    for pod in pod_templates(manifest):
        spec = pod.template["spec"]
        memory_volumes = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in spec["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), pod.where
            shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert [m["name"] for m in shm] == [m["name"] for m in shm if m["name"] in memory_volumes] != [], pod.where
            gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
            assert (gpus >= 1) == (pod.role == "worker"), f"{pod.where}: GPUs belong on the workers only"


def test_rayjob_asks_for_exactly_the_gpus_of_its_fixed_size_worker_group():
    (rayjob,) = [m.doc for m in KUBERAY if m.doc["kind"] == "RayJob"]
    (quantize,) = [c for c in rayquant_commands() if c.argv[0] == "quantize"]
    sets = dict(s.split("=", 1) for s in build_parser().parse_args(quantize.argv).set)
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = 0
    for group in groups:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], group["groupName"]
        (container,) = group["template"]["spec"]["containers"]
        gpus += group["replicas"] * int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(sets["cluster.num_workers"]) * int(sets["cluster.gpus_per_worker"]) == gpus


def test_every_ray_pod_mounts_the_read_write_many_work_volume_that_holds_output_work_dir():
    (claim,) = [m.doc for m in CORE if m.doc["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (quantize,) = [c for c in rayquant_commands() if c.argv[0] == "quantize"]
    work_dir = dict(s.split("=", 1) for s in build_parser().parse_args(quantize.argv).set)["output.work_dir"]
    for pod in [p for p in PODS if p.role != "job"]:
        claimed = {v["name"] for v in pod.template["spec"]["volumes"]
                   if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        for container in pod.template["spec"]["containers"]:
            mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claimed]
            assert [p for p in mounts if work_dir.startswith(p.rstrip("/") + "/")], f"{pod.where}: {work_dir}"


def test_every_container_runs_the_image_the_dockerfile_builds_with_its_ray_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    image = f"rayquant:{version}"
    assert f"-t {image} " in DOCKERFILE.read_text(encoding="utf-8")
    assert {c["image"] for p in PODS for c in p.template["spec"]["containers"]} == {image}
    base = next(line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("FROM "))
    for manifest in KUBERAY:
        assert f"rayproject/ray:{ray_cluster_spec(manifest.doc)['rayVersion']}-" in base, manifest.name


def test_readme_names_every_secret_configmap_and_claim_the_manifests_use():
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    names = {ray_cluster_spec(m.doc)["authOptions"]["secretName"] for m in KUBERAY}
    for pod in PODS:
        names |= {e["valueFrom"]["secretKeyRef"]["name"] for c in pod.template["spec"]["containers"]
                  for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        for volume in pod.template["spec"].get("volumes", []):
            names |= {volume[k].get("name") or volume[k].get("claimName") for k in ("configMap", "persistentVolumeClaim")
                      if k in volume}
    assert names == {"rayquant-ray-auth", "rayquant-s3", "rayquant-hub", "rayquant-job-spec", "rayquant-schedule",
                     "rayquant-work"}
    assert [n for n in sorted(names) if f"`{n}`" not in readme] == []

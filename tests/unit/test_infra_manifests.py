"""The deployment files, checked offline: KubeRay manifests, Dockerfiles, ``ray_cluster.yaml``.

* KubeRay (``infra/kuberay/*.yaml``): every document parses; each kind has the fields the
  KubeRay 1.6 CRDs (``ray.io/v1``) need, with the right types (a small explicit table of
  required paths — no offline CRD validator fits, and these paths are what a broken manifest
  gets wrong); worker-group sizes are ordered; images, Ray versions and volumes agree;
  credentials come only from the Secret; the nightly schedule exists in both forms (RayCronJob
  and CronJob + RayJob) and they run the same job.
* Entrypoints: every ``python -m jobs.<name> ...`` is parsed by that job's own parser and its
  whole config validated by the job's own pydantic model, and ``python -m jobs.<name>
  --help`` runs — so a renamed flag, a bad ``--set`` key or a module that does nothing when
  run with ``-m`` fails here, not on the cluster.
* ``ray_cluster.yaml``: Ray's own cluster-launcher checks (``prepare_config`` fills the
  provider defaults, ``validate_config`` checks it against Ray's JSON schema), plus the
  shape this project needs (CPU head, CPU and GPU workers with min/max, setup, images).
* Dockerfiles: base images, torch index, ``pip install`` of the package, a non-root user.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "infra" / "kuberay"
DOCKER = REPO / "infra" / "docker"
CLUSTER_YAML = REPO / "ray_cluster.yaml"
SECRET_NAME = "ciea-object-store"
PIPELINE_JOBS = {"jobs.ingest", "jobs.train", "jobs.embed", "jobs.reindex"}

# ---------------------------------------------------------------------------------------
# What KubeRay 1.6 needs of each kind (ray-operator/config/crd/bases/ray.io_*.yaml and
# batch/v1 CronJob): dotted path → type. `[]` steps into every item of a list.
# ---------------------------------------------------------------------------------------
CLUSTER_SPEC: dict[str, type | tuple[type, ...]] = {
    "rayVersion": str,
    "headGroupSpec.rayStartParams": dict,
    "headGroupSpec.template.spec.containers": list,
    "headGroupSpec.template.spec.containers[].name": str,
    "headGroupSpec.template.spec.containers[].image": str,
    "headGroupSpec.template.spec.containers[].resources.limits": dict,
    "workerGroupSpecs": list,
    "workerGroupSpecs[].groupName": str,
    "workerGroupSpecs[].replicas": int,
    "workerGroupSpecs[].minReplicas": int,
    "workerGroupSpecs[].maxReplicas": int,
    "workerGroupSpecs[].rayStartParams": dict,
    "workerGroupSpecs[].template.spec.containers": list,
    "workerGroupSpecs[].template.spec.containers[].name": str,
    "workerGroupSpecs[].template.spec.containers[].image": str,
    "workerGroupSpecs[].template.spec.containers[].resources.limits": dict,
}
RAYJOB_SPEC: dict[str, type | tuple[type, ...]] = {
    "entrypoint": str,
    "runtimeEnvYAML": str,
    "submissionMode": str,
    "shutdownAfterJobFinishes": bool,
    "ttlSecondsAfterFinished": int,
    "activeDeadlineSeconds": int,
    "backoffLimit": int,
    "rayClusterSpec": dict,
    **{f"rayClusterSpec.{k}": v for k, v in CLUSTER_SPEC.items()},
}
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "RayCluster": {"metadata.name": str, **{f"spec.{k}": v for k, v in CLUSTER_SPEC.items()}},
    "RayJob": {"metadata": dict, **{f"spec.{k}": v for k, v in RAYJOB_SPEC.items()}},
    "RayCronJob": {"metadata.name": str, "spec.schedule": str, "spec.jobTemplate": dict,
                   **{f"spec.jobTemplate.{k}": v for k, v in RAYJOB_SPEC.items()}},
    "CronJob": {"metadata.name": str, "spec.schedule": str, "spec.concurrencyPolicy": str,
                "spec.jobTemplate.spec.template.spec.containers": list,
                "spec.jobTemplate.spec.template.spec.containers[].image": str,
                "spec.jobTemplate.spec.template.spec.restartPolicy": str,
                "spec.jobTemplate.spec.template.spec.serviceAccountName": str},
    "ServiceAccount": {"metadata.name": str},
    "Role": {"metadata.name": str, "rules": list, "rules[].apiGroups": list, "rules[].resources": list,
             "rules[].verbs": list},
    "RoleBinding": {"metadata.name": str, "subjects": list, "subjects[].name": str, "roleRef.name": str},
    "ConfigMap": {"metadata.name": str, "data": dict},
    "PersistentVolumeClaim": {"metadata.name": str, "spec.accessModes": list,
                              "spec.resources.requests.storage": str},
}
API_VERSIONS = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1",
                "CronJob": "batch/v1", "ServiceAccount": "v1", "ConfigMap": "v1", "PersistentVolumeClaim": "v1",
                "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _values(node: Any, path: list[str]) -> list[tuple[str, Any]]:
    """All (where, value) pairs at ``path``; a missing step yields (where, KeyError)."""
    if not path:
        return [("", node)]
    step, rest = path[0], path[1:]
    key, many = (step[:-2], True) if step.endswith("[]") else (step, False)
    if not isinstance(node, dict) or key not in node:
        return [(key, KeyError(key))]
    child = node[key]
    if not many:
        return [(f"{key}.{w}".rstrip("."), v) for w, v in _values(child, rest)]
    if not isinstance(child, list) or not child:
        return [(key, KeyError(f"{key}: expected a non-empty list"))]
    return [(f"{key}[{i}].{w}".rstrip("."), v) for i, item in enumerate(child) for w, v in _values(item, rest)]


def problems(doc: dict) -> list[str]:
    """What a manifest lacks for its kind: missing paths and wrongly typed values."""
    kind = doc.get("kind")
    if kind not in REQUIRED:
        return [f"unknown kind {kind!r}: add its required fields to REQUIRED"]
    out = []
    if doc.get("apiVersion") != API_VERSIONS[kind]:
        out.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {API_VERSIONS[kind]!r}")
    for path, typ in REQUIRED[kind].items():
        for where, value in _values(doc, path.split(".")):
            if isinstance(value, KeyError):
                out.append(f"{path}: missing ({value.args[0]})")
            elif not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                out.append(f"{where}: {type(value).__name__} {value!r}, expected {getattr(typ, '__name__', typ)}")
    return out


def _load_manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(KUBERAY.glob("*.yaml"))}


MANIFESTS = _load_manifests()
DOCS = [(name, d) for name, docs in MANIFESTS.items() for d in docs]


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(n, d) for n, d in DOCS if d.get("kind") == kind]


def _configmap_rayjobs() -> list[tuple[str, dict]]:
    """RayJobs kept in ConfigMaps (the CronJob alternative creates them with kubectl)."""
    out = []
    for name, cm in _of_kind("ConfigMap"):
        for key, text in cm["data"].items():
            doc = yaml.safe_load(text)
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                out.append((f"{name}:{cm['metadata']['name']}/{key}", doc))
    return out


def _rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec that can run: RayJob manifests, RayCronJob templates, ConfigMap RayJobs."""
    specs = [(n, d["spec"]) for n, d in _of_kind("RayJob")]
    specs += [(n, d["spec"]["jobTemplate"]) for n, d in _of_kind("RayCronJob")]
    specs += [(n, d["spec"]) for n, d in _configmap_rayjobs()]
    return specs


def _cluster_specs() -> list[tuple[str, dict]]:
    return [(n, d["spec"]) for n, d in _of_kind("RayCluster")] + [(n, s["rayClusterSpec"]) for n, s in _rayjob_specs()]


def _pod_specs(cluster: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    return pods + [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]


def _containers() -> list[tuple[str, dict]]:
    out = [(f"{n}/{group}", c) for n, cl in _cluster_specs() for group, pod in _pod_specs(cl) for c in pod["containers"]]
    out += [(n, c) for n, d in _of_kind("CronJob") for c in d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]]
    return out


# ---------------------------------------------------------------------------------------
# KubeRay manifests: structure
# ---------------------------------------------------------------------------------------


def test_the_manifests_cover_the_cluster_the_pipeline_jobs_and_the_nightly_reindex():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "PersistentVolumeClaim"} <= kinds, kinds
    modules = {_entrypoint(s["entrypoint"])[0] for _, s in _rayjob_specs()}
    assert PIPELINE_JOBS <= modules, f"no RayJob runs {PIPELINE_JOBS - modules}"
    # The nightly re-index exists in both forms: a RayCronJob, and a CronJob that creates the
    # RayJob kept in a ConfigMap.
    assert any("jobs.reindex" in d["spec"]["jobTemplate"]["entrypoint"] for _, d in _of_kind("RayCronJob"))
    assert _of_kind("CronJob") and any("jobs.reindex" in d["spec"]["entrypoint"] for _, d in _configmap_rayjobs())


@pytest.mark.parametrize("name, doc", DOCS, ids=[f"{n}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for n, d in DOCS])
def test_every_manifest_has_the_fields_its_kind_needs(name, doc):
    assert problems(doc) == [], f"{name}"


def test_configmap_rayjobs_have_the_fields_a_rayjob_needs():
    found = _configmap_rayjobs()
    assert found, "the CronJob alternative keeps its RayJob in a ConfigMap"
    for name, doc in found:
        assert problems(doc) == [], name
        # Created anew every night with `kubectl create`: a fixed name would collide.
        assert "generateName" in doc["metadata"] and "name" not in doc["metadata"], name


def test_the_required_field_check_reports_what_is_missing_or_mistyped():
    """The table above is what the manifests are held to: make sure it bites."""
    _, rayjob = _of_kind("RayJob")[0]
    broken = copy.deepcopy(rayjob)
    del broken["spec"]["entrypoint"]
    broken["spec"]["ttlSecondsAfterFinished"] = "600"
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]
    found = problems(broken)
    assert any(p.startswith("spec.entrypoint: missing") for p in found), found
    assert any("ttlSecondsAfterFinished: str '600', expected int" in p for p in found), found
    assert any("workerGroupSpecs[].maxReplicas: missing" in p for p in found), found
    assert problems({**rayjob, "apiVersion": "ray.io/v1alpha1"})[0].startswith("apiVersion")


def test_rayjobs_submit_end_and_clean_up():
    for name, spec in _rayjob_specs():
        assert spec["submissionMode"] in SUBMISSION_MODES, name
        assert spec["shutdownAfterJobFinishes"] is True, f"{name}: the cluster must go away after the job"
        assert spec["ttlSecondsAfterFinished"] >= 0 and spec["activeDeadlineSeconds"] > 0, name
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert isinstance(env, dict), f"{name}: runtimeEnvYAML must be a YAML mapping"
        # Ray refuses a runtime_env whose env_vars are not all strings.
        assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), name


def test_ray_clusters_have_a_cpu_head_and_ordered_worker_groups():
    for name, cluster in _cluster_specs():
        head = cluster["headGroupSpec"]["rayStartParams"]
        assert head.get("num-cpus") == "0", f"{name}: the head must not run tasks (num-cpus: \"0\")"
        assert cluster.get("authOptions", {}).get("mode") == "token", f"{name}: token auth off"
        params = [head] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]
        # KubeRay's rayStartParams is map[string]string: an unquoted number is rejected.
        assert all(isinstance(v, str) for p in params for v in p.values()), name
        for g in cluster["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{name}/{g['groupName']}"


def test_gpu_groups_ask_for_gpus_and_run_the_cuda_image_and_no_other_group_does():
    groups = {"gpu": 0, "cpu": 0}
    for name, cluster in _cluster_specs():
        for group, pod in _pod_specs(cluster):
            for c in pod["containers"]:
                gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                where = f"{name}/{group}/{c['name']}"
                if gpus:
                    groups["gpu"] += 1
                    assert c["image"].endswith("-cuda"), where
                    assert c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"]["limits"]["nvidia.com/gpu"], where
                    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), where
                else:
                    groups["cpu"] += 1
                    assert c["image"].endswith("-cpu"), where
    assert groups["gpu"] and groups["cpu"], groups


def test_images_and_ray_versions_agree_with_the_installed_ray_and_the_dockerfiles():
    import ray

    versions = {cluster["rayVersion"] for _, cluster in _cluster_specs()}
    assert versions == {ray.__version__}, versions
    ours = {c["image"] for _, c in _containers() if "ciea" in c["image"]}
    assert {i.rsplit(":", 1)[1].rsplit("-", 1)[0] for i in ours} == {_project_version()}, ours
    for df in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert _dockerfile(df).args["RAY_VERSION"] == ray.__version__, df


def test_volumes_mounted_exist_and_claims_are_declared():
    claims = {d["metadata"]["name"] for _, d in _of_kind("PersistentVolumeClaim")}
    for name, cluster in _cluster_specs():
        for group, pod in _pod_specs(cluster):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{name}/{group}: volumeMount {m['name']} has no volume"
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}/{group}"


def test_credentials_come_only_from_the_secret():
    from pipelines.store.secrets import looks_secret
    from pipelines.store.storage import CREDENTIAL_ENV, check_storage_option

    credential_names = {n for env in CREDENTIAL_ENV.values() for pair in env.items() for n in pair}
    secretish = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)", re.I)
    for where, c in _containers():
        for e in c.get("env", []):
            if secretish.search(e["name"]):
                assert "value" not in e, f"{where}: {e['name']} has a literal value; use a secretKeyRef"
        for ref in c.get("envFrom", []):
            assert ref.get("secretRef", {}).get("name", SECRET_NAME) == SECRET_NAME, where
    for name, spec in _rayjob_specs():
        text = spec["entrypoint"] + "\n" + spec["runtimeEnvYAML"]
        for key in credential_names:
            assert not re.search(rf"\b{key}\b", text, re.I), f"{name}: {key} in the entrypoint or runtime env"
        options = re.findall(r"storage[-_]options?[. ]([A-Za-z0-9_]+)=(\S+)", spec["entrypoint"])
        assert options, f"{name}: no storage option (the bucket's region) in the entrypoint"
        for key, value in options:
            check_storage_option(key, value, "s3://bucket")  # raises on anything but a non-secret S3 setting
        env_vars = (yaml.safe_load(spec["runtimeEnvYAML"]) or {}).get("env_vars", {})
        assert not [k for k in env_vars if looks_secret(k)], f"{name}: a secret-looking runtime env variable"
    # Every Ray container that touches the object store gets the Secret.
    for name, cluster in _cluster_specs():
        for group, pod in _pod_specs(cluster):
            for c in pod["containers"]:
                assert {"secretRef": {"name": SECRET_NAME}} in c.get("envFrom", []), f"{name}/{group}"


def test_pods_run_as_a_non_root_user():
    for name, cluster in _cluster_specs():
        for group, pod in _pod_specs(cluster):
            sc = pod.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{name}/{group}"
    for name, cron in _of_kind("CronJob"):
        sc = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"].get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, name


# ---------------------------------------------------------------------------------------
# The nightly re-index: RayCronJob and the CronJob + RayJob alternative
# ---------------------------------------------------------------------------------------

CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _cron_ok(expr: str) -> bool:
    fields = expr.split()
    if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
        return False
    return all(lo <= int(n) <= hi for f, (lo, hi) in zip(fields, CRON_RANGES) for n in re.findall(r"(?<!/)\b\d+", f))


def test_cron_check_rejects_bad_schedules():
    assert _cron_ok("0 2 * * *") and _cron_ok("*/15 1-5 * * 1,3")
    assert not _cron_ok("0 2 * *") and not _cron_ok("61 2 * * *") and not _cron_ok("CRON_TZ=UTC 0 2 * * *")


def test_both_schedules_are_valid_nightly_and_run_the_same_job():
    (_, raycron), = _of_kind("RayCronJob")
    (_, cron), = _of_kind("CronJob")
    assert _cron_ok(raycron["spec"]["schedule"]) and raycron["spec"]["schedule"] == cron["spec"]["schedule"]
    (_, rayjob), = _configmap_rayjobs()
    assert rayjob["spec"] == raycron["spec"]["jobTemplate"], "the two forms of the nightly job drifted apart"


def test_cronjob_waits_for_its_rayjob_and_never_overlaps():
    (_, cron), = _of_kind("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a retry could start a second RayJob beside a running one"
    (_, raycron), = _of_kind("RayCronJob")
    assert job["activeDeadlineSeconds"] > raycron["spec"]["jobTemplate"]["activeDeadlineSeconds"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (container,) = pod["containers"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (vol_name, mount_path), = mounts.items()
    cm_name = volumes[vol_name]["configMap"]["name"]
    (cm,) = [d for _, d in _of_kind("ConfigMap") if d["metadata"]["name"] == cm_name]
    (key,) = cm["data"]
    assert f"kubectl create -f {mount_path}/{key}" in script
    assert "jobDeploymentStatus" in script and "SUCCEEDED" in script, "the pod must wait for the RayJob's result"


def test_cronjob_service_account_may_create_rayjobs_and_nothing_more():
    (_, cron), = _of_kind("CronJob")
    sa = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert sa in {d["metadata"]["name"] for _, d in _of_kind("ServiceAccount")}
    (_, binding), = _of_kind("RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa} in binding["subjects"]
    assert binding["roleRef"]["kind"] == "Role"  # namespaced, not a ClusterRole
    (_, role), = [(n, d) for n, d in _of_kind("Role") if d["metadata"]["name"] == binding["roleRef"]["name"]]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert "create" in rule["verbs"] and "get" in rule["verbs"] and not {"*", "escalate", "bind"} & set(rule["verbs"])


# ---------------------------------------------------------------------------------------
# Entrypoints: parsed and validated by each job's own parser and config model
# ---------------------------------------------------------------------------------------

# module → name of its pydantic config model (train parses through jobs.train.parse_config).
CONFIG_MODELS = {"jobs.ingest": "IngestConfig", "jobs.embed": "EmbedConfig", "jobs.reindex": "ReindexConfig"}


def _entrypoint(command: str) -> tuple[str, list[str]]:
    """``python -m jobs.x ARGS`` or ``ciea x ARGS`` → ("jobs.x", ARGS)."""
    argv = shlex.split(command)
    from jobs.cli import COMMANDS

    if argv[:2] == ["python", "-m"] and len(argv) > 2:
        module = argv[2]
        assert module in {m for m, _ in COMMANDS.values()}, f"{module} is not a ciea job (jobs/cli.py)"
        return module, argv[3:]
    if argv and argv[0] == "ciea" and len(argv) > 1:
        assert argv[1] in COMMANDS, f"ciea {argv[1]}: no such command"
        return COMMANDS[argv[1]][0], argv[2:]
    raise AssertionError(f"entrypoint {command!r}: expected `python -m jobs.<name> ...` or `ciea <command> ...`")


def resolved_config(module_name: str, argv: list[str]) -> Any:
    """The job's config exactly as its ``main`` builds it before touching Ray or storage.

    Raises:
        SystemExit: the job's own message (unknown flag, invalid config).
    """
    from jobs.common import load_config

    module = importlib.import_module(module_name)
    if hasattr(module, "parse_config"):
        return module.parse_config(argv)[0]
    args = module._parser().parse_args(argv)
    overrides = module._overrides(args)
    base = getattr(module, "PRESETS", {}).get(getattr(args, "preset", None) or "default", {})
    return load_config(getattr(module, CONFIG_MODELS[module_name]), args.config, overrides, base)


def _all_entrypoints() -> list[tuple[str, str]]:
    return [(n, s["entrypoint"]) for n, s in _rayjob_specs()]


@pytest.mark.parametrize("where, command", _all_entrypoints(), ids=[n for n, _ in _all_entrypoints()])
def test_entrypoint_is_accepted_by_the_jobs_own_parser_and_config(where, command, capsys):
    module, argv = _entrypoint(command)
    try:
        cfg = resolved_config(module, argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` is refused by {module}: {e} {capsys.readouterr().err[-800:]}")
    assert cfg is not None


def test_entrypoint_check_refuses_a_wrong_flag_and_a_wrong_config_key(capsys):
    (_, spec), = [(n, s) for n, s in _rayjob_specs() if "jobs.embed" in s["entrypoint"]][:1]
    module, argv = _entrypoint(spec["entrypoint"])
    with pytest.raises(SystemExit):
        resolved_config(module, [a.replace("--checkpoint", "--checkpont") for a in argv])
    with pytest.raises(SystemExit, match="encode.batch_sise"):
        resolved_config(module, [*argv, "--set", "encode.batch_sise=4"])
    with pytest.raises(AssertionError, match="not a ciea job"):
        _entrypoint("python -m jobs.embedd --root x")


def test_pipeline_paths_line_up_from_ingest_to_reindex():
    """ingest writes the root that train, embed and reindex read; embed loads the model that
    train writes (<run.output_dir>/model) from the shared volume."""
    cfgs = {}
    for _, spec in _rayjob_specs():
        module, argv = _entrypoint(spec["entrypoint"])
        cfgs[module] = resolved_config(module, argv)
    roots = {cfgs["jobs.ingest"].output.root, cfgs["jobs.train"].data.root, cfgs["jobs.embed"].input.root,
             cfgs["jobs.reindex"].input.root}
    assert len(roots) == 1, roots
    assert cfgs["jobs.embed"].model.checkpoint == f"{cfgs['jobs.train'].run.output_dir}/model"
    for module, cfg in cfgs.items():
        assert cfg.storage_options.get("AWS_REGION"), f"{module}: the bucket's region is not set"


# ---------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------


class Dockerfile:
    """Instructions of a Dockerfile with continuation lines joined and ARG defaults known."""

    def __init__(self, path: Path) -> None:
        text = re.sub(r"\\\n", " ", path.read_text())
        self.instructions = [(m.group(1).upper(), m.group(2).strip()) for line in text.splitlines()
                             if (m := re.match(r"^\s*([A-Za-z]+)\s+(.*)$", line)) and not line.lstrip().startswith("#")]
        self.args = {}
        for op, rest in self.instructions:
            if op == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                self.args.setdefault(key, value)

    def expand(self, s: str) -> str:
        for _ in range(3):
            s = re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), s)
        return s

    def all(self, op: str) -> list[str]:
        return [self.expand(rest) for o, rest in self.instructions if o == op]


def _dockerfile(name: str) -> Dockerfile:
    return Dockerfile(DOCKER / name)


def _project_version() -> str:
    """pyproject.toml's version (the image tags carry it); tomllib is 3.11+, the project 3.10+."""
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


@pytest.mark.parametrize("name, base, torch_index", [
    ("Dockerfile.cpu", r"rayproject/ray:{ray}-py3\d+-cpu", r"https://download\.pytorch\.org/whl/cpu"),
    ("Dockerfile.cuda", r"rayproject/ray:{ray}-py3\d+-cu\d+", r"https://download\.pytorch\.org/whl/cu\d+"),
])
def test_dockerfile_installs_torch_then_the_package_as_a_non_root_user(name, base, torch_index):
    import ray
    import torch

    df = _dockerfile(name)
    (frm,) = df.all("FROM")
    assert re.fullmatch(base.format(ray=re.escape(ray.__version__)), frm), frm
    runs = df.all("RUN")
    torch_runs = [r for r in runs if re.search(rf"--index-url \"?{torch_index}\"? \"?torch==", r)]
    assert torch_runs, f"{name}: no `pip install torch` from {torch_index}"
    assert torch.__version__.split("+")[0] in torch_runs[0]
    pkg = [i for i, r in enumerate(runs) if re.search(r"pip install -c constraints\.txt \"?\.(\[[\w,]+\])?\"?(\s|$)", r)]
    assert pkg and runs.index(torch_runs[0]) < pkg[0], f"{name}: torch first, then `pip install -c constraints.txt .`"
    for copy_ in df.all("COPY"):
        for src in [a for a in copy_.split() if not a.startswith("--")][:-1]:
            assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
    users = df.all("USER")
    assert users and users[-1] not in {"root", "0"}, f"{name}: the image must end as a non-root user"
    # The build context (repo root) is filtered by <Dockerfile>.dockerignore: what COPY needs is let in.
    ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
    for src in ("pyproject.toml", "constraints.txt", "README.md", "ciea_model/", "pipelines/", "jobs/"):
        assert f"!{src}" in ignore, f"{name}.dockerignore keeps {src} out of the build context"


# ---------------------------------------------------------------------------------------
# ray_cluster.yaml through Ray's own cluster-launcher validation
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    prepared = prepare_config(copy.deepcopy(raw))  # provider defaults, docker config, per-type max workers
    validate_config(prepared)  # Ray's JSON schema + cross-field checks (head type, min/max workers)
    return prepared


def test_cluster_config_passes_rays_validation_and_rays_check_bites(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert cluster_config["cluster_name"] == "ciea"
    broken = yaml.safe_load(CLUSTER_YAML.read_text())
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # Ray wants integers
    with pytest.raises(Exception, match="0.5"):
        validate_config(prepare_config(broken))
    broken = yaml.safe_load(CLUSTER_YAML.read_text())
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_cluster_has_a_cpu_head_cpu_workers_and_gpu_workers_with_bounds(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {k: v for k, v in types.items() if k != cluster_config["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    cpu = [v for v in workers.values() if not v["resources"].get("GPU") and v["resources"].get("CPU", 0) > 0]
    assert gpu and cpu, workers
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster_config["max_workers"]


def test_cluster_nodes_run_the_project_images_and_start_ray_as_the_launcher_expects(cluster_config):
    import ray

    docker = cluster_config["docker"]
    images = {c["image"] for _, c in _containers() if "ciea" in c["image"]}
    assert docker["image"].endswith("-cpu") and docker["image"] in images
    gpu = [v for v in cluster_config["available_node_types"].values() if v["resources"].get("GPU")]
    assert all(v["docker"]["worker_image"].endswith("-cuda") and v["docker"]["worker_image"] in images for v in gpu)
    assert cluster_config["setup_commands"], "setup commands"
    assert any(f"'{ray.__version__}'" in c for c in cluster_config["setup_commands"]), "setup checks the image's Ray"
    head = " ".join(cluster_config["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--num-cpus=0" in head
    workers = " ".join(cluster_config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    # Token auth on both sides, and the token shipped to every node.
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "~/.ray/auth_token" in cluster_config["file_mounts"]


# ---------------------------------------------------------------------------------------
# The runbook's commands
# ---------------------------------------------------------------------------------------


def _runbook_commands() -> list[str]:
    """`ray job submit ... -- python -m jobs.<name> ...` commands in infra/README.md's code blocks."""
    text = (REPO / "infra" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [ln.split("#")[0].strip() for b in blocks for ln in re.sub(r"\\\n\s*", " ", b).splitlines()]
    return [ln.split(" -- ", 1)[1] for ln in lines if " -- python -m jobs." in ln]


def test_runbook_job_commands_are_accepted_by_the_jobs(capsys):
    commands = _runbook_commands()
    assert len(commands) >= 2, commands
    for command in commands:
        module, argv = _entrypoint(command)
        try:
            resolved_config(module, argv)
        except SystemExit as e:
            pytest.fail(f"infra/README.md: `{command}` is refused by {module}: {e} {capsys.readouterr().err[-800:]}")


def test_files_the_runbooks_name_exist():
    text = (REPO / "infra" / "README.md").read_text() + CLUSTER_YAML.read_text()
    text += "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    named = set(re.findall(r"\binfra/[\w./-]+\.(?:yaml|cpu|cuda)\b", text))
    named |= {f"infra/{m}" for m in re.findall(r"`((?:kuberay|docker)/[\w.-]+)`", text)}
    assert named, "no file named"
    for path in sorted(named):
        assert (REPO / path).exists(), f"{path} is named in a runbook but does not exist"

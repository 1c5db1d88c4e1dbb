"""Static checks of the cluster manifests under infra/ (no Docker or Kubernetes needed).

Single source of truth for the image: ``version`` in pyproject.toml, repeated as the Dockerfile's
``org.opencontainers.image.version`` label; every image reference under infra/ must be
``<registry>/<project name>:<that version>``. The image installs the runtime dependencies only, at the
lock's versions (which pyproject's ranges must admit), and runs ``pip check``. The RayJob's entrypoint
must parse with the real ``msa`` argument parser, and the cluster launcher config must pass Ray's own
schema.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
RAYCLUSTER = INFRA / "k8s" / "raycluster.yaml"
RAYJOB = INFRA / "k8s" / "rayjob-train.yaml"
LAUNCHER = INFRA / "ray" / "cluster-gpu.yaml"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]
NAME = PYPROJECT["name"]
LOCK_LINES = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and line[0] != "#"]
# requirements.lock: canonical name -> exact version (what `make` installs and the image is constrained to).
LOCK = {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in LOCK_LINES}
RAY_VERSION = LOCK["ray"]
TEST_ONLY = {canonicalize_name(Requirement(dep).name) for dep in PYPROJECT["optional-dependencies"]["test"]}

# Field names of the KubeRay ray.io/v1 API reference (KubeRay 1.5+; authOptions is new in 1.5.1).
RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
AUTOSCALER_OPTION_FIELDS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "version", "env", "envFrom", "volumeMounts",
}


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str) -> dict:
    found = [doc for doc in _docs(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("RayCluster", _one(RAYCLUSTER, "RayCluster")["spec"]),
        ("RayJob.rayClusterSpec", _one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]),
    ]


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster_spec["workerGroupSpecs"]
    ]


def _dockerfile_labels() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    labels: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("LABEL "):
            labels.update(dict(re.findall(r'([\w.\-]+)="([^"]*)"', line)))
    return labels


def _image_refs() -> list[tuple[str, str]]:
    refs = []
    for label, spec in _cluster_specs():
        for pod in _pod_specs(spec):
            refs += [(f"{label}/{c['name']}", c["image"]) for c in pod["containers"]]
    refs.append(("cluster-gpu.yaml docker.image", yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]))
    return refs


def test_every_infra_yaml_parses():
    paths = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {RAYCLUSTER, RAYJOB, LAUNCHER} <= set(paths)
    for path in paths:
        docs = _docs(path)
        assert docs, f"{path} has no YAML documents"
        assert all(isinstance(doc, dict) for doc in docs), path


def test_raycluster_head_and_gpu_worker_group():
    cluster = _one(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"] == "msa-ray"
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTION_FIELDS
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    head_container = head["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})

    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert "gpu-workers" in groups
    gpu = groups["gpu-workers"]
    assert set(gpu) <= WORKER_GROUP_FIELDS, set(gpu) - WORKER_GROUP_FIELDS
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (0, 2, 8)
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    # Kubernetes requires extended resources to be set in limits (requests, if given, must equal them).
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == resources[
        "limits"
    ]["nvidia.com/gpu"]


@pytest.mark.parametrize("label,spec", [pytest.param(label, spec, id=label) for label, spec in _cluster_specs()])
def test_cluster_pods_env_volumes_and_start_params(label, spec):
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is a map of strings; an unquoted number is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (label, group["rayStartParams"])
    for pod in _pod_specs(spec):
        container = pod["containers"][0]
        env = {item["name"]: item for item in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "msa-config"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("msa-s3", key)
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"].get("optional") is True
        assert not env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"].get("optional", False)

        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts.values()) <= set(volumes), (label, "volumeMount without a volume")
        shm = volumes[mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/mnt/msa"]]["persistentVolumeClaim"]["claimName"] == "msa-shared"
        assert env["MSA_HOME"]["value"] == "/mnt/msa"


def test_rayjob_reuses_the_raycluster_spec_and_shared_objects():
    job = _one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == _one(RAYCLUSTER, "RayCluster")["spec"]
    for kind in ("ConfigMap", "PersistentVolumeClaim"):
        assert _one(RAYJOB, kind) == _one(RAYCLUSTER, kind), f"{kind} differs between the k8s manifests"


def test_rayjob_entrypoint_parses_with_the_msa_cli():
    from flows.cli import build_parser

    argv = shlex.split(_one(RAYJOB, "RayJob")["spec"]["entrypoint"])
    assert argv[0] == "msa", argv
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
        pytest.fail(f"`{' '.join(argv)}` does not parse with flows.cli.build_parser(): exit {exc.code}")
    assert args.command == "train"
    assert args.data and args.data.startswith("s3://")
    assert args.preset == "paper"
    assert args.use_gpu is True
    assert args.workers == 2
    assert args.ray_address == "auto"


def test_image_tag_single_source_of_truth():
    labels = _dockerfile_labels()
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == NAME
    refs = _image_refs()
    assert len(refs) >= 3
    for where, image in refs:
        repository, _, tag = image.rpartition(":")
        assert tag == VERSION, f"{where}: {image} is not tagged {VERSION}"
        assert repository.rsplit("/", 1)[-1] == NAME, f"{where}: {image} is not the {NAME} image"
    assert len({image for _, image in refs}) == 1, refs


def test_dockerfile_base_env_and_build_context():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    python_tag = "py" + re.search(r">=(\d+)\.(\d+)", PYPROJECT["requires-python"]).expand(r"\1\2")
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-{python_tag}-"), base
    for var in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "RAY_USAGE_STATS_ENABLED=0", "DO_NOT_TRACK=true"):
        assert re.search(rf"^\s*(ENV\s+)?{var}\b", text, re.M), var
    assert re.search(r"pip install .*--no-deps .*-e \.", text)

    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".msa", ".stack", ".git"} <= ignored
    assert ignored & {"__pycache__", "**/__pycache__"}
    copied = [
        src.rstrip("/") for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for src in line.split()[:-1]
    ]
    assert {"requirements.lock", "pyproject.toml", "msa", "shards", "flows"} <= set(copied)
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the build context"
        assert src not in ignored, f"COPY {src}: excluded by .dockerignore"


def _pip_commands(text: str) -> list[str]:
    """Every `pip ...` command the Dockerfile runs (continuation lines joined, `&&` chains split)."""
    runs = re.findall(r"^RUN (.+)$", text.replace("\\\n", " "), re.M)
    return [" ".join(cmd.split()) for run in runs for cmd in run.split("&&") if re.search(r"\bpip\b", cmd)]


def _runtime_closure() -> set[str]:
    """Canonical names of [project].dependencies and everything they require, extras and markers
    evaluated, from the installed distributions' metadata (the venv is built from the lock)."""
    from importlib import metadata

    seen: set[tuple[str, tuple[str, ...]]] = set()
    stack = [Requirement(dep) for dep in PYPROJECT["dependencies"]]
    while stack:
        req = stack.pop()
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.distribution(req.name).requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                stack.append(sub)
    return {name for name, _ in seen}


def test_lock_is_sorted_and_pins_versions_the_project_ranges_admit():
    names = [canonicalize_name(line.split("==")[0]) for line in LOCK_LINES]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==\S+", line) for line in LOCK_LINES), "every lock line is NAME==VERSION"
    assert len(names) == len(set(names)), "a package is pinned twice"
    keys = [f"{canonicalize_name(line.split('==')[0])}=={line.split('==')[1]}" for line in LOCK_LINES]
    assert keys == sorted(keys), "requirements.lock is not sorted by package name (as pip freeze writes it)"
    for group, deps in [("dependencies", PYPROJECT["dependencies"]),
                        *[(f"optional-dependencies.{k}", v) for k, v in PYPROJECT["optional-dependencies"].items()]]:
        for dep in deps:
            req = Requirement(dep)
            name = canonicalize_name(req.name)
            assert name in LOCK, f"{group}: {dep} is not pinned in requirements.lock"
            assert req.specifier.contains(Version(LOCK[name]), prereleases=True), (
                f"{group}: requirements.lock pins {name}=={LOCK[name]}, outside {dep}")
    assert {"pytest", "moto", "efficientnet-lite-pytorch", "ruff", "pre-commit", "import-linter"} <= TEST_ONLY


def test_dockerfile_installs_runtime_dependencies_only_and_runs_pip_check():
    text = DOCKERFILE.read_text()
    commands = _pip_commands(text)
    installs = [cmd for cmd in commands if " install " in f" {cmd} "]
    assert installs, commands
    for cmd in installs:
        assert not re.search(r"(-r|--requirement)\s*requirements\.lock", cmd), f"installs the whole lock: {cmd}"
        assert "[test]" not in cmd, cmd
        named = {canonicalize_name(re.split(r"[\[=<>~!]", tok)[0]) for tok in cmd.split() if not tok.startswith("-")}
        assert not named & TEST_ONLY, f"installs test-only packages {named & TEST_ONLY}: {cmd}"
    # The runtime requirements, constrained to the lock's exact versions; the project itself without deps.
    assert any("-c requirements.lock" in cmd and "runtime-requirements.txt" in cmd for cmd in installs), installs
    assert "['project']['dependencies']" in text
    # pip check runs after the last install, so it sees the image's final package set.
    checks = [i for i, cmd in enumerate(commands) if re.fullmatch(r"python -m pip check", cmd)]
    assert checks and checks[-1] > commands.index(installs[-1]), commands
    # What those requirements pull in: no test tool, and every package pinned by the lock.
    closure = _runtime_closure()
    assert not closure & TEST_ONLY, f"runtime dependencies require test-only packages: {closure & TEST_ONLY}"
    assert closure <= set(LOCK), f"runtime packages missing from requirements.lock: {sorted(closure - set(LOCK))}"


def test_launcher_config_passes_ray_schema_and_sizes_gpu_workers():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(config)  # jsonschema against ray/autoscaler/ray-schema.json + consistency checks
    assert config["provider"]["type"] == "aws"
    assert isinstance(config["idle_timeout_minutes"], (int, float))
    assert any(opt.startswith("--shm-size") for opt in config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["node_config"]["InstanceType"] == "g5.2xlarge"
    assert gpu["resources"]["GPU"] == 1
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)
    assert config["max_workers"] >= gpu["max_workers"]

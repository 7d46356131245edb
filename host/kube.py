"""`make kube-run WORKERS=N`: the Job template and backend config for N training workers.

MLflow's Kubernetes backend submits one batch/v1 Job from a template, names it
`<project>-<timestamp>`, and leaves the spec's other fields alone. For N > 1 workers
this renders kubernetes/kubernetes_job_template.yaml as an Indexed Job (completions =
parallelism = N) whose pods sit under a headless Service (their `subdomain`), so pod i
answers at `<job>-<i>.<service>`. Each pod's TF_CONFIG is made at its start by the
engine (engine.multiworker.indexed_job_tf_config) from JOB_COMPLETION_INDEX, its Job's
name (a downward-API env) and the TRAIN_WORKER_* values set here. One Service serves
every such Job of the project: the host names differ by Job name.

    python -m host.kube config --workers N --out DIR   # prints the backend config to use
    python -m host.kube service --workers N            # creates the headless Service

`make kube-tune WORKERS=N` renders its Indexed Job of tuning workers with tune_job
(host/tune.py is its door: python -m host.tune --workers N --src DIR --out DIR FLAGS).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
KUBE_DIR = PROJECT_DIR / "kubernetes"
BACKEND_CONFIG = KUBE_DIR / "kubernetes_config.json"
WORKER_PORT = 2222  # the port TensorFlow's collectives listen on in every pod
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by Kubernetes 1.27+ on a Job's pods
TUNE_SETTINGS_ENV = "TUNE_SETTINGS"  # engine.tune.SETTINGS_ENV: a tuning worker's settings


def project_name() -> str:
    """MLproject's name: MLflow's Job name starts with it, the Service is named after it."""
    return yaml.safe_load((PROJECT_DIR / "MLproject").read_text())["name"]


def service_name(project: str) -> str:
    """The headless Service (the pods' subdomain); a DNS label of at most 63 characters."""
    return f"{project}-workers"[:63].rstrip("-")


def indexed(template: dict[str, Any], workers: int) -> dict[str, Any]:
    """A copy of the Job template as an Indexed Job of `workers` pods, each with its
    JOB_COMPLETION_INDEX (0 to workers-1)."""
    job = copy.deepcopy(template)
    job["spec"].update(completions=workers, parallelism=workers, completionMode="Indexed")
    return job


def indexed_job(template: dict[str, Any], workers: int, project: str) -> dict[str, Any]:
    """The Job template as an Indexed Job of `workers` pods under the headless Service."""
    job = indexed(template, workers)
    pod = job["spec"]["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {})["training-workers"] = project
    pod["spec"]["subdomain"] = service_name(project)
    container = pod["spec"]["containers"][0]
    container.setdefault("ports", []).append({"name": "collective", "containerPort": WORKER_PORT})
    container.setdefault("env", []).extend(
        [
            {"name": "TRAIN_WORKERS", "value": str(workers)},
            {"name": "TRAIN_WORKER_SUBDOMAIN", "value": service_name(project)},
            {"name": "TRAIN_WORKER_PORT", "value": str(WORKER_PORT)},
            {
                "name": "JOB_NAME",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_NAME_LABEL}']"}},
            },
        ]
    )
    return job


def headless_service(project: str, namespace: str) -> dict[str, Any]:
    """The Service that gives every worker pod of the project its DNS name."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(project), "namespace": namespace},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # names resolve before the pods are ready
            "selector": {"training-workers": project},
            "ports": [{"name": "collective", "port": WORKER_PORT}],
        },
    }


def check_workers(text: str) -> int:
    """WORKERS as a positive whole number, or exit 2 with one line saying why."""
    if not text.strip().isdigit() or int(text) < 1:
        print(f"error: WORKERS must be a positive whole number, got '{text}'", file=sys.stderr)
        sys.exit(2)
    return int(text)


def write_config(workers: int, out: Path) -> Path:
    """The backend config for `mlflow run --backend kubernetes`: the project's own for one
    worker, else a copy in `out` that points at the rendered Indexed Job template."""
    if workers == 1:
        return BACKEND_CONFIG
    return write_rendered(lambda template: indexed_job(template, workers, project_name()), out)


def tune_job(template: dict[str, Any], workers: int, settings_json: str) -> dict[str, Any]:
    """`make kube-tune WORKERS=N`: the Job template as an Indexed Job of N tuning workers,
    each given the study's settings (TUNE_SETTINGS: the study, its PostgreSQL storage,
    the parent run). Pod i is worker i (kubernetes/tune_worker.py); the workers share
    nothing but the study, so no Service."""
    job = indexed(template, workers)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container.setdefault("env", []).append({"name": TUNE_SETTINGS_ENV, "value": settings_json})
    return job


def write_rendered(render: Callable[[dict[str, Any]], dict[str, Any]], out: Path) -> Path:
    """A backend config in `out` whose Job template is the project's, rendered."""
    config = json.loads(BACKEND_CONFIG.read_text())
    template = yaml.safe_load((PROJECT_DIR / config["kube-job-template-path"]).read_text())
    out.mkdir(parents=True, exist_ok=True)
    rendered = out / "kubernetes_job_template.yaml"
    rendered.write_text(yaml.safe_dump(render(template)))
    config["kube-job-template-path"] = str(rendered)
    (out / "kubernetes_config.json").write_text(json.dumps(config, indent=2))
    return out / "kubernetes_config.json"


def create_service(namespace: str) -> None:
    """Create the headless Service in the cluster kubectl points at, unless it exists."""
    # the kubernetes client comes with MLflow's Kubernetes backend; only this command needs it
    from kubernetes.client.rest import ApiException

    from kubernetes import client, config

    config.load_kube_config()
    body = headless_service(project_name(), namespace)
    try:
        client.CoreV1Api().create_namespaced_service(namespace, body)
    except ApiException as err:
        if err.status != 409:  # 409: it exists, from an earlier run
            raise
    print(f"service {body['metadata']['name']} in namespace {namespace}")


def main(argv: list[str] | None = None) -> None:
    """The two commands `make kube-run` calls."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("config", "service"))
    parser.add_argument("--workers", default="1")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    workers = check_workers(args.workers)
    if args.command == "config":
        print(write_config(workers, args.out))
    elif workers > 1:
        template_path = json.loads(BACKEND_CONFIG.read_text())["kube-job-template-path"]
        namespace = yaml.safe_load((PROJECT_DIR / template_path).read_text())["metadata"]
        create_service(namespace.get("namespace", "default"))


if __name__ == "__main__":
    main()

"""`make reproduce`: train a run again from its own record and say whether the figures
come back (`lifecycle.py reproduce --model models:/NAME@champion` or `--run RUN_ID`).

The record a run made by this template carries: its code (`code.commit`, `code.dirty`,
`code.image` when it ran in the image; engine.provenance), its parameters and seed, its
data (the MLflow dataset's digest and `reproduction/lineage.json`, engine.run_record).
From it, in order, with every check before any work:

1. the source run (a registered version's run, or a run id) and the tracking server;
2. the code: the recorded commit must be in the repository (--git-url); a dirty tree is
   refused (--allow-dirty uses the commit without the edits);
3. the data: the digest is recomputed from the files now; a difference stops here,
   naming the files (--allow-data-change goes on);
4. a new run in the source's experiment, tagged `reproduces=<source run id>`, trained by
   the recorded commit's own train.py with the recorded parameters (a knob added since
   keeps its default at that commit): in a subprocess here when the source ran here, in
   the image rebuilt from that commit when it ran there (the host side does that);
5. the verdict (engine.reproduction_verdict): exact, within <tol>, or no.

The host side hands in how to check a commit out and how to run in the image, so this
module imports no host code, and neither TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from engine import reproduction_verdict, run_record
from engine.common import PROJECT_DIR, check_tracking_uri
from engine.config import UserError

# Params set for the new run whatever the source had: it registers no version (it would
# move the source model's aliases) and skips the SavedModel export; neither changes a figure.
FIXED_PARAMS = {"registered_model_name": "", "model_alias": "", "export_savedmodel": "false"}
# Params the new run never takes from the source: where its record goes and a resumption.
SKIPPED_PARAMS = ("experiment_name", "run_name", "resume_run_id")


@dataclass
class Source:
    """The run to reproduce, and the registered version it backs (if any)."""

    run: mlflow.entities.Run
    model_name: str = ""
    model_version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def in_image(self) -> bool:
        return bool(self.tags.get("code.image"))


@dataclass
class Host:
    """What the host side does for a reproduction (host/reproduce.py)."""

    checkout: Callable[[str, str, Path], str]  # (url, commit, folder) -> the commit
    run_in_image: Callable[..., int] | None = None  # see host.reproduce.run_in_image


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI or the project's local store; its server must answer."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one download
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"
    check_tracking_uri(uri, 5.0)
    mlflow.set_tracking_uri(uri)
    return uri


def parse_model(model: str, model_name: str) -> tuple[str, str, str]:
    """models:/NAME@ALIAS, models:/NAME/VERSION, a bare alias or version -> (name, alias,
    version), one of alias and version empty."""
    if model.startswith("models:/"):
        body = model.removeprefix("models:/")
        if "@" in body:
            name, _, alias = body.partition("@")
            return name, alias, ""
        name, _, version = body.rpartition("/")
        return name, "", version
    return (model_name, "", model) if model.isdigit() else (model_name, model, "")


def known(client: mlflow.MlflowClient, name: str) -> str:
    """ " (NAME has versions [1, 2]; aliases: champion->v2)", or that it does not exist."""
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:
        return f" (there is no registered model '{name}')"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    named = ", ".join(f"{alias}->v{version}" for alias, version in sorted(aliases.items()))
    return f" ('{name}' has versions {versions}; aliases: {named or 'none'})"


def find_source(client: mlflow.MlflowClient, model: str, run_id: str, model_name: str) -> Source:
    """The run a model reference or run id names.

    Raises:
        UserError: no such model version or run, or a run with no code record.
    """
    name = version = ""
    if model:
        name, alias, version = parse_model(model, model_name)
        try:
            found = (
                client.get_model_version(name, version)
                if version
                else client.get_model_version_by_alias(name, alias)
            )
        except MlflowException:
            raise UserError(
                f"there is no model {model} in {mlflow.get_tracking_uri()}{known(client, name)}: "
                "name a registered version (models:/NAME@ALIAS or models:/NAME/VERSION) or a "
                "run (--run RUN_ID)"
            ) from None
        run_id, version = found.run_id, str(found.version)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"there is no run {run_id} in {mlflow.get_tracking_uri()}: give the id of a "
            "training run (its page in the UI shows it)"
        ) from None
    if "code.commit" not in run.data.tags:
        raise UserError(
            f"run {run_id} has no code record (no code.commit tag): it was not made by this "
            "template's train.py, so the code it ran cannot be found again"
        )
    if not version:
        versions = client.search_model_versions(f"run_id = '{run_id}'")
        if versions:
            name, version = versions[0].name, str(versions[0].version)
    return Source(run, name, version)


def check_commit(source: Source, git_url: str, allow_dirty: bool) -> str:
    """The commit to check out: the recorded one, known to the repository, of a clean tree.

    Raises:
        UserError: no commit recorded, the repository lacks it, or the tree was dirty.
    """
    commit, url = source.tags["code.commit"], git_url or str(PROJECT_DIR)
    if commit == "unknown":
        raise UserError(
            f"run {source.run_id} ran code of an unknown commit (built without git): "
            "its code cannot be checked out again"
        )
    # a local repository is asked now; a remote one answers when the commit is cloned
    remote = "://" in url or url.startswith("git@")
    found = not remote and subprocess.run(
        ["git", "-C", url, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
    )
    if found and found.returncode != 0:
        raise UserError(
            f"run {source.run_id} ran commit {commit}, which the repository {url} does not "
            "have (rebased away, or never pushed there): give the repository that holds it "
            "with --git-url URL"
        )
    if source.tags.get("code.dirty") == "true":
        if not allow_dirty:
            raise UserError(
                f"run {source.run_id} ran commit {commit[:12]} with uncommitted edits "
                "(code.dirty=true): the code it ran cannot be recovered. Pass --allow-dirty "
                "to train commit's own code instead, without the edits"
            )
        source.notes.append(
            f"--allow-dirty: using commit {commit[:12]} as committed; the run's uncommitted "
            "edits are lost, so differences may come from them"
        )
    return commit


def check_data(client: mlflow.MlflowClient, source: Source, allow_change: bool) -> dict:
    """Recompute the dataset digest from the files now (engine.run_record).

    Returns:
        What was checked, for reproduction.json.

    Raises:
        UserError: the data changed, unless allow_change.
    """
    inputs = source.run.inputs.dataset_inputs if source.run.inputs else []
    digest = inputs[0].dataset.digest if inputs else ""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(source.run_id, run_record.LINEAGE_ARTIFACT, tmp)
            record = run_record.read_record(path)
    except (MlflowException, OSError):
        source.notes.append("data: the run recorded no file list; its data is not checked")
        return {"checked": False, "digest": digest}
    folder = record.get("source", "")
    if source.in_image and folder and not Path(folder).exists():
        source.notes.append(
            f"data: the run's files were in its container ({folder} is not on this host), so "
            "the data is checked after training, by the two runs' dataset digests"
        )
        return {"checked": False, "digest": digest}
    started = source.run.info.start_time / 1000
    check = run_record.data_changes(record, digest or record.get("digest", ""), started)
    answer = {"checked": True, "digest": check.recorded_digest, "digest_now": check.digest_now}
    if check.same:
        return answer
    what = (
        f"the data of run {source.run_id} changed since it ran (digest "
        f"{check.recorded_digest} then, {check.digest_now} now): {check.describe()}"
    )
    if not allow_change:
        raise UserError(f"{what}. Nothing was trained; --allow-data-change trains on it anyway")
    source.notes.append(f"--allow-data-change: {what}")
    return {**answer, "changes": check.describe()}


def unquote(value: str) -> str:
    """A param as `mlflow run` logged it (shell-quoted: '' reads "''") -> its value."""
    if len(value) >= 2 and value[0] == value[-1] == "'":
        parts = shlex.split(value)
        return parts[0] if len(parts) == 1 else value
    return value


def training_params(source: Source, project_dir: Path, overrides: list[str]) -> dict[str, str]:
    """The recorded params that the checked-out commit's train.py takes (its MLproject's
    main parameters), with FIXED_PARAMS and any --override applied.

    Raises:
        UserError: an --override that is not NAME=VALUE of a known parameter.
    """
    spec = yaml.safe_load((project_dir / "MLproject").read_text())
    known = set(spec["entry_points"]["main"]["parameters"])
    recorded = {k: unquote(v) for k, v in source.run.data.params.items()}
    params = {k: v for k, v in recorded.items() if k in known and k not in SKIPPED_PARAMS}
    if params.get("data_source") == "demo" and not params.get("data_dir"):
        # the demo's default folder is under the project: the source's, not the checkout's
        inputs = source.run.inputs.dataset_inputs if source.run.inputs else []
        folder = yaml.safe_load(inputs[0].dataset.source).get("uri", "") if inputs else ""
        if folder:
            params["data_dir"] = folder
            source.notes.append(f"data_dir: the demo folder the run used, {folder}")
    params.update(FIXED_PARAMS)
    for item in overrides:
        name, equals, value = item.partition("=")
        if not equals or name not in known:
            raise UserError(f"--override {item}: expected NAME=VALUE of a parameter of train.py")
        source.notes.append(f"--override {name}={value} (recorded {recorded.get(name)!r})")
        params[name] = value
    return params


def train_locally(
    project_dir: Path, params: dict[str, str], run_id: str, experiment_id: str, threads: str = ""
) -> int:
    """Run the checked-out train.py in a subprocess into run_id, with the source run's
    intra-op thread count (`threads`, when it recorded one). Returns its exit status."""
    flags = [item for name, value in params.items() for item in (f"--{name}", value)]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
    }
    if threads and "TF_NUM_INTRAOP_THREADS" not in os.environ:
        env["TF_NUM_INTRAOP_THREADS"] = threads  # the source's sums, in the source's order
    print(f"training: {shlex.join(['python', 'train.py', *flags])} (in {project_dir})")
    return subprocess.run([sys.executable, "train.py", *flags], cwd=project_dir, env=env).returncode


def reproduce(args: argparse.Namespace, host: Host) -> reproduction_verdict.Verdict:
    """Check the record, train again, compare, and record the verdict (see the module's notes).

    Args:
        args: the parsed flags of engine.reproduction_flags.add_arguments.
        host: how to check a commit out, and how to run in the image.

    Raises:
        UserError: bad input (before any work), or the new run failed.
    """
    tracking_uri()
    client = mlflow.MlflowClient()
    source = find_source(client, args.model or "", args.run or "", args.model_name)
    commit = check_commit(source, args.git_url, args.allow_dirty)
    if source.in_image and (host.run_in_image is None or not os.environ.get("MLFLOW_TRACKING_URI")):
        raise UserError(
            f"run {source.run_id} ran in the image: reproduce it with `make reproduce` and "
            "MLFLOW_TRACKING_URI set to the tracking server it logged to"
        )
    data = check_data(client, source, args.allow_data_change)
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="reproduce-"))
    new_run, status = "", 1  # until the training says otherwise: an exception leaves it FAILED
    try:
        host.checkout(args.git_url or str(PROJECT_DIR), commit, folder / "project")
        source.notes += run_record.share_untracked(PROJECT_DIR, folder / "project")
        params = training_params(source, folder / "project", args.override)
        for note in source.notes:
            print(f"note: {note}")
        experiment_id = source.run.info.experiment_id
        tags = {"reproduces": source.run_id, "mlflow.runName": f"reproduce-{source.run_id[:8]}"}
        new_run = client.create_run(experiment_id, tags=tags).info.run_id
        print(f"reproducing run {source.run_id} (commit {commit[:12]}) as run {new_run}")
        if source.in_image:
            url, image = args.git_url or str(PROJECT_DIR), source.tags["code.image"]
            status = host.run_in_image(url, commit, params, new_run, experiment_id, image)
        else:
            threads = source.tags.get("determinism.intra_op_threads", "")
            status = train_locally(folder / "project", params, new_run, experiment_id, threads)
    finally:
        if new_run and status != 0:
            client.set_terminated(new_run, "FAILED")
        shutil.rmtree(folder, ignore_errors=True)
    if status != 0:
        raise UserError(f"the reproduction run {new_run} failed (exit {status}); see its output")
    client.update_run(new_run, name=tags["mlflow.runName"])
    context = {"data": data, "notes": source.notes, "seconds": time.monotonic() - started}
    found = reproduction_verdict.judge(client, source, new_run, args.tolerance, context)
    print(found.line())
    for note in found.context["environment"]:
        print(f"note: {note}")
    return found

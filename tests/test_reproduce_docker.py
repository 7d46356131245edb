"""`make reproduce` of a run that `make run` trained in the image: the image is rebuilt
from the run's commit, the run trained again in it, and a --deterministic run comes back
exact. Uses test_docker_e2e's Docker engine, image, server and fork fixtures.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from tests.conftest import run_id_in, run_in_project, say
from tests.test_docker_e2e import MAKE, TINY_RUN, fork  # noqa: F401 (fork: a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def test_make_reproduce_retrains_a_make_run_in_its_image_and_comes_back_exact(
    mlflow_server, request, pytestconfig
):
    image, data, project = (
        request.getfixturevalue(name) for name in ("training_image", "storage", "fork")
    )
    client = MlflowClient(mlflow_server)
    base = image["base"]
    tiny = " ".join([*TINY_RUN, "-P", "deterministic=true"])
    output, _ = run_in_project(
        [*MAKE, "run", "EXPERIMENT=reproduce-docker", f"ARGS={tiny}"],
        mlflow_server,
        data,
        project,
        base=base,
    )
    source = client.get_run(run_id_in(output))
    assert source.data.tags["code.image"]

    output, seconds = run_in_project(
        [*MAKE, "reproduce", f"RUN={source.info.run_id}"], mlflow_server, data, project, base=base
    )
    say(pytestconfig, f"make reproduce of a make run: {seconds:.0f} s")
    assert "reproduced: exact" in output, output[-4000:]
    found = client.search_runs(
        [source.info.experiment_id], f"tags.reproduces = '{source.info.run_id}'"
    )
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert found[0].data.tags["code.image"] == source.data.tags["code.image"]
    assert found[0].data.tags["code.commit"] == source.data.tags["code.commit"]
    assert found[0].data.params["deterministic"] in ("true", "True")

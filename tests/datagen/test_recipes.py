"""The copy-paste recipes of docs/pipeline.md parse with the real command line (no option that does not exist,
no value of the wrong type), and the example cluster configurations are valid: the cluster launcher's
against Ray's own schema, KubeRay's as a RayCluster whose pods get the store's settings and no secret."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from datagen.cli import app

ROOT = Path(__file__).resolve().parents[2]


def commands(markdown: str, program: str, sub: str) -> list[list[str]]:
    """Arguments after `program sub` in the bash blocks, also inside quotes (`ray exec ... "datagen run ..."`)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            for part in [line, *re.findall(r'"([^"]*)"', line)]:
                words = shlex.split(part) if part.strip() else []
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                if words[:2] == [program, sub]:
                    found.append(words[2:])
    return found


def test_every_datagen_run_recipe_parses():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    recipes = commands(text, "datagen", "run")
    assert len(recipes) >= 10 and any("s3://" in " ".join(r) for r in recipes)
    run = get_command(app).commands["run"]
    for args in recipes:
        run.make_context("run", list(args))  # click raises on an unknown option or a bad value


def test_the_cluster_launcher_example_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "examples" / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if c.lstrip().startswith(("RAY_", "ray start")))
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token, not in the file
    with pytest.raises(Exception, match="unexpected"):
        config["available_node_types"]["head"]["not_a_field"] = 1
        validate_config(prepare_config(config))


def test_the_kuberay_example_gives_every_pod_the_store_and_no_secret_value():
    cluster = yaml.safe_load((ROOT / "examples" / "kuberay-raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"].startswith(f"rayproject/ray:{cluster['spec']['rayVersion']}-")
        names = {e["name"] for e in container["env"]}
        assert "AWS_ENDPOINT_URL" in names and not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert container["envFrom"] == [{"secretRef": {"name": "dmd3c-s3"}}]  # credentials from a Secret
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

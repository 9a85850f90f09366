"""Shipping this project to a Ray cluster whose nodes do not have it installed: Ray's runtime environment.

`datagen run --address HEAD:6379 --runtime-env MODE`:

    auto   (default) `full` when joining a cluster, nothing for the local Ray (it runs this very Python)
    full   py_modules: the `datagen` and `shared` packages as this driver has them (uploaded once per job,
           content-addressed, cached on each node), plus pip: the project's requirements for datagen,
           read from its installed metadata (pyproject.toml), without ray (the cluster's own Ray stays).
           Ray installs them once per node into a virtualenv cloned from the node's Python, so what the
           node's image already has (torch, say) is not downloaded again.
    code   py_modules only: for an image that has the dependencies but not this project
    off    nothing: the cluster was built from an image with this project installed

The driver's DMD3C_STORAGE_RETRY (the object-store retry policy, shared/storage.py) goes with the code, as
an environment variable of the workers (with `off`, set it in the nodes' environment). Nothing secret goes
into the runtime environment (it is stored in the cluster's job table): nodes read object-store
credentials from their own environment (an instance role, a Kubernetes secret, ~/.aws).
"""

from __future__ import annotations

import logging
import os

from shared.storage import RETRY_ENV

log = logging.getLogger("datagen")

MODES = ("auto", "full", "code", "off")
DISTRIBUTION = "dmd3c"
SHIPPED_PACKAGES = ("datagen", "shared")  # what the Ray workers import; the trainer is not needed there
EXCLUDES = ["__pycache__", "*.pyc"]
NOT_FROM_PIP = {"ray"}  # the cluster's Ray must match the driver's; never reinstalled per job


def requirements(extra: str = "datagen") -> list[str]:
    """The project's requirements for one extra (the base ones included), as pip strings without markers."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import requires as requires_of

    from packaging.requirements import Requirement

    try:
        declared = requires_of(DISTRIBUTION) or []
    except PackageNotFoundError as exc:
        raise RuntimeError(f"--runtime-env full reads the requirements of the installed {DISTRIBUTION} package, "
                           "which is not installed here: `pip install -e .`, or use --runtime-env code|off") from exc
    out = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        if req.name.lower() in NOT_FROM_PIP:
            continue
        req.marker = None
        if str(req) not in out:
            out.append(str(req))
    return out


def runtime_env(mode: str, joining_cluster: bool) -> dict | None:
    """The runtime_env for ray.init, or None (nothing to ship)."""
    if mode not in MODES:
        raise ValueError(f"--runtime-env must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not joining_cluster):
        return None
    import importlib

    env = {"py_modules": [importlib.import_module(p).__path__[0] for p in SHIPPED_PACKAGES], "excludes": EXCLUDES}
    if mode in ("auto", "full"):
        env["pip"] = requirements()
    if os.environ.get(RETRY_ENV):  # the driver's object-store retry policy holds on the nodes too
        env["env_vars"] = {RETRY_ENV: os.environ[RETRY_ENV]}
    return env


def describe(env: dict | None) -> str:
    if env is None:
        return "nothing shipped (--runtime-env off, or a local Ray)"
    pip = env.get("pip")
    return (f"shipping {', '.join(SHIPPED_PACKAGES)} (py_modules)"
            + (f" and {len(pip)} pip requirements, installed once per node" if pip else ""))

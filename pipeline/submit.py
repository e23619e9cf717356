"""``ntk-pipeline submit``: a run as a Ray job on a cluster, through the Ray Jobs SDK.

    job_id = submit("configs/cluster_trace.yaml", "http://head:8265")
    wait(job_id, "http://head:8265", follow=True)     # "SUCCEEDED", "FAILED" or "STOPPED"

The config's folder travels as the job's ``working_dir`` (without stores, .git and caches), so
relative paths in the config (data, checkpoint, a model module beside it) mean on the cluster what
they mean here. The entrypoint is ``ntk-pipeline run <config>``; the job's driver joins the cluster
and spreads the blocks over its nodes. The output must be a place every node reaches: a URL
(s3://...) or an absolute path on a shared file system, never a path inside the job's temporary
working directory.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Any

from pipeline.config import is_url, parse_config, read_yaml
from pipeline.errors import ConfigError, PipelineError, brief
from pipeline.execute.ray_session import CHECK, CONNECT_TIMEOUT_S, NoAnswer, bounded

# Left out of the uploaded working_dir: stores, version control, caches (Ray's gitignore-style patterns).
EXCLUDES = ["*.zarr", "*.zarr/", ".git/", "__pycache__/", "*.pyc", ".venv/", ".pytest_cache/", ".mypy_cache/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (on the head node, `ray get-auth-token` prints it) or "
              "put it in ~/.ray/auth_token, with RAY_AUTH_MODE=token")


class SubmitError(PipelineError):
    pass


def address_or_default(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS (Ray's own conventions)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address", "no job server address: pass --address http://HEAD:8265 or set "
                          "RAY_API_SERVER_ADDRESS")
    return address


def client(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """A JobSubmissionClient, whose server must answer within ``timeout`` seconds (Ray's client waits
    without a limit); a server that does not, and authentication failures, become one line."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # a token given is a token meant to be used
    try:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise SubmitError("--address", "Ray is not installed in this Python (pip install 'ray[default]'): "
                          "submit needs Ray's job client") from None

    try:
        return bounded(lambda: JobSubmissionClient(address), timeout)
    except NoAnswer:
        raise SubmitError("--address", f"no Ray job server answered at {address} within {timeout:g} s; "
                          f"{CHECK}") from None
    except AuthenticationError as err:
        why = "rejected the token" if "invalid" in str(err).lower() else "requires a token and none was found"
        raise SubmitError("--address", f"the Ray cluster at {address} {why}: {TOKEN_HELP}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError("--address", f"cannot reach a Ray job server at {address}: {brief(err)}") from None


def _check_paths(raw: dict[str, Any], folder: Path) -> None:
    """Refuse what would silently go wrong on a cluster: an output inside the job's temporary
    working directory, or a relative input outside the folder that travels."""
    out = (raw.get("output") or {}).get("path")
    if isinstance(out, str) and not is_url(out) and not os.path.isabs(os.path.expanduser(out)):
        raise ConfigError("output.path", f"{out!r} is relative: in a Ray job it would be written inside the job's "
                          "temporary working directory and lost; use a URL (s3://...) or an absolute path on a "
                          "file system every node mounts")
    data = raw.get("data") or {}
    for key in ("x1", "x2"):
        path = (data.get(key) or {}).get("path")
        if isinstance(path, str) and not is_url(path) and not os.path.isabs(os.path.expanduser(path)):
            resolved = (folder / path).resolve()
            if not resolved.is_relative_to(folder.resolve()):
                raise ConfigError(f"data.{key}.path", f"{path!r} is outside the config's folder {folder}, which is "
                                  "what travels with the job; move it there, or use a URL or a shared absolute path")


def submit(config: str | os.PathLike[str], address: str | None = None, *, job_id: str | None = None,
           excludes: tuple[str, ...] = (), entrypoint_num_cpus: float | None = None,
           timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Submit ``ntk-pipeline run CONFIG`` as a Ray job; returns its submission id.

    The config is validated here first (keys, types, values; files that exist only on the cluster
    are allowed), so a mistake costs one line, not a job.
    """
    path = Path(config)
    raw = read_yaml(path)
    folder = path.resolve().parent
    parse_config(raw, base=folder, check_files=False)
    _check_paths(raw, folder)
    addr = address_or_default(address)
    c = client(addr, timeout)
    runtime_env = {"working_dir": str(folder), "excludes": [*EXCLUDES, *excludes]}
    entrypoint = f"ntk-pipeline run {shlex.quote(path.name)} --no-progress"
    try:
        return str(c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                entrypoint_num_cpus=entrypoint_num_cpus,
                                metadata={"ntk_pipeline_config": path.name}))
    except Exception as err:  # the SDK raises RuntimeError for a refused submission, ValueError for a bad env
        raise SubmitError("submit", f"the job server at {addr} refused the job: {brief(err)}") from None


def wait(job_id: str, address: str | None = None, *, follow: bool = False, echo: Any = print,
         poll_s: float = 1.0) -> str:
    """Wait for a job to end; with ``follow``, stream its logs meanwhile. Returns its final status."""
    c = client(address_or_default(address))
    if follow:
        async def tail() -> None:
            async for lines in c.tail_job_logs(job_id):
                echo(lines.rstrip("\n"))

        try:
            asyncio.run(tail())
        except Exception as err:  # a dropped log stream: the job itself may still be running
            echo(f"(log stream ended: {brief(err)}; waiting for the job)")
    last = None
    while True:
        status = str(c.get_job_status(job_id).value)
        if status != last and not follow:
            echo(f"job {job_id}: {status}")
        last = status
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def job_message(job_id: str, address: str | None = None) -> str:
    """The job server's message for a job (why it failed, for one)."""
    info = client(address_or_default(address)).get_job_info(job_id)
    return str(info.message or "")

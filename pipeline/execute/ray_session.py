"""Ray's lifecycle for one user of it (a run's executor, a kernel's products), and Ray's errors as ours.

    session = RaySession(None, key="ray.address")   # None: a local instance; "auto", ray://...: a cluster
    session.start()                                  # joins the instance this process has, else starts one
    with unwrapped(BlockError, "block 3"):           # a task's PipelineError re-raised as itself
        session.ray.get(ref)
    session.stop()                                   # shuts Ray down only if start() started it

Ray is imported only inside ``pipeline.execute``, and only when used: importing this module (as
``pipeline.kernel`` does) costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from pipeline.errors import ConfigError, PipelineError, brief

RAY_MISSING = ("Ray is not installed in this Python (pip install 'ray[default]'); `run --executor local` and "
               "`predict`/`plot --executor local` work without it")


def import_ray(key: str, error: type[PipelineError] = ConfigError) -> Any:
    """The ``ray`` module; where it is not installed, ``error(key, ...)``: one line saying what runs without it."""
    try:
        import ray
    except ImportError:
        raise error(key, RAY_MISSING) from None
    return ray


def ray_installed() -> bool:
    """Whether ``import ray`` works here (``executor: auto`` falls back to the local path where not)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class RaySession:
    """Ray for one user: ``start`` joins the instance this process already has (a notebook's, a test
    session's) or starts one at ``address``, remembering which; ``stop`` shuts down only what it started.

    Args:
      address: None for a local instance, "auto" or ``ray://host:10001`` to join a cluster.
      key: what a connection failure is about, named in its one-line error (``ray.address``).
      error: the PipelineError subclass of that error.
      runtime_env: Ray's runtime environment for the workers of an instance this session starts.
    """

    def __init__(self, address: str | None, key: str, error: type[PipelineError] = ConfigError,
                 runtime_env: dict[str, Any] | None = None) -> None:
        self.address, self.key, self.error, self.runtime_env = address, key, error, runtime_env
        self.started = False  # whether start() started Ray (and so stop() shuts it down)

    @property
    def ray(self) -> Any:
        """The ``ray`` module, for its API (``put``, ``get``, ``remote``, ...); ``start`` first."""
        return import_ray(self.key, self.error)

    def start(self) -> None:
        """Join the Ray instance this process has, else start one at ``address``.

        Raises:
          PipelineError: of type ``error`` naming ``key``, when ``address`` cannot be reached or Ray is
            not installed.
        """
        ray = import_ray(self.key, self.error)
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, runtime_env=self.runtime_env,
                         logging_level=logging.WARNING)
            except ConnectionError as err:
                raise self.error(self.key, f"cannot connect to {self.address!r}: {err}") from None
            self.started = True

    def stop(self) -> None:
        """Shut Ray down if ``start`` started it; else leave the instance to whoever started it."""
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def __enter__(self) -> RaySession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unwrap(err: BaseException, error: type[PipelineError], key: str, what: str = "") -> PipelineError:
    """The error a failed Ray task stands for: the PipelineError the task raised (Ray wraps it in a
    RayTaskError) as itself, else ``error(key, what + cause)`` with the cause in one line."""
    cause: BaseException = getattr(err, "cause", None) or err
    if isinstance(cause, PipelineError):
        return cause
    return error(key, f"{what}{brief(cause, limit=500)}")


@contextlib.contextmanager
def unwrapped(error: type[PipelineError], key: str, what: str = "") -> Iterator[None]:
    """Raise any Ray error from inside as ``unwrap`` says (a task's failure, a worker or node lost for good)."""
    from ray.exceptions import RayError

    try:
        yield
    except RayError as err:
        raise unwrap(err, error, key, what) from None


__all__ = ["RAY_MISSING", "RaySession", "import_ray", "ray_installed", "unwrap", "unwrapped"]

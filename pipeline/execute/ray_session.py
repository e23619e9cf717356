"""Ray's lifecycle for one user of it (a run's executor, a kernel's products), and Ray's errors as ours.

    session = RaySession(None, key="ray.address")   # None: a local instance; "auto", ray://...: a cluster
    session.start()                                  # joins the instance this process has, else starts one
    with unwrapped(BlockError, "block 3"):           # a task's PipelineError re-raised as itself
        session.ray.get(ref)
    session.stop()                                   # shuts Ray down only if start() started it

Joining a cluster is bounded: Ray's own client retries an address where nothing answers for many
minutes, deaf to SIGTERM and logging each retry to stderr, so ``start`` first checks that something
at the address answers the opening of a gRPC connection (``probe``), then joins in a thread it waits
for at most ``timeout`` seconds; either failure is one line naming the address. Ray is imported
only inside ``pipeline.execute``, and only when used: importing this module (as ``pipeline.kernel``
does) costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pipeline.errors import ConfigError, PipelineError, brief

# Seconds to wait for a Ray cluster to answer when joining one (``ray.connect_timeout_s``).
CONNECT_TIMEOUT_S = 60.0
CHECK = "check the address and that the head node is up (ray status)"
T = TypeVar("T")
# Ray's log lines that say nothing to a user of this tool: the token authentication Ray enables for a
# local instance this tool starts and stops itself, and the SIGTERM handler it does not set when it is
# joined from a thread (the run sets its own).
QUIET = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
    "ray._private.worker": "SIGTERM handler is not set",
}


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """Drop Ray's QUIET log lines while inside."""
    filters = [(logging.getLogger(name), _Drop(prefix)) for name, prefix in QUIET.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


class NoAnswer(TimeoutError):
    """``bounded``'s call did not return in time."""


def bounded(call: Callable[[], T], timeout: float) -> T:
    """``call()`` in a daemon thread, waited for at most ``timeout`` seconds (this thread still answers
    SIGINT and SIGTERM meanwhile): its result, or its exception raised here, or NoAnswer. A call that
    never returns (Ray's clients may retry for many minutes) is left to its thread, which the process
    leaves behind when it exits."""
    outcome: list[Any] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as err:  # handed to the waiting thread
            failure.append(err)
        finally:
            done.set()

    threading.Thread(target=target, name="ntk-bounded", daemon=True).start()
    if not done.wait(max(0.0, timeout)):
        raise NoAnswer(f"no answer within {timeout:g} s")
    if failure:
        raise failure[0]
    result: T = outcome[0]
    return result


def cluster_address(address: str | None) -> str | None:
    """The cluster ``ray.init(address)`` joins: ``address``, or ``$RAY_ADDRESS`` for None and "auto"
    (as Ray reads it); None: none, a local instance starts."""
    env = os.environ.get("RAY_ADDRESS")
    return env if env and address in (None, "auto") else address


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for "auto" and anything without a port."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port)) if sep and port.isdigit() else None


# What a gRPC client sends first (RFC 9113, 3.4): HTTP/2's connection preface and an empty SETTINGS
# frame. A Ray head's GCS and its Ray client server (both gRPC) answer with a SETTINGS frame at once.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe(address: str, timeout: float) -> str | None:
    """Why nothing answers at ``address``, within ``timeout`` seconds in all, or None: something there
    answered, or the address names no port to try. A TCP connection to its host and port, then the
    opening of a gRPC connection: whatever answers (a TLS server answers with an alert, and closing or
    resetting is an answer too) is ray.init's to judge; silence is refused here, before Ray's own
    client, which retries for minutes and logs each retry to stderr (Ray offers no setting that quiets
    its C++ log before it has joined: RAY_BACKEND_LOG_LEVEL is read only by a started core worker)."""
    where = host_port(address)
    if where is None:
        return None
    deadline = time.monotonic() + timeout
    try:
        conn = socket.create_connection(where, timeout=timeout)
    except TimeoutError:
        return f"no Ray cluster answered at {address} within {timeout:g} s"
    except ConnectionRefusedError:
        return f"no Ray cluster answered at {address}: connection refused"
    except OSError as err:
        return f"no Ray cluster answered at {address}: {err.strerror or brief(err)}"
    with conn:
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.sendall(H2_PREFACE)
            conn.recv(1)
        except TimeoutError:
            return f"no Ray cluster answered at {address} within {timeout:g} s"  # the port is open, and silent
        except OSError:
            return None  # reset: something there, for ray.init to judge
    return None


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
      timeout: seconds to wait for a cluster to answer when joining one (not for a local start).
    """

    def __init__(self, address: str | None, key: str, error: type[PipelineError] = ConfigError,
                 runtime_env: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.address, self.key, self.error, self.runtime_env = address, key, error, runtime_env
        self.timeout = timeout
        self.started = False  # whether start() started Ray (and so stop() shuts it down)

    @property
    def ray(self) -> Any:
        """The ``ray`` module, for its API (``put``, ``get``, ``remote``, ...); ``start`` first."""
        return import_ray(self.key, self.error)

    def start(self) -> None:
        """Join the Ray instance this process has, else start one at ``address``.

        Raises:
          PipelineError: of type ``error`` naming ``key``, when the cluster at ``address`` does not
            answer within ``timeout`` seconds or refuses to be joined, or when Ray is not installed.
        """
        ray = import_ray(self.key, self.error)
        if ray.is_initialized():
            return
        target = cluster_address(self.address)
        with quiet_ray():
            if target is None:  # a local instance: nothing to wait for
                self._init()
            else:
                self._join(target)
        self.started = True

    def _init(self) -> None:
        ray = import_ray(self.key, self.error)
        try:
            ray.init(address=self.address, include_dashboard=False, runtime_env=self.runtime_env,
                     logging_level=logging.WARNING)
        except ConnectionError as err:
            raise self.error(self.key, f"cannot connect to {self.address!r}: {brief(err)}") from None

    def _join(self, target: str) -> None:
        """Join the cluster at ``target`` within ``timeout`` seconds: a probe first, then ``ray.init``
        in a thread this one waits for (still answering SIGINT and SIGTERM). A join that does not end in
        time is left to its thread, which the process leaves behind when it exits."""
        deadline = time.monotonic() + self.timeout
        why = probe(target, self.timeout)
        if why:
            raise self.error(self.key, f"{why}; {CHECK}")
        try:
            bounded(self._init, deadline - time.monotonic())
        except NoAnswer:
            raise self.error(self.key, f"no Ray cluster answered at {target} within {self.timeout:g} s; "
                             f"{CHECK}") from None
        except PipelineError:
            raise
        except Exception as err:
            raise self.error(self.key, f"cannot join the Ray cluster at {target}: {brief(err)}; {CHECK}") from None

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
    return error(key, f"{what}{brief(cause)}")


@contextlib.contextmanager
def unwrapped(error: type[PipelineError], key: str, what: str = "") -> Iterator[None]:
    """Raise any Ray error from inside as ``unwrap`` says (a task's failure, a worker or node lost for good)."""
    from ray.exceptions import RayError

    try:
        yield
    except RayError as err:
        raise unwrap(err, error, key, what) from None


__all__ = ["CHECK", "CONNECT_TIMEOUT_S", "H2_PREFACE", "RAY_MISSING", "NoAnswer", "RaySession", "bounded",
           "cluster_address", "host_port", "import_ray", "probe", "quiet_ray", "ray_installed", "unwrap", "unwrapped"]

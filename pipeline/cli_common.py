"""What the commands of pipeline.cli and pipeline.cli_kernel share: turning a PipelineError into
``Error: ...`` and exit 1, human-readable sizes and dtypes, and the ``--storage-options JSON`` option."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pipeline.errors import Interrupted, PipelineError, stop_on_signals

F = TypeVar("F", bound=Callable[..., Any])


def fails_cleanly(fn: F) -> F:
    """Print a PipelineError as one line ``Error: <key>: <what is wrong>`` and exit 1. Python warnings
    (a request the program adjusted itself, as eigenvalues clipped to the matrix's size) are not
    printed as Python prints them, with a source line: a command that succeeds says each once, as a
    line ``note: <message>`` on stderr after its output; one that fails says only its error. SIGINT or
    SIGTERM at any point: ``Error: interrupted by SIGTERM`` (for a run, with what became of its output)
    and the shell's status for the signal (130, 143), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            try:
                with stop_on_signals():
                    out = fn(*args, **kwargs)
            except KeyboardInterrupt as err:
                stop = err if isinstance(err, Interrupted) else Interrupted("SIGINT")
                click.echo(f"Error: {stop}" + (f": {stop.outcome}" if stop.outcome else ""), err=True)
                _quiet_exit_logs()
                sys.exit(128 + signal.Signals[stop.signal].value)
            except PipelineError as err:
                if "zarr" in sys.modules:  # a failed read may leave others in flight: let them end quietly
                    from pipeline.store.layout import settle

                    settle()
                click.echo(f"Error: {err}", err=True)
                sys.exit(1)
        for note in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
            click.echo(f"note: {note}", err=True)
        return out

    return wrapper  # type: ignore[return-value]


def _quiet_exit_logs() -> None:
    """After an interrupted command's one line, nothing more on stderr: Ray's core worker, shutting down
    at exit with tasks still running, may log from C++ straight to file descriptor 2
    ("task_manager.cc: Failed to push error to driver for task ..."); those lines stay in Ray's session
    logs. Python's own stderr is flushed first."""
    sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """A number with its noun: ``1 block``, ``2 blocks`` (``plural``: where it is not ``noun + "s"``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def size(n: float) -> str:
    """Bytes with a binary prefix: ``512 B``, ``1.5 KiB``, ..."""
    for prefix in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if abs(n) < 1024 or prefix == "Pi":
            return f"{n:.1f} {prefix}B" if prefix else f"{n:.0f} B"
        n /= 1024
    raise AssertionError("unreachable")


def numbers(dtype: str, precision: str | None) -> str:
    """A kernel's dtype as the commands show it, with ``ntk.precision`` when it is not the default:
    ``float32`` or ``float32 with TF32 products``."""
    return dtype if precision in (None, "highest") else f"{dtype} with {precision.upper()} products"


def split_rule(rule: str) -> str:
    """How a feature store's split of k was chosen, as ``plan`` and ``inspect`` show it: ``by trace``,
    ``by parameters`` or ``from <the feature store it was taken from>``."""
    return f"by {rule}" if rule in ("trace", "parameters") else f"from {rule}"


def parse_storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    """--storage-options: a JSON object of fsspec options (no credentials: those come from the environment)."""
    if value is None:
        return None
    try:
        options = json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not valid JSON ({err.msg}): {value!r}") from None
    if not isinstance(options, dict):
        raise click.BadParameter(f"expected a JSON object such as '{{\"endpoint_url\": \"http://host:9000\"}}', "
                                 f"got {value!r}")
    return options


def storage_options_flag(what: str = "a URL OUTPUT") -> Callable[[F], F]:
    """``--storage-options JSON`` (parameter ``options``): fsspec options for ``what``, used for URLs only;
    and ``--connect-timeout SECONDS`` (parameter ``connect_timeout``): how long its object store has to answer."""
    options = click.option(
        "--storage-options", "options", callback=parse_storage_options, metavar="JSON",
        help=f'fsspec options for {what}, e.g. \'{{"endpoint_url": "http://127.0.0.1:8333"}}\'; credentials '
             "come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).")
    timeout = click.option(
        "--connect-timeout", "connect_timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
        show_default=True, metavar="SECONDS",
        help=f"Seconds to wait for the object store of {what} to answer before stopping with one line.")

    def both(fn: F) -> F:
        return options(timeout(fn))

    return both


storage_options_option = storage_options_flag()

"""The ``ntk-pipeline`` command. The only place errors become exit codes.

    ntk-pipeline run configs/quickstart.yaml
    ntk-pipeline plan configs/cluster_trace.yaml

A PipelineError prints one line ``Error: <key>: <what is wrong>`` and exits 1; bad flags exit 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pipeline.errors import PipelineError

F = TypeVar("F", bound=Callable[..., Any])


def _fails_cleanly(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _size(n: float) -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if abs(n) < 1024 or prefix == "Pi":
            return f"{n:.1f} {prefix}B" if prefix else f"{n:.0f} B"
        n /= 1024
    raise AssertionError("unreachable")


def _flops(n: float) -> str:
    for prefix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000 or prefix == "E":
            return f"{n:.3g} {prefix}FLOP"
        n /= 1000
    raise AssertionError("unreachable")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ntk-pipeline")
def main() -> None:
    """Empirical neural tangent kernels of PyTorch models, tiled over Ray into a Zarr store."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output store.")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="ray: one Ray task per block; local: every block in this process (for debugging).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@_fails_cleanly
def run(config: str, overwrite: bool | None, executor: str, progress: bool) -> None:
    """Compute the NTK that CONFIG describes into its Zarr store."""
    from pipeline.run import run as run_pipeline

    s = run_pipeline(config, executor=executor, overwrite=overwrite, progress=progress)
    if s.blocks == 0 and s.skipped:
        click.echo(f"nothing to do: all {s.skipped} blocks are done already (method {s.method})")
    else:
        resumed = f" ({s.skipped} done by an earlier run)" if s.skipped else ""
        click.echo(f"done: {s.blocks} blocks{resumed} in {s.seconds:.2f} s, {s.entries:,} kernel entries "
                   f"({s.entries_per_second:,.0f}/s), method {s.method}")
    click.echo(f"output: {s.path}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_fails_cleanly
def plan(config: str, as_json: bool) -> None:
    """Show the blocks, kernel size, task memory and FLOPs of CONFIG, computing nothing."""
    from pipeline.run import describe_plan

    d = describe_plan(config)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"kernel     {d['n1']} x {d['n2']} ({d['mode']}, o={d['o']}, {d['dtype']}), "
               f"{_size(d['kernel_bytes'])}{', symmetric' if d['symmetric'] else ''}")
    click.echo(f"model      {d['p']:,} trainable parameters, {_flops(d['forward_flops_per_sample'])} per forward "
               "sample")
    click.echo(f"blocks     {d['blocks']} tasks of {d['block'][0]} x {d['block'][1]} (grid "
               f"{d['grid'][0]} x {d['grid'][1]})")
    lay = d["layout"]
    chunk = f"{d['chunk'][0]} x {d['chunk'][1]} ({_size(lay['chunk_bytes'])})"
    inner = f"shards of {lay['chunks_per_file']} chunks of {chunk}" if d["sharded"] else "one chunk each"
    click.echo(f"files      {lay['kernel_files']:,} kernel files of up to {_size(lay['bytes_per_file'])} ({inner}), "
               f"{lay['marker_files']:,} block markers")
    chosen = d["method"] + (" (auto: " + d["auto"]["reason"] + ")" if d["auto"] else "")
    click.echo(f"method     {chosen}")
    click.echo(f"{'':11}{'total FLOPs':>16}  {'task memory':>12}")
    for name, m in d["methods"].items():
        mark = "*" if name == d["method"] else " "
        click.echo(f"{mark} {name:<21}{_flops(m['flops']):>14}  {_size(m['task_memory_bytes']):>12}")
    click.echo(f"output     {d['output']}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs per method.")
@click.option("--method", "methods", multiple=True,
              type=click.Choice(["structured", "jacobian_contraction", "ntk_vector_products"]),
              help="Time only these methods (repeatable); all by default.")
@click.option("--in-process", is_flag=True, help="Time in this process (faster; peak memory is then shared).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_fails_cleanly
def bench(config: str, repeats: int, methods: tuple[str, ...], in_process: bool, as_json: bool) -> None:
    """Time each method on the first block of CONFIG (after a warm-up) and show what auto takes."""
    from dataclasses import asdict
    from pathlib import Path

    from pipeline.bench import bench_config
    from pipeline.config import load_config
    from pipeline.plan import METHODS

    cfg = load_config(config)
    r = bench_config(cfg, str(Path(config).resolve().parent), repeats=repeats, methods=methods or METHODS,
                     isolate=not in_process)
    if as_json:
        click.echo(json.dumps({**r, "rows": [asdict(row) for row in r["rows"]]}, indent=2, default=str))
        return
    click.echo(f"block {r['n1']} x {r['n2']} ({r['mode']}), {r['entries']:,} kernel entries, on {r['device']} "
               f"({r['threads']} threads); median of {repeats} runs after a warm-up")
    click.echo(f"{'method':<22}{'seconds':>10}{'entries/s':>14}{'peak memory':>14}{'est. FLOPs':>14}")
    # peak memory: GPU bytes allocated on a GPU; else the peak RSS of the process that timed it
    for row in r["rows"]:
        mem = row.peak_gpu_bytes if row.peak_gpu_bytes is not None else row.peak_rss_bytes
        click.echo(f"{row.method:<22}{row.seconds:>10.4f}{row.entries_per_second:>14,.0f}{_size(mem):>14}"
                   f"{_flops(row.estimated_flops):>14}")
    auto = r["auto"]
    timed = ", ".join(f"{m} {t:.4f} s" for m, t in auto["timings"].items()) or "no timing needed"
    click.echo(f"auto takes: {auto['method']} ({auto['reason']}; probe: {timed})")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--address", envvar="RAY_API_SERVER_ADDRESS", metavar="URL",
              help="The cluster's job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS).")
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends; exit with its outcome.")
@click.option("--no-wait", is_flag=True, help="Return as soon as the job is submitted.")
@click.option("--job-id", help="The submission id to use (default: one Ray makes).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="More files of the config's folder to leave out of the upload (gitignore syntax).")
@click.option("--entrypoint-num-cpus", type=click.FloatRange(0), default=None,
              help="CPUs to reserve for the job's driver (default: none; it only schedules and records).")
@_fails_cleanly
def submit(config: str, address: str | None, follow: bool, no_wait: bool, job_id: str | None,
           exclude: tuple[str, ...], entrypoint_num_cpus: float | None) -> None:
    """Run CONFIG as a Ray job on a cluster: the config's folder travels with the job, whose
    entrypoint is `ntk-pipeline run`. Prints the job id; waits for the job unless --no-wait."""
    from pipeline.submit import job_message, wait
    from pipeline.submit import submit as submit_job

    if follow and no_wait:
        raise click.UsageError("--follow and --no-wait exclude each other")
    jid = submit_job(config, address, job_id=job_id, excludes=exclude, entrypoint_num_cpus=entrypoint_num_cpus)
    click.echo(jid)
    if no_wait:
        return
    status = wait(jid, address, follow=follow, echo=click.echo)
    if status != "SUCCEEDED":
        message = job_message(jid, address)
        click.echo(f"Error: job {jid} {status.lower()}" + (f": {message}" if message else ""), err=True)
        sys.exit(1)
    click.echo(f"job {jid} succeeded")


def _storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
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


storage_options_option = click.option(
    "--storage-options", "options", callback=_storage_options, metavar="JSON",
    help='fsspec options for a URL OUTPUT, e.g. \'{"endpoint_url": "http://127.0.0.1:8333"}\'; credentials '
         "come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).")


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@storage_options_option
@_fails_cleanly
def status(output: str, as_json: bool, options: dict[str, Any] | None) -> None:
    """Progress of the run writing OUTPUT (or that wrote it): blocks done, times, nodes, lease."""
    from pipeline.audit import status as read_status

    s = read_status(output, options)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    trailing = {"full": f" x {s['o']} x {s['o']}", "diagonal": f" x {s['o']}"}
    shape = f"{s['n1']} x {s['n2']}" + trailing.get(s["mode"], "")
    click.echo(f"status     {s['status']}{'' if s['complete'] else ' (incomplete)'}")
    click.echo(f"blocks     {s['blocks_done']} of {s['blocks_total']} done")
    click.echo(f"kernel     {shape} ({s['mode']}, {s['dtype']}), method {s['method']}, blocks of "
               f"{s['block'][0]} x {s['block'][1]}{', symmetric' if s['symmetric'] else ''}")
    click.echo(f"started    {s['started']}" + (f", last run started {s['last_started']}" if s["last_started"] else ""))
    click.echo(f"last write {s['last_write'] or '-'}" + (f", finished {s['finished']}" if s["finished"] else ""))
    if s["nodes"]:
        click.echo("nodes      " + ", ".join(f"{node} ({n} blocks)" for node, n in s["nodes"].items()))
    click.echo(f"lease      {'held by ' + s['lease']['holder'] if s['lease']['held'] else 'free'}")
    if s["error"]:
        click.echo(f"error      {s['error']}")


@main.command()
@click.argument("output")
@click.option("--sample", type=click.IntRange(0), default=2, show_default=True,
              help="Blocks to recompute in float64 with another method.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which blocks --sample picks.")
@storage_options_option
@_fails_cleanly
def verify(output: str, sample: int, seed: int, options: dict[str, Any] | None) -> None:
    """Check OUTPUT: every block marked done, every chunk readable (checksums), samples recomputed."""
    from pipeline.audit import verify as run_verify

    r = run_verify(output, sample=sample, seed=seed, options=options)
    for line in r["checked"]:
        click.echo(f"checked: {line}")
    for line in r["failures"]:
        click.echo(f"FAILED: {line}")
    click.echo("verify: ok" if r["ok"] else f"verify: {len(r['failures'])} failures")
    if not r["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

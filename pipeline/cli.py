"""The ``ntk-pipeline`` command. The only place errors become exit codes.

    ntk-pipeline run configs/quickstart.yaml
    ntk-pipeline plan configs/cluster_trace.yaml

A PipelineError prints one line ``Error: <key>: <what is wrong>`` and exits 1; bad flags exit 2.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from pipeline.cli_common import count, fails_cleanly, numbers, size, split_rule, storage_options_option
from pipeline.config import Method, Mode
from pipeline.execute import EXECUTORS
from pipeline.plan import feature_shape


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
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output store (one ntk-pipeline "
              "wrote; only its own nodes are removed).")
@click.option("--repair", is_flag=True, help="Resume, and also recompute every block whose chunks fail their "
              "checksum, are missing or are not finite (reads the whole kernel), even in a complete store.")
@click.option("--executor", type=click.Choice(list(EXECUTORS)), default="ray", show_default=True,
              help="ray: one Ray task per block; local: every block in this process (on its GPU where it has one).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--allow-edited-source", is_flag=True, help="Resume although the model's source file changed since "
              "the store was created, when its outputs on the recorded rows agree: for an edit that does not change "
              "what the model computes (a comment). Without it such a resume is refused.")
@fails_cleanly
def run(config: str, overwrite: bool | None, repair: bool, executor: str, progress: bool,
        allow_edited_source: bool) -> None:
    """Compute the NTK that CONFIG describes into its Zarr store."""
    from pipeline.errors import stop_on_signals

    if repair and overwrite:
        raise click.UsageError("--repair and --overwrite exclude each other: a repair keeps the good blocks")
    with stop_on_signals(written=False):  # a run's, also while its modules load (fails_cleanly prints it)
        from pipeline.run import run as run_pipeline

        s = run_pipeline(config, executor=executor, overwrite=overwrite, progress=progress, repair=repair,
                         allow_edited_source=allow_edited_source)
    for line in s.repaired:
        click.echo(f"repaired: {line}")
    every = f"all {s.skipped} blocks are" if s.skipped != 1 else "its one block is"
    if s.blocks == 0 and s.skipped and s.repair:
        checks = "passes its" if s.skipped == 1 else "pass their"
        click.echo(f"nothing to repair: {every} done and {checks} checks (crc32c checksums, finite values, "
                   f"mirrored copies) (method {s.method})")
    elif s.blocks == 0 and s.skipped:
        click.echo(f"nothing to do: {every} done already (method {s.method}); --repair checks every chunk and "
                   "recomputes the blocks that fail")
    else:
        resumed = f" ({s.skipped} done by an earlier run)" if s.skipped else ""
        how = f"method {s.method}" if s.features is None else f"k = {s.features.k}, seed {s.features.seed}"
        click.echo(f"done: {count(s.blocks, 'block')}{resumed} in {s.seconds:.2f} s, {s.entries:,} {s.unit} "
                   f"({s.entries_per_second:,.0f}/s), {how}")
        probe = s.features.probe if s.features is not None else None
        if probe is not None:
            click.echo(f"probe: the feature kernel of the first {count(probe.rows, 'sample')} is "
                       f"{probe.relative_error:.2%} from the exact one (relative Frobenius error; eigenvalues within "
                       f"{probe.eigenvalue_error:.2%} of the largest)")
    click.echo(f"output: {s.path}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30,
          "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic in click 8.2+, not in 8.1
    """80GB, 80GiB, 80G (= GiB), 512MiB, or a number of bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
            self.fail(f"expected a size such as 80GB, 80GiB or 512MiB, got {value!r}", param, ctx)
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _bench_file(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        with open(value) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise click.BadParameter(f"cannot read {value} as the JSON of `ntk-pipeline bench --json`: {err}") from None
    if not isinstance(data, dict) or not {"rows", "n1", "n2"} <= data.keys():
        raise click.BadParameter(f"{value} is not the JSON of `ntk-pipeline bench --json` (no rows, n1, n2)")
    return data


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Sizing: block tasks the cluster runs at once (e.g. its GPUs).")
@click.option("--gpu-memory", "memory", type=ByteSize(), default=None,
              help="Sizing: memory of one worker's device (80GB, 80GiB, ...); picks the largest block that fits.")
@click.option("--from-bench", "bench", callback=_bench_file, metavar="BENCH.json",
              help="Sizing: `ntk-pipeline bench CONFIG --json` output on the target device, for a wall-time estimate.")
@click.option("--layers", is_flag=True, help="Also list each layer the structured rules take: its rule and parameters.")
@fails_cleanly
def plan(config: str, as_json: bool, workers: int | None, memory: int | None, bench: dict[str, Any] | None,
         layers: bool) -> None:
    """Show the blocks, kernel size, task memory and FLOPs of CONFIG, computing nothing; with
    --workers/--gpu-memory/--from-bench, also the block that fits, its tasks and the wall time."""
    from pipeline.describe import describe_plan

    d = describe_plan(config, workers=workers, memory_bytes=memory, bench=bench)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    if "features" in d:
        _echo_feature_plan(d)
        return
    _echo_kernel_plan(d)
    if layers:
        click.echo(f"{'layer':<52} {'rule':<10} {'parameters':>10}")
        for site in d["structured_layout"]["sites"]:
            click.echo(f"  {site['name']:<50} {site['kind']:<10} {site['parameters']:>10,}")


def _echo_kernel_plan(d: dict[str, Any]) -> None:
    click.echo(f"kernel     {d['n1']} x {d['n2']} ({d['mode']}, o={d['o']}, {numbers(d['dtype'], d['precision'])}), "
               f"{size(d['kernel_bytes'])}{', symmetric' if d['symmetric'] else ''}")
    click.echo(f"model      {d['p']:,} trainable parameters, {_flops(d['forward_flops_per_sample'])} per forward "
               "sample")
    click.echo(f"blocks     {count(d['blocks'], 'task')} of {d['block'][0]} x {d['block'][1]} (grid "
               f"{d['grid'][0]} x {d['grid'][1]}){_auto_block(d['block_sizing'])}")
    lay = d["layout"]
    chunk = f"{d['chunk'][0]} x {d['chunk'][1]} ({size(lay['chunk_bytes'])})"
    inner = f"shards of {lay['chunks_per_file']} chunks of {chunk}" if d["sharded"] else "one chunk each"
    click.echo(f"files      {lay['kernel_files']:,} kernel files of up to {size(lay['bytes_per_file'])} ({inner}), "
               f"{lay['marker_files']:,} block markers")
    chosen = d["method"] + (" (auto: " + d["auto"]["reason"] + ")" if d["auto"] else "")
    click.echo(f"method     {chosen}")
    lay = d["structured_layout"]
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in lay["by_rule"].items())
    click.echo(f"layers     structured rules cover {lay['covered']:.1%} of the parameters ({kinds or 'none'}); "
               f"per-sample Jacobians for {', '.join(lay['fallback']) or 'none'}")
    if d["fallbacks"]:
        click.echo("fallbacks  " + "; ".join(f"no {t}: {why}" for t, why in d["fallbacks"].items()))
    click.echo(f"{'':11}{'total FLOPs':>16}  {'task memory':>12}")
    for name, m in d["methods"].items():
        mark = "*" if name == d["method"] else " "
        click.echo(f"{mark} {name:<21}{_flops(m['flops']):>14}  {size(m['task_memory_bytes']):>12}")
    click.echo(f"output     {d['output']}")
    if "sizing" in d:
        _echo_sizing(d["sizing"])


def _echo_feature_plan(d: dict[str, Any]) -> None:
    f = d["features"]
    click.echo(f"features   {' x '.join(map(str, d['shape']))} ({numbers(d['dtype'], d['precision'])}), "
               f"{size(d['features_bytes'])}, estimating the {f['of']} kernel (k = {f['k']}, seed {f['seed']}, "
               f"{f['projection']} projection)")
    click.echo(f"model      {d['p']:,} trainable parameters, {_flops(d['forward_flops_per_sample'])} per forward "
               "sample")
    click.echo(f"bands      {count(d['blocks'], 'task')} of {count(d['block'][0], 'row')} "
               f"({size(d['band_bytes'])} each)")
    parts = sorted(f["split"].items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{name} {n}" for name, n in parts[:6]) + (f", {len(parts) - 6} more" if len(parts) > 6 else "")
    click.echo(f"split      {shown} ({split_rule(f['split_rule'])})")
    if d["fallbacks"]:
        click.echo("fallbacks  " + "; ".join(f"no {t}: {why}" for t, why in d["fallbacks"].items()))
    click.echo(f"output     {d['output']}")


def _auto_block(z: dict[str, Any] | None) -> str:
    """How tiling.block: auto chose the block, as ``plan`` and ``status`` show it; '' for a given block."""
    if z is None:
        return ""
    fits = f"{z['headroom']:.0%} of {size(z['memory_bytes'])} ({z['source']})"
    why = {"memory": f"the largest whose task ({size(z['task_memory_bytes'])}) fits {fits}",
           "kernel": f"the whole kernel, whose task ({size(z['task_memory_bytes'])}) fits {fits}",
           "balance": f"a block that fits {fits}, halved for at least 4 tasks per worker ({z['workers']} at once)"}
    return f"; tiling.block auto: {why[z['limited_by']]}"


def _echo_sizing(z: dict[str, Any]) -> None:
    fits = {"memory": f", the largest whose task fits {size(z['memory_bytes'])} with 20% headroom",
            "balance": ", small enough for at least 4 tasks per worker (task memory allows more)",
            "kernel": f", the whole kernel: its task fits {size(z['memory_bytes'])} with 20% headroom",
            "config": " (tiling.block)"}[z["block_limited_by"]]
    click.echo(f"sizing     {count(z['workers'], 'worker')}: blocks of {z['block'][0]} x {z['block'][1]}{fits}; "
               f"{z['tasks']:,} task{'' if z['tasks'] == 1 else 's'}; {size(z['task_memory_bytes'])} per task; "
               f"{_flops(z['total_flops'])} "
               f"with {z['method']}")
    e = z.get("estimate")
    if e:
        h = e["wall_seconds"] / 3600
        click.echo(f"estimate   {e['seconds_per_block']:.3g} s per block ({e['flops_per_second'] / 1e9:.3g} GFLOP/s as "
                   f"benched on a {e['bench_block'][0]} x {e['bench_block'][1]} block on {e['bench_device']}); "
                   f"wall ~{h:.3g} h ({e['wall_seconds'] / 86400:.3g} days) on {count(z['workers'], 'worker')}, "
                   "block compute only")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs per method.")
@click.option("--method", "methods", multiple=True,
              type=click.Choice([m.value for m in Method if m != Method.AUTO]),
              help="Time only these methods (repeatable); all by default.")
@click.option("--in-process", is_flag=True, help="Time in this process (faster; peak memory is then shared).")
@click.option("--peak-size", type=click.IntRange(0), default=None, metavar="N",
              help="n of the n x n x n matrix product that measures the device's peak rate (default 8192 on "
                   "CUDA, 2048 on the CPU; 0: not measured).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@fails_cleanly
def bench(config: str, repeats: int, methods: tuple[str, ...], in_process: bool, peak_size: int | None,
          as_json: bool) -> None:
    """Time each method on the first block of CONFIG (after a warm-up) and show what auto takes.

    Rates count the block's work as Jacobian contraction (2 n1 n2 o^2 P for full, 2 n1 n2 o P for trace and
    diagonal, 2 n1 n2 P for pntk) whatever the method, and compare it with the device's matrix-product rate
    measured in the same run (float32 and TF32 on CUDA; the run's dtype on the CPU, with bench's threads)."""
    from dataclasses import asdict
    from pathlib import Path

    from pipeline.bench import bench_config
    from pipeline.config import load_config
    from pipeline.methods import METHODS

    cfg = load_config(config)
    chosen = tuple(map(Method, methods)) or METHODS
    r = bench_config(cfg, str(Path(config).resolve().parent), repeats=repeats, methods=chosen,
                     isolate=not in_process, peak_size=peak_size)
    if as_json:
        click.echo(json.dumps({**r, "rows": [asdict(row) for row in r["rows"]],
                               "peaks": {k: asdict(v) for k, v in r["peaks"].items()}}, indent=2, default=str))
        return
    _echo_bench(r, repeats)


def _rate(n: float) -> str:
    return _flops(n) + "/s"


def _echo_bench(r: dict[str, Any], repeats: int) -> None:
    click.echo(f"block {r['n1']} x {r['n2']} ({r['mode']}), {r['entries']:,} kernel entries, on {r['device']} "
               f"({r['device_name']}, {count(r['threads'], 'thread')}); median of {count(repeats, 'run')} after a "
               "warm-up")
    per_pair = {Mode.FULL: "o^2 ", Mode.PNTK: ""}.get(r["mode"], "o ")
    click.echo(f"work       {_flops(r['contraction_flops'])} counted as Jacobian contraction (2 n1 n2 {per_pair}P, "
               f"o = {r['o']}, P = {r['p']:,})")
    peaks = r["peaks"]
    if peaks:
        first = next(iter(peaks.values()))
        click.echo("peak       " + ", ".join(f"{k} {_rate(v.flops_per_second)}" for k, v in peaks.items())
                   + f" ({first.n}^3 matrix products, median of {len(first.runs)}, this run)")
    click.echo(f"{'method':<22}{'seconds':>10}{'entries/s':>14}{'peak memory':>14}{'est. FLOPs':>14}{'JC rate':>16}"
               + "".join(f"{'of ' + k:>12}" for k in peaks))
    # peak memory: GPU bytes allocated on a GPU; else the peak RSS of the process that timed it
    for row in r["rows"]:
        mem = row.peak_gpu_bytes if row.peak_gpu_bytes is not None else row.peak_rss_bytes
        click.echo(f"{row.method:<22}{row.seconds:>10.4f}{row.entries_per_second:>14,.0f}{size(mem):>14}"
                   f"{_flops(row.estimated_flops):>14}{_rate(row.contraction_flops_per_second):>16}"
                   + "".join(f"{row.fraction_of_peak[k]:>12.1%}" for k in peaks))
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
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              metavar="SECONDS", help="Seconds to wait for the job server to answer before stopping with one line.")
@fails_cleanly
def submit(config: str, address: str | None, follow: bool, no_wait: bool, job_id: str | None,
           exclude: tuple[str, ...], entrypoint_num_cpus: float | None, connect_timeout: float) -> None:
    """Run CONFIG as a Ray job on a cluster: the config's folder travels with the job, whose
    entrypoint is `ntk-pipeline run`. Prints the job id; waits for the job unless --no-wait."""
    from pipeline.submit import job_message, wait
    from pipeline.submit import submit as submit_job

    if follow and no_wait:
        raise click.UsageError("--follow and --no-wait exclude each other")
    jid = submit_job(config, address, job_id=job_id, excludes=exclude, entrypoint_num_cpus=entrypoint_num_cpus,
                     timeout=connect_timeout)
    click.echo(jid)
    if no_wait:
        return
    status = wait(jid, address, follow=follow, echo=click.echo)
    if status != "SUCCEEDED":
        message = job_message(jid, address)
        click.echo(f"Error: job {jid} {status.lower()}" + (f": {message}" if message else ""), err=True)
        sys.exit(1)
    click.echo(f"job {jid} succeeded")


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@storage_options_option
@fails_cleanly
def status(output: str, as_json: bool, options: dict[str, Any] | None, connect_timeout: float) -> None:
    """Progress of the run writing OUTPUT (or that wrote it): blocks done, times, nodes, devices, lease."""
    from pipeline.audit import status as read_status

    s = read_status(output, options, connect_timeout)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    trailing = {Mode.FULL: f" x {s['o']} x {s['o']}", Mode.DIAGONAL: f" x {s['o']}"}
    shape = f"{s['n1']} x {s['n2']}" + trailing.get(s["mode"], "")
    why = "; ".join(w for w in ("" if s["complete"] else "incomplete", s["status_reason"]) if w)
    click.echo(f"status     {s['status']}" + (f" ({why})" if why else ""))
    click.echo(f"blocks     {s['blocks_done']} of {s['blocks_total']} done")
    f = s["features"]
    if f is not None:  # a feature run: bands of rows
        shape = " x ".join(map(str, feature_shape(s["n1"], s["o"], f["k"], f["of"])))
        click.echo(f"features   {shape} ({numbers(s['dtype'], s['precision'])}), estimating the {f['of']} kernel, "
                   f"seed {f['seed']}, bands of {s['block'][0]} rows")
        if "probe" in f:
            click.echo(f"probe      {f['probe']['relative_error']:.2%} relative Frobenius error on the first "
                       f"{count(f['probe']['rows'], 'sample')}")
    else:
        click.echo(f"kernel     {shape} ({s['mode']}, {numbers(s['dtype'], s['precision'])}), method {s['method']}, "
                   f"blocks of {s['block'][0]} x {s['block'][1]}{', symmetric' if s['symmetric'] else ''}"
                   f"{_auto_block(s['block_sizing'])}")
    click.echo(f"started    {s['started']}" + (f", last run started {s['last_started']}" if s["last_started"] else ""))
    click.echo(f"last write {s['last_write'] or '-'}" + (f", finished {s['finished']}" if s["finished"] else ""))
    if s["nodes"]:
        click.echo("nodes      " + ", ".join(f"{node} ({count(n, 'block')})" for node, n in s["nodes"].items()))
    if s["devices"]:
        click.echo("devices    " + ", ".join(f"{device} ({count(n, 'block')})" for device, n in s["devices"].items()))
    click.echo(f"lease      {'held by ' + s['lease']['holder'] if s['lease']['held'] else 'free'}")
    if s["error"]:
        click.echo(f"error      {s['error']}")


@main.command()
@click.argument("output")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The config of the run that wrote OUTPUT: --sample blocks are recomputed from it (never from "
                   "the store's own record), once it matches the recorded config and fingerprints. For a feature "
                   "store, also the exact kernel of the sampled bands' rows, to measure the features' accuracy.")
@click.option("--sample", type=click.IntRange(0), default=2, show_default=True,
              help="Blocks (a feature store's bands) to recompute in float64 with another method (needs --config).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which blocks --sample picks.")
@click.option("--against", metavar="KERNEL", default=None,
              help="A feature store only: the exact kernel store of the same inputs and model (a run with mode "
                   "trace, full or pntk); reports the feature kernel's relative Frobenius error and leading "
                   "eigenvalues against it.")
@click.option("--eigenvalues", type=click.IntRange(0), default=10, show_default=True,
              help="Leading eigenvalues compared when the accuracy is measured (0: none).")
@click.option("--max-error", type=click.FloatRange(min=0), default=None, metavar="X",
              help="Fail (exit 1) when the feature kernel's relative Frobenius error exceeds X (or was not measured).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@storage_options_option
@fails_cleanly
def verify(output: str, config: str | None, sample: int, seed: int, against: str | None, eigenvalues: int,
           max_error: float | None, as_json: bool, options: dict[str, Any] | None, connect_timeout: float) -> None:
    """Check OUTPUT: every block marked done, every chunk readable (checksums), finite and symmetric;
    with --config CONFIG, --sample blocks recomputed from CONFIG. For a feature store, measure the
    accuracy of its kernel: against a stored exact kernel (--against) or on the sampled bands (--config)."""
    from pipeline.audit import verify as run_verify

    r = run_verify(output, sample=sample, seed=seed, options=options, config=config, timeout=connect_timeout,
                   against=against, eigenvalues=eigenvalues, max_error=max_error)
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        for line in r["checked"]:
            click.echo(f"checked: {line}")
        if r["accuracy"] is not None:
            _echo_accuracy(r["accuracy"])
        for line in r["failures"]:
            click.echo(f"FAILED: {line}")
        click.echo("verify: ok" if r["ok"] else f"verify: {count(len(r['failures']), 'failure')}")
    if not r["ok"]:
        sys.exit(1)


def _echo_accuracy(a: dict[str, Any]) -> None:
    """verify's measurement of a feature kernel's accuracy, in a few lines."""
    if a["against"] == "sample":
        what = (f"the exact kernel of {a['rows']} sampled row{'' if a['rows'] == 1 else 's'} "
                f"({count(len(a['blocks']), 'block')}, float64, computed here)")
    else:
        what = f"{a['against']} ({count(a['rows'], 'sample')})"
    click.echo(f"accuracy: the features' {a['mode']} kernel against {what}: relative Frobenius error "
               f"{a['relative_error']:.3e}")
    if a["eigenvalue_error"] is not None:
        where = " (of the sampled diagonal block where they differ most)" if a["against"] == "sample" else ""
        click.echo(f"accuracy: its {count(len(a['eigenvalues']), 'leading eigenvalue')}{where} within "
                   f"{a['eigenvalue_error']:.3e} of the largest exact one (max_i |lambda_i(K_phi) - lambda_i(K)| "
                   "/ lambda_1(K))")
        for i, e in enumerate(a["eigenvalues"], 1):
            click.echo(f"  lambda_{i:<3} {e['features']:.6g} (features)  {e['exact']:.6g} (exact)")


from pipeline.cli_kernel import register  # noqa: E402  (the commands that use a finished kernel)

register(main)

if __name__ == "__main__":
    main()

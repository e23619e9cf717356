"""The commands that use a stored kernel: ``inspect``, ``plot``, ``analyze`` and ``predict``;
``register(main)`` attaches them to the ``ntk-pipeline`` group.

    ntk-pipeline inspect out/quickstart.zarr --json
    ntk-pipeline analyze out/train.zarr --targets y.npy --against out/later.zarr
    ntk-pipeline plot out/quickstart.zarr -o kernel.png
    ntk-pipeline predict --train-kernel train.zarr --test-kernel test.zarr --targets y.npy -o pred.npy
    ntk-pipeline predict --train-features f_train.zarr --test-features f_test.zarr --targets y.npy -o pred.npy
    ntk-pipeline inspect s3://bucket/train.zarr --storage-options '{"endpoint_url": "http://127.0.0.1:8333"}'

Kernels may be fsspec URLs (``--storage-options``: their fsspec options; credentials come from the
environment); targets and written files are local. As in pipeline.cli (pipeline.cli_common): a
PipelineError prints one line ``Error: <key or file>: <what is wrong>`` and exits 1, and a file is
written (atomically) only when everything before it succeeded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import IO, Any

import click

from pipeline.cli_common import (
    count,
    fails_cleanly,
    numbers,
    size,
    split_rule,
    storage_options_flag,
    storage_options_option,
)
from pipeline.config import Mode, feature_mode
from pipeline.errors import ConfigError, StoreError, brief
from pipeline.kernel import EXECUTORS


def _check_writable(path: str) -> None:
    """Refuse an output file whose folder is missing or which is a folder, before any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(path, "is a folder; expected a file name")
    if not os.path.isdir(folder):
        raise ConfigError(path, f"its folder {os.path.dirname(path) or '.'} does not exist")


def _write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``: all or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:
        raise StoreError(path, f"cannot write it: {brief(err)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


@click.command()
@click.argument("output")
@click.option("--stats/--no-stats", default=True, show_default=True,
              help="Compute min, max, mean and diagonal mean (one read of the whole kernel, tile by tile).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@storage_options_option
@fails_cleanly
def inspect(output: str, stats: bool, as_json: bool, options: dict[str, Any] | None, connect_timeout: float) -> None:
    """Shape, dtype, chunks, bytes, method, provenance, completeness and statistics of the kernel (or the
    sketched features) in OUTPUT."""
    from pipeline.feature_store import features_of
    from pipeline.kernel import open_store

    store = open_store(output, options, connect_timeout)
    features = store.mode == Mode.FEATURES
    d = features_of(store).describe(stats=stats) if features else store.describe(stats=stats)
    if as_json:
        click.echo(json.dumps(d, indent=2))
    elif features:
        _echo_features(d)
    else:
        _echo_kernel(d)


def _echo_kernel(d: dict[str, Any]) -> None:
    """``inspect``'s lines for a kernel store."""
    click.echo(f"kernel     {' x '.join(map(str, d['shape']))} ({d['mode']}, {numbers(d['dtype'], d['precision'])}), "
               f"dims {', '.join(d['dims'])}{', symmetric K(x, x)' if d['symmetric'] else ''}")
    _echo_storage(d)
    _echo_run(d, d["method"], f"{d['blocks_done']} of {count(d['blocks_total'], 'block')}")
    s = d["stats"]
    if s is not None:
        click.echo(f"values     min {_num(s['min'])}, max {_num(s['max'])}, mean {_num(s['mean'])}, diagonal mean "
                   f"{_num(s['diagonal_mean'])}; {s['not_computed']:,} of {s['entries']:,} entries not computed")


def _echo_storage(d: dict[str, Any]) -> None:
    """``inspect``'s storage line, for a kernel and a feature store alike."""
    shards = f", in shards of {' x '.join(map(str, d['shards']))}" if d["shards"] else ""
    click.echo(f"storage    chunks {' x '.join(map(str, d['chunks']))}{shards}; {size(d['nbytes'])} "
               f"({size(d['stored_bytes'])} stored)")


def _echo_run(d: dict[str, Any], method: str, done: str) -> None:
    """``inspect``'s method and status lines (``done``: "3 of 6 blocks", "2 of 4 bands"), then the model,
    versions and times from the store's record: for a kernel and a feature store alike."""
    click.echo(f"method     {method}")
    click.echo(f"status     {d['status']}, {done} done" + ("" if d["complete"] else " (incomplete)"))
    prov = d["provenance"]
    fps = ", ".join(f"{k} {v[:15] + '...' if v else '-'}" for k, v in (prov["fingerprints"] or {}).items())
    click.echo(f"model      p = {prov['p']:,} trainable parameters; fingerprints {fps}")
    click.echo(f"versions   {', '.join(f'{k} {v}' for k, v in (prov['versions'] or {}).items())}")
    click.echo(f"times      started {prov['started'] or '-'}, finished {prov['finished'] or '-'}")


def _echo_features(d: dict[str, Any]) -> None:
    """``inspect``'s lines for a feature store (``Features.describe``)."""
    click.echo(f"features   {' x '.join(map(str, d['shape']))} ({numbers(d['dtype'], d['precision'])}), dims "
               f"{', '.join(d['dims'])}; estimating the {d['of']} kernel (reads as {', '.join(d['reads_as'])}), "
               f"k = {d['k']}, seed {d['seed']}")
    _echo_storage(d)
    parts = sorted(d["split"].items(), key=lambda kv: -kv[1])
    more = f", {len(parts) - 4} more" if len(parts) > 4 else ""
    click.echo(f"split      {', '.join(f'{name} {k}' for name, k in parts[:4])}{more} (features per part, "
               f"{split_rule(d['split_rule'])})")
    p = d["probe"]
    click.echo("probe      none (the run has not completed)" if p is None else
               f"probe      {p['relative_error']:.2%} relative Frobenius error against the exact kernel on the first "
               f"{count(p['rows'], 'sample')}; eigenvalues within {p['eigenvalue_error']:.2%} of the largest")
    _echo_run(d, f"{d['provenance']['method']} (its per-layer factors)",
              f"{d['bands_done']} of {count(d['bands_total'], 'band')}")
    s = d["stats"]
    if s is not None:
        over = "" if feature_mode(d["of"]) == Mode.PNTK else ", summed over outputs"
        click.echo(f"norms      ||phi_i||^2 (the kernel's diagonal{over}) min {_num(s['norm_min'])}, "
                   f"max {_num(s['norm_max'])}, mean {_num(s['norm_mean'])}; {s['not_computed']:,} of "
                   f"{s['entries']:,} values not computed (NaN)")


@click.command()
@click.argument("output")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The PNG file to write.")
@click.option("--size", type=click.IntRange(1), default=256, show_default=True,
              help="Most bins per side of the heatmap (the kernel is averaged over square bins).")
@click.option("--eigenvalues", type=click.IntRange(0), default=50, show_default=True,
              help="Leading eigenvalues to plot (a K(x, x) only; 0: none).")
@click.option("--spectrum", type=click.Choice(["randomized", "lanczos"]), default="randomized", show_default=True,
              help="randomized: few reads of the kernel; lanczos: exact to machine precision, more reads.")
@click.option("--dpi", type=click.IntRange(10, 1000), default=100, show_default=True,
              help="Pixels per inch; each panel is 6 x 5 inches.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
              help="Where products with the kernel run: in this process, as Ray tasks, or Ray for kernels >= 2 GiB "
                   "(a feature store's: in this process).")
@storage_options_option
@fails_cleanly
def plot(output: str, out: str, size: int, eigenvalues: int, spectrum: str, dpi: int, executor: str,
         options: dict[str, Any] | None, connect_timeout: float) -> None:
    """Plot the kernel in OUTPUT (a heatmap, and for a K(x, x) its eigenvalue spectrum) into a PNG; for
    a feature store, the kernel of its features, never formed."""
    from pipeline.feature_store import features_of
    from pipeline.kernel import Products, open_store
    from pipeline.spectrum import plot_features, plot_kernel

    _check_writable(out)
    k = open_store(output, options, connect_timeout)
    if k.mode == Mode.FEATURES:  # products with the features run here (two band reads each)
        fig, info = plot_features(features_of(k), size=size, eigenvalues=eigenvalues, method=spectrum, dpi=dpi)
    else:
        with Products(k, executor) as products:
            fig, info = plot_kernel(k, size=size, eigenvalues=eigenvalues, method=spectrum, dpi=dpi,
                                    products=products)
    _write_atomically(out, lambda f: fig.savefig(f, format="png"))
    click.echo(f"heatmap    {info['heatmap'][0]} x {info['heatmap'][1]} bins of {info['bin']} x {info['bin']} samples")
    ev = info["eigenvalues"]
    read = "features" if k.mode == Mode.FEATURES else "kernel"
    if ev is None:
        click.echo(f"spectrum   none: {info['skipped']}")
    else:
        click.echo(f"spectrum   {count(len(ev), 'leading eigenvalue')} ({info['method']}, "
                   f"{count(info['passes'], 'read')} of the {read}): {ev[0]:.4g} ... {ev[-1]:.4g}")
    click.echo(f"output     {out} ({info['width']} x {info['height']} pixels)")


@click.command()
@click.argument("output")
@click.option("--targets", default=None,
              help="A .npy of shape (n,) or (n, k) (trace, pntk) or (n, o) (full, diagonal): the centered "
                   "kernel-target alignment. Needs a K(x1, x1).")
@click.option("--against", default=None,
              help="Another store of the same inputs (e.g. another checkpoint, or the exact kernel of a feature "
                   "store): the kernel distance 1 - <K1, K2> / (||K1|| ||K2||), both read in lockstep.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@storage_options_flag("URL stores, the same for OUTPUT and --against (--targets is a local file)")
@fails_cleanly
def analyze(output: str, targets: str | None, against: str | None, as_json: bool, options: dict[str, Any] | None,
            connect_timeout: float) -> None:
    """Trace, Frobenius norm, effective rank, target alignment and distance of the kernel in OUTPUT (one read),
    or of the kernel of the sketched features in OUTPUT (from their Gram matrices, never the kernel)."""
    from pipeline.analyze import analyze as run_analyze

    a = run_analyze(output, targets, against, options=options, timeout=connect_timeout, keys=("--targets", "--against"))
    if as_json:
        click.echo(json.dumps(a.to_dict(), indent=2))
        return
    square = "needs a K(x1, x1) (data.x2 left out)"
    click.echo(f"{a.kind:<16}{' x '.join(map(str, a.shape))} ({a.mode}), analysed as {a.matrix}")
    click.echo(f"frobenius       {a.frobenius:.10g}")
    click.echo(f"trace           {square if a.trace is None else f'{a.trace:.10g}'}")
    click.echo(f"effective rank  {square if a.effective_rank is None else f'{a.effective_rank:.10g}'}"
               + ("" if a.effective_rank is None else "  ((tr K)^2 / ||K||_F^2)"))
    if targets is not None:
        click.echo(f"alignment       {_num(a.alignment)}  (centered, with {targets})")
    if against is not None:
        click.echo(f"distance        {_num(a.distance)}  (1 - <K1, K2> / (||K1|| ||K2||), against {against})")
    once = "each store once" if all(k == 1 for k in a.reads.values()) else "reads of each store"
    click.echo(f"read            {once} ({', '.join(f'{p}: {k}' for p, k in a.reads.items())}), {a.seconds:.2f} s")


@click.command()
@click.option("--train-kernel", default=None, help="K(train, train): a store computed with data.x2 left out.")
@click.option("--test-kernel", default=None, help="K(test, train): a store with x1 = test and x2 = train inputs.")
@click.option("--train-features", default=None,
              help="Instead of kernels: features of the train inputs (a store of ntk.mode: features).")
@click.option("--test-features", default=None,
              help="Features of the test inputs: the same model, ntk.dtype and ntk.features (k, seed, of).")
@click.option("--targets", required=True, help="Training targets, a .npy of shape (n_train, k); (n_train, o) for full.")
@click.option("--diag-reg", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Added to the train kernel's diagonal, times the mean of that diagonal (neural-tangents' scale).")
@click.option("--time", "t", type=click.FloatRange(min=0), default=None,
              help="Training time in steps of gradient descent (times --learning-rate); default: infinity.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--mode", type=click.Choice(["full", "trace"]), default=None,
              help="Features only: the kernel of full or trace features to predict with (default: ntk.features.of).")
@click.option("--band-bytes", type=click.IntRange(1), default=None,
              help="Features only: bytes of features per read (default 64 MiB; at least one chunk).")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True,
              help="Kernels: relative residual (t = infinity) or relative change (finite t) at which the solver stops.")
@click.option("--maxiter", type=click.IntRange(1), default=1000, show_default=True,
              help="Kernels: most iterations, each one read of the train kernel.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
              help="Kernels: where products run: in this process, as Ray tasks, or Ray for kernels >= 2 GiB.")
@click.option("--ray-address", default=None, help="Kernels: a Ray cluster to join (default: a local instance).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The .npy file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
@storage_options_flag("URL stores, the same for the train and the test store (targets and -o are local files)")
@fails_cleanly
def predict(train_kernel: str | None, test_kernel: str | None, train_features: str | None,
            test_features: str | None, targets: str, diag_reg: float, t: float | None, learning_rate: float,
            mode: str | None, band_bytes: int | None, tol: float, maxiter: int, executor: str,
            ray_address: str | None, out: str, as_json: bool, options: dict[str, Any] | None,
            connect_timeout: float) -> None:
    """Predict the linearized network trained on MSE (to convergence, or for --time) on the test inputs, from
    kernels (--train-kernel, --test-kernel) or from features (--train-features, --test-features)."""
    _check_writable(out)
    train, test, features = _predict_inputs(train_kernel, test_kernel, train_features, test_features)
    if features:
        _predict_features(train, test, targets, diag_reg, t, learning_rate, mode, band_bytes, out, as_json, options,
                          connect_timeout)
    else:
        _predict_kernels(train, test, targets, diag_reg, t, learning_rate, tol, maxiter, executor, ray_address, out,
                         as_json, options, connect_timeout)


# The options of one kind of input only: given on the command line with the other kind, they are refused.
KERNEL_ONLY = ("tol", "maxiter", "executor", "ray_address")
FEATURES_ONLY = ("mode", "band_bytes")


def _predict_inputs(train_kernel: str | None, test_kernel: str | None, train_features: str | None,
                    test_features: str | None) -> tuple[str, str, bool]:
    """(train, test, whether they are features); ConfigError naming the flag unless exactly one pair is
    given, and for an option of the other kind given on the command line."""
    kernels, features = (train_kernel, test_kernel), (train_features, test_features)
    if any(kernels) and any(features):
        raise ConfigError("--train-features", "predict from kernels (--train-kernel, --test-kernel) or from "
                          "features (--train-features, --test-features), not both")
    pair = ("--train-features", "--test-features") if any(features) else ("--train-kernel", "--test-kernel")
    train, test = features if any(features) else kernels
    if train is None or test is None:
        raise ConfigError(pair[0] if train is None else pair[1], f"missing: give {pair[0]} and {pair[1]}"
                          + ("" if any(features) else " (or --train-features and --test-features)"))
    ctx = click.get_current_context()
    for name in FEATURES_ONLY if not any(features) else KERNEL_ONLY:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            flag = "--" + name.replace("_", "-")
            other = "kernels (--train-kernel)" if any(features) else "features (--train-features)"
            raise ConfigError(flag, f"applies to predictions from {other} only")
    return train, test, any(features)


def _predict_kernels(train_kernel: str, test_kernel: str, targets: str, diag_reg: float, t: float | None,
                     learning_rate: float, tol: float, maxiter: int, executor: str, ray_address: str | None,
                     out: str, as_json: bool, options: dict[str, Any] | None, connect_timeout: float) -> None:
    import numpy as np

    from pipeline.predict import predict as run_predict

    p = run_predict(train_kernel, test_kernel, targets, diag_reg=diag_reg, time=t, learning_rate=learning_rate,
                    tol=tol, maxiter=maxiter, executor=executor, ray_address=ray_address, options=options,
                    timeout=connect_timeout)
    _write_atomically(out, lambda f: np.save(f, p.values))
    if as_json:
        click.echo(json.dumps({
            "output": out, "shape": list(p.values.shape), "solver": p.solver, "time": t, "iterations": p.iterations,
            "residual": p.residual, "change": p.change, "diag_reg": diag_reg, "diag_reg_absolute": p.diag_reg,
            "passes": p.passes, "executor": p.executor, "seconds": round(p.seconds, 3),
        }))
        return
    when = "t = infinity" if t is None else f"t = {t:g} steps x learning rate {learning_rate:g}"
    click.echo(f"solver     {'conjugate gradients (Jacobi)' if p.solver == 'cg' else 'Lanczos'}, {when}, "
               f"diag_reg {diag_reg:g} x mean(diag) = {p.diag_reg:.4g}")
    accuracy = (f"relative residual {p.residual:.3g}" if p.residual is not None
                else f"relative change {p.change:.3g}")
    click.echo(f"solved     {p.iterations} iterations, {accuracy} (tol {tol:g})")
    click.echo(f"read       the train kernel {p.passes} times, the test kernel once ({p.executor}), {p.seconds:.2f} s")
    click.echo(f"output     {out}: {' x '.join(map(str, p.values.shape))} float64")


def _predict_features(train: str, test: str, targets: str, diag_reg: float, t: float | None, learning_rate: float,
                      mode: str | None, band_bytes: int | None, out: str, as_json: bool,
                      options: dict[str, Any] | None, connect_timeout: float) -> None:
    """Fit on the train features (every check first), then write the predictions band by band, atomically."""
    import time as clock

    from pipeline.feature_store import BAND_BYTES
    from pipeline.predict import fit_features, save_bands

    t0 = clock.perf_counter()
    fit = fit_features(train, test, targets, diag_reg=diag_reg, time=t, learning_rate=learning_rate, mode=mode,
                       band_bytes=band_bytes or BAND_BYTES, options=options, timeout=connect_timeout)
    _write_atomically(out, lambda f: save_bands(f, fit.shape, fit.predictions()))
    seconds, test_bands = clock.perf_counter() - t0, len(fit.bands())
    if as_json:
        click.echo(json.dumps({
            "output": out, "shape": list(fit.shape), "mode": str(fit.mode), "solver": fit.solver, "d": fit.d,
            "rank": fit.rank, "time": t, "residual": fit.residual, "diag_reg": diag_reg,
            "diag_reg_absolute": fit.diag_reg, "bands": {"train": fit.train_bands, "test": test_bands},
            "seconds": round(seconds, 3),
        }))
        return
    when = "t = infinity" if t is None else f"t = {t:g} steps x learning rate {learning_rate:g}"
    how = "Cholesky" if fit.solver == "cholesky" else "eigendecomposition"
    click.echo(f"solver     {how} of the {fit.d} x {fit.d} feature Gram ({fit.mode} kernel), {when}, "
               f"diag_reg {diag_reg:g} x mean(diag) = {fit.diag_reg:.4g}")
    if fit.residual is not None:
        click.echo(f"solved     relative residual {fit.residual:.3g}")
    elif t is None:
        click.echo(f"solved     minimum-norm least squares: {fit.rank} of {fit.d} eigenvalues above the cutoff")
    else:
        click.echo(f"solved     closed form over the {fit.d} eigenvalues")
    bands = [f"{b} band{'' if b == 1 else 's'}" for b in (fit.train_bands, test_bands)]
    click.echo(f"read       the train features once ({bands[0]}), the test features once ({bands[1]}), {seconds:.2f} s")
    click.echo(f"output     {out}: {' x '.join(map(str, fit.shape))} float64")


def register(group: click.Group) -> None:
    """Attach inspect, plot, analyze and predict to the ``ntk-pipeline`` group."""
    for command in (inspect, plot, analyze, predict):
        group.add_command(command)

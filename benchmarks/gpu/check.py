"""The helper of benchmarks/gpu_check.sh: derived configs, the table's rows, the end-to-end run's size.

    python benchmarks/gpu/check.py derive SRC DST --set data.x1.synthetic.n=24 --drop ntk.device
    python benchmarks/gpu/check.py bench-rows --rows R.jsonl --name mlp --json b.json --target jacobian_contraction=0.6
    python benchmarks/gpu/check.py e2e-size --bench bench_resnet18.json --budget 240 --n 10000 --block 1000
    python benchmarks/gpu/check.py e2e-rows --rows R.jsonl --store e2e.zarr --wall 93.1 --n 10000 --asked 10000
    python benchmarks/gpu/check.py table --rows R.jsonl --json $OUT/gpu_check.json

Rows are JSON lines {what, figure, target, status, note}; status is pass, fail, skip or info. Only
``e2e-rows`` imports pipeline (its tiling arithmetic); nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

# Issue 14's targets on one H100/H200.
JC_TFLOPS_TARGET = 26.0  # the ResNet-18 CIFAR pntk run, counted as Jacobian contraction (4 A100s' rate in the anchor)
BUSY_TARGET = 0.8  # block compute / wall on that run
SAFETY = 1.3  # the e2e sizing's margin on its time estimate


def add_row(rows: str, what: str, figure: str, target: str = "-", status: str = "info", note: str = "") -> None:
    with open(rows, "a") as f:
        f.write(json.dumps({"what": what, "figure": figure, "target": target, "status": status, "note": note}) + "\n")


def derive(src: str, dst: str, sets: list[str], drops: list[str]) -> None:
    """A copy of a config with dotted keys set (``a.b=YAML``) or removed; relative paths made absolute."""
    cfg = yaml.safe_load(Path(src).read_text())
    out = cfg.get("output", {}).get("path")
    if out and "://" not in out and not Path(out).is_absolute():
        cfg["output"]["path"] = str((Path(src).resolve().parent / out).resolve())
    for item in sets:
        key, value = item.split("=", 1)
        *head, last = key.split(".")
        node = cfg
        for part in head:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    for key in drops:
        *head, last = key.split(".")
        node = cfg
        for part in head:
            node = node.get(part, {})
        node.pop(last, None)
    Path(dst).write_text(yaml.safe_dump(cfg, sort_keys=False))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def rate(flops_per_second: float) -> str:
    """``51.2 TFLOP/s``, ``180 GFLOP/s``: three significant digits and a prefix."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops_per_second >= scale:
            return f"{flops_per_second / scale:.3g} {prefix}FLOP/s"
    return f"{flops_per_second:.3g} FLOP/s"


def judged(ok: bool, dry: bool) -> str:
    """pass or fail; ``info`` in a CPU dry run, where the GPU targets do not apply."""
    return "info" if dry else "pass" if ok else "fail"


DRY_NOTE = "dry run on the CPU: the target applies on a GPU"


def bench_rows(rows: str, name: str, path: str, targets: list[str], peaks: bool, dry: bool = False) -> None:
    """One row per benched method (seconds, JC-counted rate, fractions of the measured peaks), and with
    ``peaks`` one row per measured matrix-product rate."""
    d = json.loads(Path(path).read_text())
    want = {m: float(f) for m, f in (t.split("=") for t in targets)}
    where = f"{d['n1']} x {d['n2']} {d['mode']}"
    if peaks:
        for k, p in d["peaks"].items():
            add_row(rows, f"matmul peak {k} ({d['device_name']})", rate(p["flops_per_second"]),
                    note=f"{p['n']}^3, median of {len(p['runs'])}")
    for r in d["rows"]:
        frac = r["fraction_of_peak"]
        fig = (f"{r['seconds']:.3f} s, {rate(r['contraction_flops_per_second'])} JC; "
               + ", ".join(f"{_pct(v)} of {k}" for k, v in frac.items()))
        target, status = "-", "info"
        note = (f"{d['dtype']} on {d['device_name']}, {d['contraction_flops']:.3g} FLOP counted; auto takes "
                f"{d['auto']['method']}")
        if r["method"] != "jacobian_contraction":
            note += f"; {r['method']} does other work than a contraction: its fraction is no utilisation"
        if r["method"] in want:
            reached = frac.get("float32")
            target = f">= {want[r['method']]:.0%} of float32"
            status = judged(reached is not None and reached >= want[r["method"]], dry)
            note += f"; {DRY_NOTE}" if dry else ""
        add_row(rows, f"bench {name}: {r['method']} ({where})", fig, target, status, note)


def _cpu_forward_seconds(rows: int = 32) -> float:
    """Seconds per row of ResNet-18's forward pass on this machine's CPU (the run's check of every row)."""
    import torch
    from zoo import resnet18_cifar

    net = resnet18_cifar().eval()
    x = torch.randn(rows, 3, 32, 32)
    with torch.no_grad():
        net(x[:4])
        t0 = time.perf_counter()
        net(x)
    return (time.perf_counter() - t0) / rows


def e2e_size(bench: str | None, method: str, budget: float, n: int, block: int) -> tuple[int, str]:
    """The largest n <= ``n`` (whole blocks) whose run fits ``budget`` seconds by the benched block time:
    the triangle's blocks at that time each, plus every row's forward pass on the CPU, times SAFETY."""
    seconds, scaled = None, ""
    if bench and Path(bench).is_file():
        d = json.loads(Path(bench).read_text())
        seconds = next((r["seconds"] for r in d["rows"] if r["method"] == method), None)
        pairs = d.get("n1", block) * d.get("n2", block)
        if seconds is not None and pairs != block * block:  # another block: scaled by its pairs
            seconds *= block * block / pairs
            scaled = f" (scaled from a {d['n1']} x {d['n2']} block)"
    if seconds is None:
        return n, f"no benched block time: n = {n} as asked, bounded by the part's timeout only"
    per_row = _cpu_forward_seconds()

    def estimate(m: int) -> float:
        g = math.ceil(m / block)
        return SAFETY * (g * (g + 1) / 2 * seconds + m * per_row)

    m = n
    while m > block and estimate(m) > budget:
        m -= block
    why = (f"{math.ceil(m / block)}-block grid at {seconds:.2f} s per benched {block} x {block} block{scaled} "
           f"+ {per_row * 1e3:.1f} ms per row on the CPU: ~{estimate(m):.0f} s with a {SAFETY}x margin, "
           f"budget {budget:.0f} s")
    return m, (why if m == n else f"n cut from {n} to {m} to fit: {why}")


def _summary_line(log: str) -> str:
    lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()] \
        if Path(log).is_file() else []
    errors = [ln for ln in lines if ln.startswith("Error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def e2e_rows(rows: str, store: str, wall: float, n: int, asked: int, rc: int, log: str, why: str,
             dry: bool = False) -> None:
    """The end-to-end run's rows, from the store's own record (``ntk_pipeline`` in its zarr.json)."""
    meta = Path(store) / "zarr.json"
    what = f"e2e ResNet-18 pntk {n} x {n}{f' (of {asked})' if n != asked else ''}, run --executor local"
    if rc != 0 or not meta.is_file():
        cause = {124: "timed out", 125: "not run: the budget was spent"}.get(rc) or _summary_line(log)
        add_row(rows, what, f"exit {rc}", "completes", "fail", f"{cause}; {why}")
        return
    from pipeline.methods import normalise_shape
    from pipeline.plan import contraction_flops, tile

    prov = json.loads(meta.read_text())["attributes"]["ntk_pipeline"]
    plan = tile(prov["n1"], prov["n2"], tuple(prov["block"]), prov["symmetric"])
    mode, o = normalise_shape(prov["mode"], prov["o"])  # pntk: a trace kernel of o = 1 (the record's o is the model's)
    work = sum(contraction_flops(b.i1 - b.i0, b.j1 - b.j0, o, prov["p"], mode) for b in plan.blocks)
    seconds, busy = float(prov.get("seconds") or 0), float(prov.get("block_seconds") or 0)
    devices = {k: v for k, v in prov.items() if "device" in k.lower()}
    complete = prov.get("status") == "complete"
    add_row(rows, what, f"{prov['blocks_done']}/{prov['blocks_total']} blocks {prov.get('status')}, "
            f"wall {seconds:.1f} s (command {wall:.0f} s), block compute {busy:.1f} s, "
            f"writes {prov.get('write_seconds')} s",
            "completes", "pass" if complete else "fail",
            f"method {prov['method']}, {work:.3g} FLOP counted; {why}" + (f"; {devices}" if devices else ""))
    per_s = work / seconds if seconds else 0.0
    extra = f"; {DRY_NOTE}" if dry else ""
    add_row(rows, "e2e JC-counted rate over wall", f"{rate(per_s)} ({rate(work / busy if busy else 0)} over block "
            "compute)", f">= {JC_TFLOPS_TARGET:g} TFLOP/s", judged(complete and per_s >= JC_TFLOPS_TARGET * 1e12, dry),
            "wall: the store's `seconds`, from the first block handed out to the last written" + extra)
    ratio = busy / seconds if seconds else 0.0
    add_row(rows, "e2e block compute / wall", f"{ratio:.2f}", f">= {BUSY_TARGET}",
            judged(complete and ratio >= BUSY_TARGET, dry), "block_seconds / seconds from the store" + extra)


def pytest_rows(rows: str, log: str, rc: int, cpu: bool) -> None:
    """The gpu tests' row from pytest's summary line."""
    import re

    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    found = re.findall(r"^=*\s*(.*\b(?:passed|failed|skipped|deselected|error|errors|no tests ran)\b.*?)\s*=*$",
                       text, re.M)
    summary = found[-1] if found else _summary_line(log)
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    if rc == 5:
        status, note = "fail", "no test selected by -m gpu (is the marker registered and used?)"
    elif rc != 0:
        status, note = "fail", f"exit {rc}"
    elif passed == 0:
        status, note = ("skip" if cpu else "fail"), "none ran" + (" (CPU dry run: no CUDA)" if cpu else "")
    else:
        status, note = "pass", ""
    add_row(rows, "pytest -m gpu tests/test_gpu.py", summary, "all pass", status, note)


def table(rows: str, out: list[str], meta: list[str]) -> int:
    """Print the rows as one table and write them as JSON; 1 if any row failed."""
    items = [json.loads(line) for line in Path(rows).read_text().splitlines() if line.strip()]
    cols = ("what", "figure", "target", "status")
    cap = {"what": 64, "figure": 72, "target": 20, "status": 6}  # the JSON keeps every word

    def cut(text: str, c: str) -> str:
        return text if len(text) <= cap[c] else text[: cap[c] - 3] + "..."

    widths = {c: max([len(c)] + [len(cut(str(r[c]), c)) for r in items]) for c in cols}
    line = " | ".join(f"{c:<{widths[c]}}" for c in cols)
    print("\n" + line + "\n" + "-+-".join("-" * widths[c] for c in cols))
    for r in items:
        print(" | ".join(f"{cut(str(r[c]), c):<{widths[c]}}" for c in cols))
        if r.get("note"):
            print(f"    ({r['note']})")
    info = dict(m.split("=", 1) for m in meta)
    doc = {"rows": items, **info, "failed": sum(r["status"] == "fail" for r in items),
           "passed": sum(r["status"] == "pass" for r in items)}
    for path in out:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{doc['passed']} passed, {doc['failed']} failed")
    return 1 if doc["failed"] else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="check.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("derive")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--set", action="append", default=[])
    a.add_argument("--drop", action="append", default=[])
    a = sub.add_parser("row")
    a.add_argument("--rows", required=True)
    for k in ("what", "figure"):
        a.add_argument(f"--{k}", required=True)
    a.add_argument("--target", default="-")
    a.add_argument("--status", default="info", choices=("pass", "fail", "skip", "info"))
    a.add_argument("--note", default="")
    a = sub.add_parser("bench-rows")
    a.add_argument("--rows", required=True)
    a.add_argument("--name", required=True)
    a.add_argument("--json", required=True)
    a.add_argument("--target", action="append", default=[], help="METHOD=FRACTION of the float32 peak")
    a.add_argument("--peaks", action="store_true")
    a.add_argument("--cpu", action="store_true", help="a dry run: targets are not judged")
    a = sub.add_parser("e2e-size")
    a.add_argument("--bench")
    a.add_argument("--method", default="structured")
    a.add_argument("--budget", type=float, required=True)
    a.add_argument("--n", type=int, required=True)
    a.add_argument("--block", type=int, required=True)
    a = sub.add_parser("e2e-rows")
    a.add_argument("--rows", required=True)
    a.add_argument("--store", required=True)
    a.add_argument("--wall", type=float, required=True)
    a.add_argument("--n", type=int, required=True)
    a.add_argument("--asked", type=int, required=True)
    a.add_argument("--rc", type=int, required=True)
    a.add_argument("--log", required=True)
    a.add_argument("--why", default="")
    a.add_argument("--cpu", action="store_true", help="a dry run: targets are not judged")
    a = sub.add_parser("pytest-rows")
    a.add_argument("--rows", required=True)
    a.add_argument("--log", required=True)
    a.add_argument("--rc", type=int, required=True)
    a.add_argument("--cpu", action="store_true")
    a = sub.add_parser("table")
    a.add_argument("--rows", required=True)
    a.add_argument("--json", action="append", default=[])
    a.add_argument("--meta", action="append", default=[])
    return ap


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    if ns.cmd == "derive":
        derive(ns.src, ns.dst, ns.set, ns.drop)
    elif ns.cmd == "row":
        add_row(ns.rows, ns.what, ns.figure, ns.target, ns.status, ns.note)
    elif ns.cmd == "bench-rows":
        bench_rows(ns.rows, ns.name, ns.json, ns.target, ns.peaks, ns.cpu)
    elif ns.cmd == "e2e-size":
        n, why = e2e_size(ns.bench, ns.method, ns.budget, ns.n, ns.block)
        print(n)
        print(why, file=sys.stderr)
    elif ns.cmd == "e2e-rows":
        e2e_rows(ns.rows, ns.store, ns.wall, ns.n, ns.asked, ns.rc, ns.log, ns.why, ns.cpu)
    elif ns.cmd == "pytest-rows":
        pytest_rows(ns.rows, ns.log, ns.rc, ns.cpu)
    else:
        return table(ns.rows, ns.json, ns.meta)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

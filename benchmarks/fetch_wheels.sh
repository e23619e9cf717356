#!/usr/bin/env bash
# Fetch the wheels that benchmarks/gpu_check.sh installs on a GPU machine that has no network: what
# `import pipeline` (and its tests) need and that machine lacks. Run it where pip reaches the registry:
#
#   benchmarks/fetch_wheels.sh            # cp312 manylinux x86_64 wheels into benchmarks/wheels/ (ignored by git)
#   benchmarks/fetch_wheels.sh 3.11 DIR   # another Python, another folder
#
# The GPU machine (see README.md, "GPU check") has Python 3.12 with CUDA torch, numpy, packaging, pyyaml,
# pygments, click, fsspec, tqdm, scipy, matplotlib, xarray and transformers, but not ray, zarr, numcodecs or
# pydantic. Ray (79 MB as a cp312 wheel) is not carried: `run --executor local` needs no Ray. The pins are the
# versions this project's tests pass with, checked below against pyproject.toml's requirements; every wheel's
# own requirements are checked to be carried or present there. The folder must stay well under the 64 MiB
# that travels with a checkout: over MAX_MIB this script fails.
set -euo pipefail

PYVER=${1:-3.12}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${2:-$ROOT/benchmarks/wheels}
MAX_MIB=${MAX_MIB:-48}
PY=${PYTHON:-python3}

# Missing there: zarr and its needs, pydantic and its needs.
PINS=(
  zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  # Present there (the machine's package list), carried in case an image lacks them or has too old a
  # version (pydantic-core needs typing-extensions >= 4.14.1); gpu_check.sh installs only what is missing.
  typing-extensions==4.16.0 pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0
)
# What the GPU machine has, for the check that every carried wheel's requirements are met there.
PRESENT="numpy packaging pyyaml pygments torch click fsspec tqdm scipy matplotlib xarray transformers"

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}"
printf '%s\n' "${PINS[@]}" >"$DEST/requirements.txt"

"$PY" - "$ROOT/pyproject.toml" "$DEST" "$PYVER" "$PRESENT" <<'EOF'
"""Check the pins against pyproject.toml and every wheel's requirements against what is carried or present."""
import re
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pyproject, dest, pyver, present = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4].split()
pins = {canonicalize_name(Requirement(line).name): Requirement(line)
        for line in (dest / "requirements.txt").read_text().split() if "==" in line}
pinned = {name: next(iter(r.specifier)).version for name, r in pins.items()}
problems = []
for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
    req = Requirement(line)
    name = canonicalize_name(req.name)
    if name in pinned and not req.specifier.contains(pinned[name], prereleases=True):
        problems.append(f"pyproject.toml asks {line!r}, the pin is {pinned[name]}")
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
wheels = sorted(dest.glob("*.whl"))
have = {canonicalize_name(re.split(r"-\d", w.name, maxsplit=1)[0]) for w in wheels}
for name in set(pinned) - have:
    problems.append(f"no wheel for {name}=={pinned[name]}")
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform or Python
            name = canonicalize_name(req.name)
            if name in pinned and not req.specifier.contains(pinned[name], prereleases=True):
                problems.append(f"{w.name} needs {req}, the pin is {pinned[name]}")
            elif name not in pinned and name not in present:
                problems.append(f"{w.name} needs {req}, neither carried nor on the GPU machine")
if problems:
    sys.exit("fetch_wheels: " + "; ".join(problems))
EOF

bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
wheels=("$DEST"/*.whl)
echo "fetch_wheels: ${#wheels[@]} wheels for Python $PYVER in $DEST: $bytes bytes ($mib MiB)"
if (( bytes > MAX_MIB * 1048576 )); then
  echo "fetch_wheels: over $MAX_MIB MiB: the checkout travels to the GPU machine in 64 MiB at most" >&2
  exit 1
fi

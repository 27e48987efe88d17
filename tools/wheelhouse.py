"""Build an offline wheelhouse for a GPU node: q0ds and every dependency except torch, for the node's Python.

    python tools/wheelhouse.py --out wheelhouse --python-version 3.12 --platform manylinux2014_x86_64 [--extras data]

On the node (no index): pip install --no-index --find-links wheelhouse 'q0ds[data]'   (beside its own torch)

Run on a connected machine (`make wheelhouse` calls it). Steps:
1. q0ds's own wheel (pure Python) from this checkout; DeepSpeed's wheel from its sdist with DS_BUILD_OPS=0
   (pure Python: DeepSpeed compiles the ops it needs by JIT at run time, deepspeed/ops/__init__.py probes them).
2. pip download --only-binary=:all: --python-version --platform of q0ds[extras] at the versions of
   constraints.txt. torch is left out: the resolution sees a stub `torch` wheel without dependencies (a temp
   find-links dir, never copied into the wheelhouse), so neither torch nor its nvidia-*/triton wheels are fetched.
3. A constraints.txt version without a wheel for the target (numpy 2.4.6, pyarrow 26.0.1 for glibc 2.17) is
   dropped, so pip takes the newest version that has one (named in the output). A dependency published only
   as an sdist (lm-eval's rouge-score, sqlitedict, word2number) then still fails with "No matching
   distribution found for X": it is built here with `pip wheel --no-deps` (it must come out py3-none-any,
   i.e. pure Python, else the script stops) and step 2 is retried.
Downloads go through pip's cache (PIP_CACHE_DIR), so a rebuild fetches nothing new.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Published as sdists only, pure Python (checked again on the built wheel); anything else is not built here.
PURE_SDISTS = {"rouge-score", "sqlitedict", "word2number"}
NOT_FOUND = re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)")
REQUESTED = re.compile(r"The user requested \(constraint\) ([A-Za-z0-9._-]+)==")
NO_WHEELS = re.compile(r"no matching distributions available for your environment:\n((?:[ \t]+\S+\n?)+)")


def pins_without_wheels(stderr: str) -> list[str]:
    """Constraint pins that pip reports as having no distribution for the target (e.g. numpy 2.4.6 has no
    manylinux2014 wheel for cp312: manylinux_2_27/2_28 only)."""
    m = NO_WHEELS.search(stderr)
    missing = {norm(x) for x in m.group(1).split()} if m else set()
    return sorted({norm(x) for x in REQUESTED.findall(stderr)} & missing)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), text=True, **kw)


def pip(*args, **kw):
    return run([sys.executable, "-m", "pip", *args], **kw)


def pinned(constraints: Path) -> dict[str, str]:
    """{normalized name: 'name==version'} from a constraints file."""
    out = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name = line.split("==")[0].strip()
            out[norm(name)] = line
    return out


def platforms(tag: str) -> list[str]:
    """pip takes --platform literally (manylinux2014 only adds manylinux2010/1), so a wheel tagged only
    manylinux_2_17 or manylinux_2_28 would be missed: a manylinux tag means "a node with this glibc", i.e. every
    manylinux_2_Y tag with Y <= its glibc minor, and the legacy aliases."""
    m = re.fullmatch(r"manylinux(?:_2_(\d+)|(2014|2010|1))_(\w+)", tag)
    if not m:
        return [tag]
    glibc = int(m[1]) if m[1] else {"2014": 17, "2010": 12, "1": 5}[m[2]]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return ([f"manylinux_2_{y}_{m[3]}" for y in range(glibc, 4, -1)]
            + [f"{name}_{m[3]}" for y, name in legacy.items() if y <= glibc])


def stub_torch(folder: Path, version: str) -> Path:
    """An empty torch wheel (no dependencies) that satisfies every torch requirement during resolution."""
    v = f"{version}+q0ds.stub"
    dist = f"torch-{v}.dist-info"
    path = folder / f"torch-{v}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {v}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: q0ds\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def build_wheel(req: str, out: Path, constraints: Path | None, source: bool, isolated: bool = True) -> Path:
    """pip wheel --no-deps of a requirement (or this checkout) into `out`; the result must be pure Python."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["wheel", "--no-deps", "-q", "-w", tmp] + (["--no-binary", ":all:"] if source else [])
        args += [] if isolated else ["--no-build-isolation"]
        p = pip(*args, *(["-c", constraints] if constraints else []), req, env=dict(os.environ, DS_BUILD_OPS="0"))
        wheels = list(Path(tmp).glob("*.whl"))
        if p.returncode != 0 or len(wheels) != 1:
            sys.exit(f"wheelhouse: could not build a wheel for {req}")
        w = wheels[0]
        if not re.search(r"-py[23.]*3?-none-any\.whl$", w.name):
            sys.exit(f"wheelhouse: {w.name} is not pure Python: it cannot be built here for another platform")
        dest = out / w.name
        dest.unlink(missing_ok=True)
        shutil.move(str(w), dest)
        return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "wheelhouse")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    p.add_argument("--platform", default="manylinux2014_x86_64",
                   help="pip platform tag(s), comma-separated (e.g. manylinux2014_x86_64,manylinux_2_28_x86_64)")
    p.add_argument("--extras", default="", help="q0ds extras to include, e.g. data or data,monitor,eval")
    p.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    a = p.parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pins = pinned(a.constraints)
    # q0ds: with this interpreter's setuptools when it has one (no isolated build env to fetch); DeepSpeed: always
    # isolated, i.e. without torch, as its sdist installs on PyPI (torch_info 0.0, ops probed at run time)
    stale_build = not (ROOT / "build").exists()
    q0ds = build_wheel(str(ROOT), out, None, source=False, isolated=importlib.util.find_spec("setuptools") is None)
    if stale_build:                              # setuptools' in-tree build/ would feed old files to the next build
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    if not any(out.glob("deepspeed-*.whl")):
        build_wheel(pins["deepspeed"], out, None, source=True)
    target = ["--only-binary=:all:", "--python-version", a.python_version, "--implementation", "cp"]
    for plat in sorted({t for p in a.platform.split(",") if p.strip() for t in platforms(p.strip())}):
        target += ["--platform", plat]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stub = stub_torch(tmp, pins.pop("torch", "torch==2.13.0").split("==")[1])
        pins["torch"] = f"torch=={stub.name.split('-')[1]}"   # only the stub: a real torch has a higher version
        cons = tmp / "constraints.txt"           # the CI versions, torch being the stub (the node brings its own)
        cons.write_text("".join(v + "\n" for v in pins.values()))
        req = f"{q0ds}[{a.extras}]" if a.extras else str(q0ds)
        built, relaxed = set(), []
        while True:
            r = pip("download", "-d", out, "--find-links", tmp, "--find-links", out, "-c", cons, *target, req,
                    capture_output=True)
            sys.stdout.write("".join(l + "\n" for l in r.stdout.splitlines() if l.startswith("Saved ")))
            if r.returncode == 0:
                break
            log = r.stdout + r.stderr                     # pip explains a conflict on stdout
            stale = [n for n in pins_without_wheels(log) if n in pins and n != "torch"]
            if stale:                         # the CI version has no wheel for the target: the newest one that has
                for name in stale:
                    print(f"wheelhouse: {pins.pop(name)} has no wheel for the target: letting pip choose", flush=True)
                relaxed += stale
                cons.write_text("".join(v + "\n" for v in pins.values()))
                continue
            m = NOT_FOUND.search(log)
            name = m and norm(m.group(1))
            if m and name in pins and name != "torch":   # first the newest version that has a wheel (pyarrow 26.0.1:
                print(f"wheelhouse: {pins.pop(name)} has no wheel for the target: letting pip choose", flush=True)
                relaxed.append(name)                      # none for glibc 2.17), only then its sdist
                cons.write_text("".join(v + "\n" for v in pins.values()))
                continue
            if m and name not in PURE_SDISTS:
                sys.exit(f"wheelhouse: {name} has no wheel for Python {a.python_version} on {a.platform}, and it is not "
                         f"a pure-Python sdist this script builds ({', '.join(sorted(PURE_SDISTS))}): choose the node's "
                         "real glibc (e.g. --platform manylinux_2_28_x86_64) or drop the extra that needs it")
            if not m or name in built or name == "torch":
                sys.stderr.write(log[-6000:])
                sys.exit("wheelhouse: pip download failed (see above)")
            print(f"wheelhouse: {name} has no wheel for the target: building it from its sdist", flush=True)
            build_wheel(name, out, cons, source=True)
            built.add(name)
    for w in out.glob("torch-*+q0ds.stub-*.whl"):
        w.unlink()
    leaked = [w.name for w in out.glob("*.whl") if re.match(r"(torch|triton|nvidia_|cuda_)", w.name)]
    if leaked:
        sys.exit(f"wheelhouse: torch or CUDA wheels in {out}: {leaked} (remove them; torch comes from the node)")
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    if relaxed:
        print(f"wheelhouse: not the CI version (none has a wheel for the target): {', '.join(relaxed)}")
    print(f"wheelhouse: {out}: {len(wheels)} wheels, {size / 1e6:.1f} MB (Python {a.python_version}, "
          f"{a.platform}, extras [{a.extras}]); install with: pip install --no-index --find-links {out} "
          f"'q0ds{f'[{a.extras}]' if a.extras else ''}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

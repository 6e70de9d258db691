#!/usr/bin/env bash
# Build the offline bundle that runs evomerge (search/replay/merge/status and
# benchmarks/gpu_check.sh) on an x86-64 Python 3.12 (TARGET_PY) machine without network access that
# already has torch, transformers & co. (PREINSTALLED below).
#
#   bash make-bundle.sh PROJECT_DIR OUT.tar.xz
#
# PROJECT_DIR: a git checkout of evomerge; read only. Versions come from its constraints.txt,
# the top-level requirements from its pyproject.toml ([project] dependencies). Needs on this
# machine: bash, git, GNU tar, xz, a Python >= 3.11 with pip (PYTHON, default python3) and
# access to the package index. Everything happens in a temporary directory, removed at the end.
#
# Bundle layout (unpack with: mkdir -p $HOME/evomerge-bundle && tar xJf OUT.tar.xz -C $HOME/evomerge-bundle):
#   site/  cp312 (cp$TARGET_PY) manylinux wheels of everything needed and not preinstalled, unpacked
#   src/   evomerge itself, installed non-editable (with its .dist-info)
#   repo/  the project's git HEAD without tests/, docs/ and the top-level evomerge/ folder
#          (run from repo/, that folder would shadow the installed package)
#   env.sh (source it after unpacking), MANIFEST.txt (what is inside, what it needs from the machine)
set -euo pipefail

# ---- what the target machine already has (not bundled). Names as on the package index. ----
# typing-extensions is on the machine too but deliberately NOT listed: pydantic 2.14 needs
# >=4.16, so the bundle brings its own (it shadows the machine's; backward compatible).
PREINSTALLED="torch transformers accelerate peft safetensors tokenizers huggingface-hub
  numpy pyarrow pandas scikit-learn scipy sacrebleu rich tqdm pyyaml jinja2 requests httpx
  xxhash filelock fsspec psutil packaging msgpack protobuf grpcio
  aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl
  attrs click typer regex sentencepiece tiktoken tabulate pytest pytest-xdist hypothesis
  werkzeug markupsafe pygments markdown-it-py cloudpickle joblib threadpoolctl six
  python-dateutil pillow matplotlib prometheus-client portalocker sortedcontainers networkx
  sympy lxml setuptools hf-xet narwhals anyio httpcore h11
  colorama certifi charset-normalizer idna urllib3 cmake ninja pybind11 nvidia-ml-py
  opencv-python-headless"

# Top-level requirements whose extras are not bundled: ray[default] -> ray (no dashboard
# agents/opencensus/py-spy/...; evomerge calls ray.init(include_dashboard=False)).
NO_EXTRAS="ray"

# No wheel on the index (sdist only): built here as pure-Python wheels (pip wheel --no-deps).
# Any other package whose wheel download fails is tried the same way.
SOURCE_ONLY="rouge-score sqlitedict word2number"

# Parts of Ray that evomerge never imports (Java jar, web-UI build, the ML libraries).
RAY_STRIP="jars dashboard/client/build rllib tune train serve llm data air workflow"

# The target interpreter and platform.
TARGET_PY=${TARGET_PY:-3.12}          # wheels for this CPython (3.12: the GPU machine; 3.11: a proof
                                      # bundle that unpacks and runs on a 3.11 build machine)
TARGET_GLIBC=${TARGET_GLIBC:-2.28}    # accept manylinux wheels up to this glibc
MAX_MIB=${MAX_MIB:-60}                # the bundle must not be larger
XZ_THREADS=${XZ_THREADS:-2}
PY=${PYTHON:-python3}

die() { echo "make-bundle: $*" >&2; exit 1; }
say() { echo "make-bundle: [$(( $(date +%s) - START ))s] $*"; }
START=$(date +%s)
[ $# -eq 2 ] || die "usage: bash make-bundle.sh PROJECT_DIR OUT.tar.xz"
umask 022
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=$(cd "$1" && pwd) || die "no such directory: $1"
OUT_DIR=$(mkdir -p "$(dirname "$2")" && cd "$(dirname "$2")" && pwd)
OUT="$OUT_DIR/$(basename "$2")"
for f in constraints.txt pyproject.toml; do [ -f "$PROJECT/$f" ] || die "$PROJECT/$f not found"; done
[ -f "$HERE/env.sh" ] || die "$HERE/env.sh not found (it goes into the bundle)"
git -C "$PROJECT" rev-parse --verify -q HEAD >/dev/null || die "$PROJECT is not a git checkout"
for t in git tar xz; do command -v $t >/dev/null || die "$t not found"; done
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY: need Python >= 3.11"
"$PY" -m pip --version >/dev/null || die "$PY has no pip"

HEAD=$(git -C "$PROJECT" rev-parse HEAD)
EPOCH=$(git -C "$PROJECT" log -1 --format=%ct HEAD)
if [ -n "$(GIT_OPTIONAL_LOCKS=0 git -C "$PROJECT" status --porcelain --untracked-files=no)" ]; then
  echo "make-bundle: note: $PROJECT has uncommitted changes; the bundle holds HEAD ${HEAD:0:7}"
fi

T=$(mktemp -d -t make-bundle.XXXXXX)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/wheels" "$T/stage/site" "$T/stage/src" "$T/stage/repo" "$T/head"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_ROOT_USER_ACTION=ignore

# ---- 1. the dependency closure at the constraints.txt pins, wheels for cp$TARGET_PY ----
say "resolving and downloading (cp${TARGET_PY/./}, manylinux <= glibc $TARGET_GLIBC)"
PREINSTALLED="$PREINSTALLED" NO_EXTRAS="$NO_EXTRAS" SOURCE_ONLY="$SOURCE_ONLY" \
TARGET_PY="$TARGET_PY" TARGET_GLIBC="$TARGET_GLIBC" \
"$PY" - "$PROJECT" "$T/wheels" "$T/bundled.txt" "$T/needs.txt" <<'PYEOF'
import email.parser, os, subprocess, sys, zipfile
try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as canon
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name as canon

project, wheeldir, out_list, out_needs = sys.argv[1:5]
pre = {canon(n) for n in os.environ["PREINSTALLED"].split()}
no_extras = {canon(n) for n in os.environ["NO_EXTRAS"].split()}
source_only = {canon(n) for n in os.environ["SOURCE_ONLY"].split()}
py = os.environ["TARGET_PY"]
major, minor = (int(x) for x in os.environ["TARGET_GLIBC"].split("."))
plats = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
plats += [f"manylinux_{major}_{m}_x86_64" for m in range(5, minor + 1)]
tags = ["--only-binary=:all:", "--python-version", py, "--implementation", "cp",
        "--abi", "cp" + py.replace(".", "")] + [a for p in plats for a in ("--platform", p)]
env = {"python_version": py, "python_full_version": py + ".0", "os_name": "posix",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "platform_python_implementation": "CPython", "implementation_name": "cpython",
       "implementation_version": py + ".0", "platform_release": "", "platform_version": ""}
pip = [sys.executable, "-m", "pip"]

def log(msg):
    print("make-bundle:", msg, flush=True)

pins = {}
for line in open(os.path.join(project, "constraints.txt")):
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    r = Requirement(line)
    specs = list(r.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
        pins[canon(r.name)] = specs[0].version

with open(os.path.join(project, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]

wheels = {}      # name -> wheel file name
wanted = {}      # name -> extras asked for
done = {}        # name -> extras ("" = the base requirements) whose requirements were walked
asked = {}       # name -> a requirement (for packages not pinned in constraints.txt)
needs = {}       # preinstalled name -> {requirement: {who}}
problems = []

def scan():
    for fn in os.listdir(wheeldir):
        if fn.endswith(".whl"):
            wheels.setdefault(canon(fn.split("-")[0]), fn)

def spec(n):
    if n in pins:
        return f"{n}=={pins[n]}"
    r = asked[n]
    log(f"WARNING: {n} is not pinned in constraints.txt; taking the newest {n}{r.specifier}")
    return f"{n}{r.specifier}"

def build(n):  # a pure-Python wheel from the sdist
    if subprocess.run(pip + ["wheel", "-qq", "--no-deps", "-w", wheeldir, spec(n)]).returncode:
        sys.exit(f"make-bundle: {spec(n)}: neither a cp{py} wheel nor an sdist that builds")
    scan()
    fn = wheels.get(n)
    if not fn or not fn.endswith("-none-any.whl"):
        sys.exit(f"make-bundle: {n}: no cp{py} wheel and it does not build a pure-Python one ({fn})")
    log(f"built {fn} from its sdist")

def download(names):
    binary = [n for n in names if n not in source_only]
    if binary:
        cmd = pip + ["download", "-qq", "--no-deps", "-d", wheeldir] + tags
        if subprocess.run(cmd + [spec(n) for n in binary]).returncode != 0:
            for n in binary:  # one by one: the failing ones may be sdist-only
                if subprocess.run(cmd + [spec(n)], capture_output=True).returncode != 0:
                    log(f"{n}: no wheel for cp{py} manylinux; building it from the sdist")
                    build(n)
        scan()
    for n in names:
        if n in source_only:
            build(n)
        if n not in wheels:
            sys.exit(f"make-bundle: {n}: no wheel downloaded")

def requires(n):
    with zipfile.ZipFile(os.path.join(wheeldir, wheels[n])) as z:
        meta = [m for m in z.namelist() if m.count("/") == 1 and m.endswith(".dist-info/METADATA")]
        msg = email.parser.Parser().parsestr(z.read(meta[0]).decode("utf-8"))
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]

def want(r, who):
    n = canon(r.name)
    if n in pre:
        need = r.name + (f"[{','.join(sorted(r.extras))}]" if r.extras else "") + str(r.specifier)
        needs.setdefault(n, {}).setdefault(need, set()).add(who)
        return
    if n in pins and r.specifier and not r.specifier.contains(pins[n], prereleases=True):
        problems.append(f"{who} needs {r} but constraints.txt pins {n}=={pins[n]}")
    asked.setdefault(n, r)
    ex = set() if who == "pyproject.toml" and n in no_extras else {canon(e) for e in r.extras}
    wanted.setdefault(n, set()).update(ex)

for d in deps:
    r = Requirement(d)
    if r.marker is None or r.marker.evaluate(dict(env, extra="")):
        want(r, "pyproject.toml")
while True:  # download what is wanted, walk the requirements of what is new, until nothing is
    new = sorted({n for n in wanted if n not in wheels})
    if new:
        download(new)
    walked = False
    for n in sorted(wanted):
        todo = ({""} | wanted[n]) - done.setdefault(n, set())
        if not todo:
            continue
        walked = True
        for r in requires(n):
            has_extra = r.marker is not None and "extra" in str(r.marker)
            for ex in sorted(todo):
                if (ex == "") == has_extra:
                    continue  # base requirements once; extras' ones per extra
                if r.marker is None or r.marker.evaluate(dict(env, extra=ex)):
                    want(r, n)
                    break
        done[n] |= todo
    if not walked and all(n in wheels for n in wanted):
        break

for p in problems:
    log("WARNING: " + p)
with open(out_list, "w") as f:
    for n in sorted(wanted):
        f.write(f"{n} {wheels[n].split('-')[1]} {wheels[n]}\n")
with open(out_needs, "w") as f:
    for n in sorted(needs):
        reqs = "; ".join(f"{r} ({', '.join(sorted(w))})" for r, w in sorted(needs[n].items()))
        f.write(f"  {n}: {reqs}\n")
log(f"{len(wanted)} packages to bundle: " + " ".join(f"{n}=={wheels[n].split('-')[1]}" for n in sorted(wanted)))
PYEOF

# ---- 2. unpack the wheels into site/ (site-packages layout; .data/scripts etc. dropped) ----
say "unpacking $(wc -l < "$T/bundled.txt") wheels into site/, stripping ray"
"$PY" - "$T/wheels" "$T/bundled.txt" "$T/stage/site" <<'PYEOF'
import os, shutil, sys, zipfile
wheeldir, listing, site = sys.argv[1:4]
owner = {}
for line in open(listing):
    fn = line.split()[2]
    with zipfile.ZipFile(os.path.join(wheeldir, fn)) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):  # purelib/platlib go to the top, the rest is dropped
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            rel = "/".join(parts)
            if not rel or info.is_dir():
                continue
            if rel in owner:
                sys.exit(f"make-bundle: {rel} is in both {owner[rel]} and {fn}")
            owner[rel] = fn
            dest = os.path.join(site, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, 0o755 if mode & 0o111 else 0o644)
PYEOF
for p in $RAY_STRIP; do
  if [ -e "$T/stage/site/ray/$p" ]; then rm -rf "$T/stage/site/ray/$p"
  else echo "make-bundle: note: ray/$p not in this ray wheel (RAY_STRIP)"; fi
done

# ---- 3. evomerge from git HEAD, installed non-editable into src/ ----
say "installing evomerge (git ${HEAD:0:7}) into src/"
git -C "$PROJECT" -c tar.umask=022 archive --format=tar HEAD | tar -x -C "$T/head"
BUILD_REQS=$("$PY" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$T/head/pyproject.toml")
mapfile -t BREQ <<<"$BUILD_REQS"
"$PY" -m pip install -qq --target "$T/buildreqs" "${BREQ[@]}"   # e.g. setuptools>=68, shadows the host's
PYTHONPATH="$T/buildreqs" "$PY" -m pip install -qq --no-deps --no-build-isolation --no-compile \
  --target "$T/stage/src" "$T/head"
rm -rf "$T/stage/src/bin"
for d in "$T"/stage/src/*.dist-info; do  # direct_url.json names the temporary build directory
  if [ -f "$d/direct_url.json" ]; then rm "$d/direct_url.json"; sed -i '/direct_url\.json,/d' "$d/RECORD"; fi
done
ls -d "$T"/stage/src/evomerge-*.dist-info >/dev/null 2>&1 || die "evomerge .dist-info missing in src/"

# ---- 4. the repository (benchmarks/, demo/, ...) into repo/ ----
git -C "$PROJECT" -c tar.umask=022 archive --format=tar HEAD | tar -x -C "$T/stage/repo"
rm -rf "$T/stage/repo/tests" "$T/stage/repo/docs" "$T/stage/repo/evomerge"
# env.sh learns the bundle's Python version (it warns in one line when the interpreter differs)
sed "s/^_want=.*/_want=$TARGET_PY/" "$HERE/env.sh" > "$T/stage/env.sh"
grep -q "^_want=$TARGET_PY\$" "$T/stage/env.sh" || die "env.sh has no _want= line"
find "$T/stage" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$T/stage" -name '*.pyc' -delete

{
  echo "evomerge offline bundle: git $HEAD, cp${TARGET_PY/./} manylinux x86_64 (glibc >= $TARGET_GLIBC)"
  echo 'Unpack: mkdir -p $HOME/evomerge-bundle && tar xJf BUNDLE.tar.xz -C $HOME/evomerge-bundle; source $HOME/evomerge-bundle/env.sh'
  echo "Bundled in site/ (name version wheel):"
  sed 's/^/  /' "$T/bundled.txt"
  echo "Ray without: $RAY_STRIP"
  echo "Expected on the machine (preinstalled), as the bundled packages require them:"
  cat "$T/needs.txt"
} > "$T/stage/MANIFEST.txt"

# ---- 5. one reproducible tar.xz (this order, site/ first, compresses ~3 MiB better than repo/ first) ----
say "compressing ($(du -sm "$T/stage" | cut -f1) MiB unpacked, xz -6 -T$XZ_THREADS)"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" \
  -C "$T/stage" -cf - env.sh MANIFEST.txt site src repo | xz -6 -T"$XZ_THREADS" > "$T/bundle.tar.xz"
SIZE=$(stat -c %s "$T/bundle.tar.xz")
MIB=$(awk -v s="$SIZE" 'BEGIN { printf "%.1f", s / 1048576 }')
if [ "$SIZE" -gt $(( MAX_MIB * 1048576 )) ]; then
  echo "make-bundle: FAILED: the bundle is $MIB MiB, over the $MAX_MIB MiB limit (nothing written)" >&2
  exit 1
fi
mv "$T/bundle.tar.xz" "$OUT"
N=$(wc -l < "$T/bundled.txt")
rm -rf "$T"; trap - EXIT
say "$OUT: $MIB MiB ($SIZE bytes), $N packages + evomerge (git ${HEAD:0:7})"

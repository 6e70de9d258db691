# Source after unpacking the bundle: mkdir -p $HOME/evomerge-bundle && tar xJf bundle.tar.xz -C $HOME/evomerge-bundle
# site/: third-party packages (cp312) not preinstalled on the machine; src/: evomerge installed
# (non-editable, with its .dist-info); repo/: the project's source (git HEAD, no tests/docs and
# no top-level evomerge/ folder, which would shadow the installed package from the repo root).
# The bundle's root: this file's folder when it lies there (the bundle carries a copy), else
# $EVOMERGE_BUNDLE, else $HOME/evomerge-bundle.
_b=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)
[ -d "$_b/site" ] && [ -d "$_b/src" ] || _b=${EVOMERGE_BUNDLE:-$HOME/evomerge-bundle}
export PYTHONPATH=$_b/site:$_b/src${PYTHONPATH:+:$PYTHONPATH}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# benchmarks/gpu_check.sh runs $PYTHON (default `python`, which the machine may not have)
export PYTHON=${PYTHON:-python3}
# the CPython the bundle's compiled wheels (pydantic-core, ray, ...) are for; make-bundle.sh writes it
_want=3.12
_have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
[ "$_have" = "$_want" ] || echo "evomerge bundle: WARNING: $PYTHON is Python $_have, the bundle is for $_want (its compiled packages will not import); set PYTHON to a python$_want" >&2
# for scripts that run benchmarks/gpu_check.sh from the parent of the evomerge package (src/):
# a link to the repo's benchmarks/ (gpu_check.py resolves its own path, so it finds repo/demo)
[ -e "$_b/src/benchmarks" ] || ln -s "$_b/repo/benchmarks" "$_b/src/benchmarks"
# bytecode once for all processes: Ray's raylet gives its agents 15 s to start; without .pyc
# (e.g. PYTHONDONTWRITEBYTECODE=1) every Ray process compiles ray/ from source
"$PYTHON" -m compileall -q -j 0 -x 'lm_eval/tasks/' "$_b/site" "$_b/src" >/dev/null 2>&1 || true
unset _b _want _have

#!/usr/bin/env bash
# Create .venv-recbole (repo root): a separate interpreter for RecBole 1.2.1.
#
# Why a separate venv: RecBole 1.2.1 needs numpy<2 (np.bool8/np.float),
# scipy<1.12 (dok_matrix._update, used by LightGCN) and pandas<2.3; its ray<=2.6
# imports pkg_resources, which setuptools drops in 81. feedrank's own venv runs
# the current stack. setuptools has a floor too: torch 2.13 requires >=77.0.3,
# so the often-quoted "setuptools>=77.0.3,<81" cannot be resolved together with it.
# torch is pinned to the same CPU build as feedrank so both sides use one kernel set.
#
# Idempotent: a stamp file records the pinned spec; a rerun with the same spec
# does nothing, a changed spec reinstalls.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${RECBOLE_VENV:-$repo_root/.venv-recbole}"
python_bin="${PYTHON:-python3.11}"
spec=(torch==2.13.0 recbole==1.2.1 "numpy<2" "scipy<1.12" "pandas<2.3" "setuptools>=77.0.3,<81")
stamp="$venv/.feedrank-recbole-stamp"

if [[ -f "$stamp" && "$(cat "$stamp")" == "${spec[*]}" ]]; then
    echo "RecBole venv ready: $venv"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python_bin" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet "${spec[@]}"
# Fail here, not in the benchmark, if the stack does not import.
"$venv/bin/python" -c "import recbole, torch, numpy, scipy; print('recbole', recbole.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__)"
echo "${spec[*]}" > "$stamp"
echo "RecBole venv ready: $venv"

# Sourced by launch/*.sh: find the project's Python tools whether or not the venv is on PATH.
#   $DS_SPD_PYTHON (if set), else the repo's .venv, else python3 on PATH.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${DS_SPD_PYTHON:-}" ]; then py=$DS_SPD_PYTHON
elif [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python
else py=$(command -v python3)
fi
bin=$(dirname "$py")
export PATH="$bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
cd "$root"

#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv): the pinned lock requirements.txt,
# then the package itself (pyproject.toml, workflow/scripts/repo2singularity) installed editable.
# Idempotent: nothing is installed when .venv already matches both files and holds this checkout's package.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.requirements.sha256"
wanted=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
package="$(pwd)/workflow/scripts/repo2singularity/__init__.py"

# setup/site/r2s_slurm_plugin.py changes the pinned Slurm executor plugin as it is imported: its
# question to the controller at every start (10 s where no controller answers), its status polls
install_plugin_changes() {
    local site
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -f "$site/r2s_slurm_probe.py" "$site/r2s_slurm_probe.pth"
    cp setup/site/r2s_slurm_plugin.py "$site/r2s_slurm_plugin.py.part" && mv "$site/r2s_slurm_plugin.py.part" "$site/r2s_slurm_plugin.py"
    echo "import r2s_slurm_plugin" > "$site/r2s_slurm_plugin.pth"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x "$venv/bin/snakemake" ] &&
    [ "$("$venv/bin/python" -c 'import repo2singularity; print(repo2singularity.__file__)' 2>/dev/null)" = "$package" ]; then
    install_plugin_changes
    echo "python environment: up to date ($venv)"
    exit 0
fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "python environment: python3 cannot make virtual environments; as root run: apt-get install python3-venv" >&2
    exit 1
fi
echo "python environment: installing the pinned requirements into $venv (about a minute)..."
# a venv made by another user's python (e.g. root's pyenv) may not run for this user: remake it
"$venv/bin/python" -c '' 2>/dev/null || python3 -m venv --clear "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --requirement requirements.txt
# the lock already holds every dependency and the build backend (hatchling): resolve nothing more
"${pip[@]}" --no-deps --no-build-isolation --editable .
install_plugin_changes
echo "$wanted" > "$stamp"
echo "python environment: ready ($("$venv/bin/snakemake" --version | sed 's/^/snakemake /'), $("$venv/bin/repo2docker" --version | sed 's/^/repo2docker /'))"

"""Run a command as on a fresh machine: no Graphviz renderer to be found.

Usage: ``python tests/nodot.py PYTHON SCRIPT [ARGS...]`` (``make demo-nodot``).

The command gets a PATH whose directories hold no ``dot`` and no
``graphviz-pure`` (a directory holding one is replaced by a private copy of
links to everything else in it), and PYTHON is run from a private virtualenv
shell (its own ``bin/python``, ``pyvenv.cfg`` and a link to the real ``lib``)
so a graphviz-pure installed beside the real interpreter is not found either.
Exits with the command's exit code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

RENDERERS = ("dot", "graphviz-pure")


def path_without_renderers(root: str) -> str:
    """A PATH like the current one with every renderer hidden."""
    out = []
    for i, entry in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not entry or not os.path.isdir(entry):
            continue
        if not any(os.path.exists(os.path.join(entry, name)) for name in RENDERERS):
            out.append(entry)
            continue
        shadow = os.path.join(root, f"path{i}")
        os.mkdir(shadow, 0o700)
        for name in os.listdir(entry):
            if name not in RENDERERS:
                os.symlink(os.path.join(entry, name), os.path.join(shadow, name))
        out.append(shadow)
    return os.pathsep.join(out)


def python_without_renderers(python: str, root: str) -> str:
    """An interpreter path with no renderer beside it (same packages)."""
    bindir = os.path.dirname(os.path.abspath(python))
    if not any(os.path.exists(os.path.join(bindir, name)) for name in RENDERERS):
        return python
    prefix = os.path.dirname(bindir)
    cfg = os.path.join(prefix, "pyvenv.cfg")
    if not os.path.exists(cfg):
        raise SystemExit(f"{python} has a Graphviz renderer beside it and is not in a "
                         f"virtualenv; cannot hide it")
    shell = os.path.join(root, "venv")
    os.makedirs(os.path.join(shell, "bin"), 0o700)
    shutil.copy(cfg, os.path.join(shell, "pyvenv.cfg"))
    for name in ("lib", "lib64", "include"):
        if os.path.exists(os.path.join(prefix, name)):
            os.symlink(os.path.join(prefix, name), os.path.join(shell, name))
    target = os.path.join(shell, "bin", "python")
    os.symlink(os.path.realpath(python), target)
    return target


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="flowcore-nodot-") as root:
        env = dict(os.environ, PATH=path_without_renderers(root))
        python = python_without_renderers(argv[0], root)
        check = subprocess.run(
            [python, "-c", "from flowcore.graph.draw import find_renderer as f; print(f() or '')"],
            env=env, capture_output=True, text=True)
        if check.returncode != 0 or check.stdout.strip():
            print(f"nodot: could not hide the renderer: {check.stdout.strip()} "
                  f"{check.stderr.strip()}", file=sys.stderr)
            return 1
        return subprocess.run([python, *argv[1:]], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

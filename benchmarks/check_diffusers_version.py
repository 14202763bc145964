"""Check the diffusers drop-in against one diffusers release in a fresh virtual environment.

    python -m benchmarks.check_diffusers_version                      # diffusers 0.31.0 (the official FastFace pin)
    python -m benchmarks.check_diffusers_version --diffusers 0.42.1 --transformers 5.24.0 --peft 0.21.2

Creates a venv in a temporary folder (``python -m venv``), installs torch, the given diffusers / transformers /
peft versions, pytest and fastface itself (``pip install -e``), then runs ``tests/test_diffusers_dropin.py`` there
and reports the result. Needs a package index pip can reach (PyPI or a mirror set in pip's config). The default
transformers / peft versions are the releases current with diffusers 0.31.0 (October 2024).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = "tests/test_diffusers_dropin.py"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers", default="0.31.0")
    ap.add_argument("--transformers", default="4.46.3", help="a transformers release compatible with --diffusers")
    ap.add_argument("--peft", default="0.13.2", help="a peft release compatible with --diffusers")
    ap.add_argument("--torch", default="2.13.0")
    ap.add_argument("--keep", action="store_true", help="keep the venv (its path is printed)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix=f"fastface-diffusers-{args.diffusers}-"))
    env_dir = tmp / "venv"
    start = time.perf_counter()
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [
        [*pip, f"torch=={args.torch}"],
        [*pip, f"diffusers=={args.diffusers}", f"transformers=={args.transformers}", f"peft=={args.peft}", "pytest"],
        [*pip, "-e", str(REPO)],
    ]
    for cmd in steps:
        if _run(cmd).returncode != 0:
            print(f"FAILED to set up the environment in {tmp}", flush=True)
            return 2
    versions = subprocess.run(
        [py, "-c", "import diffusers, transformers, peft, torch; print(diffusers.__version__, transformers.__version__,"
                   " peft.__version__, torch.__version__)"], capture_output=True, text=True, check=False,
    ).stdout.strip()
    setup_s = time.perf_counter() - start
    res = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST, *args.pytest_args], cwd=REPO)
    verdict = "PASSED" if res.returncode == 0 else f"FAILED (pytest exit {res.returncode})"
    print(f"diffusers/transformers/peft/torch = {versions}: {TEST} {verdict} "
          f"(setup {setup_s:.0f} s, tests {time.perf_counter() - start - setup_s:.0f} s)")
    if args.keep:
        print(f"venv kept at {env_dir}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())

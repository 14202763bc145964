"""The distribution: adapters/ and samplers/ install as fastface.adapters / fastface.samplers, in both install modes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _py_files(folder: str) -> set[str]:
    return {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py")}


def test_editable_install_imports_subpackages() -> None:
    import fastface
    import fastface.adapters
    import fastface.samplers

    assert Path(fastface.adapters.__file__).resolve().parent == ROOT / "adapters"
    assert Path(fastface.samplers.__file__).resolve().parent == ROOT / "samplers"
    assert fastface.__version__


def test_regular_install_has_every_module_and_no_top_level_adapters(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheel_dir)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("fastface-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not any(n.startswith(("adapters/", "samplers/")) for n in names), "top-level adapters/samplers installed"
    for folder, pkg in (("adapters", "fastface/adapters/"), ("samplers", "fastface/samplers/"), ("fastface", "fastface/")):
        missing = {f for f in _py_files(folder) if pkg + f not in names}
        assert not missing, f"{folder}: modules missing from the wheel (add the subpackage to pyproject): {missing}"

    # Import from the unpacked wheel in a fresh interpreter, away from the source tree.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "import fastface.adapters, fastface.samplers, fastface.models.loading, sys; print(fastface.adapters.__file__)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert str(target) in out.stdout

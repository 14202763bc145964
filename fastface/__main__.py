"""``python -m fastface ARGS`` is the ``fastface`` command (a module for ``torchrun -m fastface generate ...``)."""

from fastface.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

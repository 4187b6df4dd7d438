"""``python -m dist ...`` is the ``mmm4rec`` command (``dist/main.py``)."""
import sys

from dist.main import main

if __name__ == "__main__":   # importing this module (e.g. pkgutil.walk_packages) runs nothing
    sys.exit(main())

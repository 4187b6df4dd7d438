"""``python -m dist ...`` is the ``mmm4rec`` command (``dist/main.py``)."""
import sys

from dist.main import main

sys.exit(main())

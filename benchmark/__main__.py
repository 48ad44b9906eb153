"""Command line: python -m benchmark [--run RUN] [--submission DIR|ZIP] [--test X.npz] [--n N] [--quick] ..."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .bench import main  # noqa: E402

sys.exit(main())

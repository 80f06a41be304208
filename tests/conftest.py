"""Settings for the whole test run."""

from __future__ import annotations

import os

# The served backend is measured on first use on a machine (dense.serve.measure); in the test
# run it is the rule's (dense.serve.backends), so that tests asserting a backend do not depend
# on the host's timings, and loads do not time candidates or write ~/.cache/dense/backends.json.
# tests/test_backend_choice.py turns measuring back on with a fake clock and its own cache.
# `DENSE_BACKEND_MEASURE=1 python -m pytest` runs everything with measuring.
os.environ.setdefault("DENSE_BACKEND_MEASURE", "0")

"""Moved to :mod:`dense.serve.devices` and :mod:`dense.serve.backends`; these names remain here
only for the modules not yet switched over (dense.tasks.restoration, dense.lab, dense.train,
dense.ui.restore). Import from ``dense.serve`` in new code; delete this file once none use it."""

from dense.serve.backends import (  # noqa: F401 - re-exported
    BACKENDS,
    EXPORT_BACKENDS,
    EXPORT_RUNTIMES,
    export_runtime,
    pick_backend,
    runtime_available,
    served_size,
)
from dense.serve.devices import (  # noqa: F401 - re-exported
    CudaGraphForward,
    autocast_dtype,
    capture_cuda_graph,
    inference,
    keep_freed_memory,
    model_device,
    pick_device,
)

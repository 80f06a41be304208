"""The serving layer: a zoo module run on the fastest backend measured for it on this machine.

``dense.zoo`` resolves, verifies and builds a plain eager module; this package decides how to
run it (device, precision, ONNX export through OpenVINO or onnxruntime, channels_last PyTorch,
CUDA graphs) and wraps it in one explicit object, :class:`ServedModel`. Tasks and the UI call
:func:`load_served` / :func:`cached_load`.

    backends.py  the candidate backends per device and kind of model, and the rule's choice
                 (``DENSE_BACKEND`` forces one)
    measure.py   the candidates timed once per machine, the winner cached (``dense backends``)
    devices.py   device and precision: CUDA graphs, autocast, glibc's freed memory
    export.py    our ONNX exports and the runtimes serving them; `dense export onnx`
    served.py    ServedModel, serve(), load_served(), cached_load()
"""

from dense.serve.backends import BACKENDS, pick_backend
from dense.serve.devices import inference, model_device, pick_device
from dense.serve.served import ServedModel, cached_load, load_served, serve

__all__ = ["BACKENDS", "ServedModel", "cached_load", "inference", "load_served",
           "model_device", "pick_backend", "pick_device", "serve"]

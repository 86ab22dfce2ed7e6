"""Deployments: the integer runtimes a study's models ship on, one registered class each.

A deployment takes one of the study's trained models (the fp32 network for post-training
quantization, or a QAT model as trained), exports it to a runtime, opens the runtime's session,
and names the torch model that simulates it, so a study can check that simulation against the
runtime. Adding a runtime is one file with one ``@DEPLOYMENTS.register`` class.
"""

from quantpatch.deployments import onnxruntime as _onnxruntime  # noqa: F401 - registers
from quantpatch.deployments.base import DEPLOYMENTS, Deployment, create_deployment

__all__ = ["DEPLOYMENTS", "Deployment", "create_deployment"]

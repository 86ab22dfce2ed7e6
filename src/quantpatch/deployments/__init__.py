"""Deployments: the integer runtimes a study's models ship on, one registered class each.

A deployment takes one of the study's trained models (the fp32 network for post-training
quantization, or a QAT model as trained), exports it to a runtime, opens the runtime's session,
and names the torch model that simulates it, so a study can check that simulation against the
runtime. Adding a runtime is one file with one ``@DEPLOYMENTS.register`` class.

Every runtime is imported only inside its methods, so all deployments register on the core
install; ``create_deployment`` refuses one whose runtime is missing, naming its pip extra
(``quantpatch[openvino]``, ``quantpatch[executorch]``, ``quantpatch[litert]``).
"""

from quantpatch.deployments import executorch as _executorch  # noqa: F401 - registers
from quantpatch.deployments import litert as _litert  # noqa: F401 - registers
from quantpatch.deployments import onnxruntime as _onnxruntime  # noqa: F401 - registers
from quantpatch.deployments import openvino as _openvino  # noqa: F401 - registers
from quantpatch.deployments.base import DEPLOYMENTS, Deployment, create_deployment

__all__ = ["DEPLOYMENTS", "Deployment", "create_deployment"]

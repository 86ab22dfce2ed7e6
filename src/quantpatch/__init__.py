"""quantpatch: how adversarial patches attack quantized neural networks.

Sub-packages, in data-flow order: ``data`` -> ``models`` -> ``quant`` -> ``attacks`` ->
``metrics``/``analysis`` -> ``study`` -> ``report``; ``cli`` drives them.
"""

__version__ = "0.1.0"

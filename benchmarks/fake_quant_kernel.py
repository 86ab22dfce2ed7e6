"""Why fake quantization costs what it does on a CPU: PyTorch's native fake-quant kernel.

``fake_quant_cost.py`` measures w4a4 / fp32 for whole models. This script takes the one op
that dominates the difference, ``torch.fake_quantize_per_tensor_affine`` (every activation
quantizer), apart on one ResNet-20-sized activation (128 x 16 x 28 x 28 floats):
- the native op with tensor and with scalar qparams, at one thread and at every core, on
  non-negative inputs (ReLU outputs) and on signed ones (the first layer's normalised pixels);
- for scale only, an elementwise multiply and the same rounding written as ``round``/``clamp``
  ops (not used by quantpatch, whose standard is the native op; it shows what a vectorised
  kernel would cost);
- ``torch.compile`` (Inductor) of the op, and of a calibrated w4a4 ResNet-20's forward +
  backward against eager, with whether the compiled model's input gradient is bit-identical.
Median of ``torch.utils.benchmark`` autoranges; the JSON records the load.

Run: ``python benchmarks/fake_quant_kernel.py`` (``--quick``: no torch.compile).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    environment,
    load1,
    measured,
    mnist,
    print_table,
    setup_threads,
    write_results,
)

from quantpatch.models import create_model
from quantpatch.quant import QuantSpec, calibrate, quantize

SHAPE = (128, 16, 28, 28)


def median_ms(stmt: str, scope: dict[str, Any], seconds: float) -> float:
    """At the process's thread count: ``Timer`` would run one thread unless told."""
    timer = tb.Timer(stmt, globals=scope, num_threads=torch.get_num_threads())
    return 1000 * timer.blocked_autorange(min_run_time=seconds).median


def op_rows(cores: int, seconds: float) -> list[dict[str, Any]]:
    """The native op and its references, at each thread count and input sign."""
    gen = torch.Generator().manual_seed(0)
    inputs = {"non-negative": torch.rand(SHAPE, generator=gen),
              "signed": torch.randn(SHAPE, generator=gen)}  # fmt: skip
    scale, zero = torch.tensor([0.01]), torch.tensor([0], dtype=torch.int32)
    stmts = {
        "native fake-quant, tensor qparams": "torch.fake_quantize_per_tensor_affine(x, s, z, 0, 15)",
        "native fake-quant, scalar qparams": "torch.fake_quantize_per_tensor_affine(x, 0.01, 0, 0, 15)",
        "reference: round/clamp ops": "torch.clamp(torch.round(x * 100.0), 0, 15) * 0.01",
        "reference: x * 2": "x * 2",
    }  # fmt: skip
    rows = []
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        for sign, x in inputs.items():
            for what, stmt in stmts.items():
                scope = {"torch": torch, "x": x, "s": scale, "z": zero}
                ms = median_ms(stmt, scope, seconds)
                rows.append({"op": what, "threads": threads, "input": sign, "median_ms": ms,
                             "ns_per_element": 1e6 * ms / x.numel()})  # fmt: skip
    torch.set_num_threads(cores)
    return rows


def compiled_rows(seconds: float) -> list[dict[str, Any]]:
    """Inductor against eager: the op alone, and a w4a4 ResNet-20 forward + backward."""
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    scale, zero = torch.tensor([0.01]), torch.tensor([0], dtype=torch.int32)

    def op(t: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(t, scale, zero, 0, 15)

    started = time.perf_counter()
    compiled_op = torch.compile(op)
    compiled_op(x)
    rows = [{"case": "fake-quant op (forward)", "compile_s": time.perf_counter() - started,
             "eager_ms": median_ms("f(x)", {"f": op, "x": x}, seconds),
             "compiled_ms": median_ms("f(x)", {"f": compiled_op, "x": x}, seconds),
             "bit_identical": bool(torch.equal(op(x), compiled_op(x)))}]  # fmt: skip
    data = mnist()
    images, labels = data.train.images[:128], data.train.labels[:128]
    torch.manual_seed(0)
    fp32 = create_model("resnet20", in_channels=1, num_classes=10, image_size=28).eval()
    model = quantize(fp32, QuantSpec.parse("w4a4"))
    calibrate(model, images, "minmax", "cpu")
    model.eval().requires_grad_(False)
    inputs = images.clone().requires_grad_(True)

    def step(m: torch.nn.Module) -> torch.Tensor:
        return torch.autograd.grad(F.cross_entropy(m(inputs), labels), inputs)[0]

    started = time.perf_counter()
    compiled = torch.compile(model)
    step(compiled)
    rows.append({"case": "w4a4 resnet20 fwd+bwd, batch 128", "compile_s": time.perf_counter() - started,
                 "eager_ms": median_ms("f(m)", {"f": step, "m": model}, seconds),
                 "compiled_ms": median_ms("f(m)", {"f": step, "m": compiled}, seconds),
                 "bit_identical": bool(torch.equal(step(model), step(compiled)))})  # fmt: skip
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    seconds = 0.2 if args.quick else 1.0
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "fake_quant_kernel.json")
    env = environment(torch.device("cpu"), cores=cores)
    load, start = load1(), time.perf_counter()
    ops = op_rows(cores, seconds)
    compiled = [] if args.quick else compiled_rows(seconds)
    case = {"case": "all", "ops": ops, "compiled": compiled,
            "measured": measured(load, None, time.perf_counter() - start)}  # fmt: skip
    write_results(out, {"benchmark": "fake_quant_kernel", "environment": env,
                        "shape": list(SHAPE), "results": [case]}, ("case",), False)  # fmt: skip
    print_table(
        f"one activation {SHAPE}, median ms",
        ["op", "threads", "input", "ms", "ns/element"],
        [[r["op"], r["threads"], r["input"], r["median_ms"], r["ns_per_element"]] for r in ops],
    )
    if compiled:
        print_table(
            "torch.compile (Inductor) against eager",
            ["case", "compile s", "eager ms", "compiled ms", "bit-identical"],
            [
                [r["case"], r["compile_s"], r["eager_ms"], r["compiled_ms"], r["bit_identical"]]
                for r in compiled
            ],  # fmt: skip
        )


if __name__ == "__main__":
    main()

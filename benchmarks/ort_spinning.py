"""ONNX Runtime int8 with its intra-op workers spinning (ORT's default) or not (quantpatch's).

Each (model, spinning) runs in its own process, so one session's spinning workers never steal
the cores another is timed on. Two measurements per batch size (1 and 128), 2 intra-op
threads: "alone" times ``session.run`` back to back, as a serving benchmark would; "beside
torch" times one iteration of 20 small torch ops on the batch (the bookkeeping a query attack
does between queries) followed by ``session.run``, as quantpatch uses the session. Weights
are random and calibrated on random images (latency does not depend on them).

Run: ``python benchmarks/ort_spinning.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import CACHE, RESULTS, base_parser, environment, print_table, write_results

SHAPES = {"lenet": (1, 28, 28), "resnet20": (3, 32, 32)}
BATCHES = (1, 128)
TORCH_OPS = 20


def export(arch: str, work: Path) -> Path:
    from quantpatch.models import create_model
    from quantpatch.quant.onnx import export_onnx, quantize_onnx_int8

    shape = SHAPES[arch]
    torch.manual_seed(0)
    model = create_model(arch, in_channels=shape[0], num_classes=10, image_size=shape[1]).eval()
    calibration = torch.rand(256, *shape)
    export_onnx(model, work / f"{arch}.onnx", calibration[:1])
    return quantize_onnx_int8(work / f"{arch}.onnx", work / f"{arch}-int8.onnx", calibration)


def measure(path: Path, arch: str, spinning: bool, calls: int) -> list[dict]:
    """In this process: both measurements at every batch size for one session."""
    import numpy as np
    import onnxruntime as ort

    torch.set_num_threads(2)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = []
    for batch in BATCHES:
        images = torch.rand(batch, *SHAPES[arch])
        feed = {name: images.numpy().astype(np.float32)}
        n = calls if batch == 1 else max(3, calls // 5)

        def alone(feed: dict = feed) -> None:
            session.run(None, feed)

        def beside_torch(images: torch.Tensor = images) -> None:
            x = images
            for _ in range(TORCH_OPS):
                x = (x * 1.01).clamp_(0, 1)
            session.run(None, {name: x.numpy()})

        for label, step in (("alone", alone), ("beside torch", beside_torch)):
            for _ in range(10):
                step()
            times = []
            for _ in range(n):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            rows.append({"model": arch, "batch": batch, "use": label, "spinning": spinning,
                         "median_s": statistics.median(times), "best_s": min(times)})  # fmt: skip
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("PATH", "MODEL", "SPIN"), help="internal")
    args = parser.parse_args()
    calls = 40 if args.quick else 400
    if args.child:
        path, arch, spin = args.child
        print(json.dumps(measure(Path(path), arch, spin == "1", calls)))
        return
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "ort_spinning.json")
    results = []
    with tempfile.TemporaryDirectory(prefix="quantpatch-spin-") as work:
        for arch in SHAPES:
            path = export(arch, Path(work))
            for spin in ("1", "0"):
                child = [sys.executable, __file__, "--child", str(path), arch, spin]
                if args.quick:
                    child.append("--quick")
                done = subprocess.run(child, capture_output=True, text=True, check=True)
                results += json.loads(done.stdout.strip().splitlines()[-1])
    by = {(r["model"], r["batch"], r["use"], r["spinning"]): r for r in results}
    rows = [
        (m, b, use, 1e3 * by[(m, b, use, True)]["median_s"], 1e3 * by[(m, b, use, False)]["median_s"],
         by[(m, b, use, False)]["median_s"] / by[(m, b, use, True)]["median_s"])
        for (m, b, use, spinning) in by if spinning
    ]  # fmt: skip
    print_table("ORT int8, 2 threads: median ms per call",
                ("model", "batch", "use", "spinning", "no spinning", "no/yes"), rows)  # fmt: skip
    env = environment(torch.device("cpu"), cores=2)
    data = {"benchmark": "ort_spinning", "environment": env, "results": results,
            "settings": {"threads": 2, "torch_ops_between_calls": TORCH_OPS, "calls": calls}}  # fmt: skip
    write_results(out, data, ("model", "batch", "use", "spinning"), args.merge)


if __name__ == "__main__":
    main()

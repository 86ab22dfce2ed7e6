"""argparse front end. Bad input -> one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from quantpatch import __version__
from quantpatch.errors import QuantpatchError

EXIT_BAD_INPUT = 2


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantpatch",
        description="Measure how adversarial patches attack quantized neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"quantpatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study (the embedded default study without a file)")
    run.add_argument("study", nargs="?", type=Path, help="study YAML file")
    _add_data_args(run)
    run.add_argument("--models", type=_csv, help="comma-separated architectures")
    run.add_argument("--precisions", type=_csv, help="e.g. fp32,w8a8,w4a4,w2a2")
    run.add_argument("--attacks", type=_csv, help="comma-separated attack names")
    run.add_argument("--patch-size", type=int, action="append", dest="patch_sizes", help="px")
    run.add_argument("--seed", type=int, action="append", dest="seeds")
    run.add_argument("--n-eval", type=int, help="test images each patch is evaluated on")
    run.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime int8 target")
    run.add_argument("--out", type=Path, help="run folder (default runs/<study name>)")
    run.add_argument("--cache-dir", type=Path)
    run.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_cmd_run)

    train = sub.add_parser("train", help="train (and quantize) one model, cached by content")
    train.add_argument("--model", required=True)
    _add_data_args(train)
    train.add_argument("--precision", default="fp32")
    train.add_argument("--epochs", type=int)
    train.add_argument("--qat-epochs", type=int)
    train.add_argument("--out", type=Path, help="copy the checkpoint here (.safetensors)")
    train.add_argument("--cache-dir", type=Path)
    train.add_argument("--device", default=None)
    train.set_defaults(handler=_cmd_train)

    report = sub.add_parser("report", help="rebuild report.html from a run's results alone")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, help="HTML file (default RUN_DIR/report.html)")
    report.set_defaults(handler=_cmd_report)

    lister = sub.add_parser("list", help="print a registry")
    lister.add_argument("what", choices=["datasets", "models", "attacks", "defenses"])
    lister.set_defaults(handler=_cmd_list)

    schema = sub.add_parser("schema", help="print the JSON Schema of study configs or results")
    schema.add_argument("what", choices=["study", "results"])
    schema.set_defaults(handler=_cmd_schema)
    return parser


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="registered dataset name (default mnist5k)")
    parser.add_argument("--data-root", type=Path, help="folder holding the dataset files")
    parser.add_argument(
        "--download", action="store_true", default=None, help="allow downloading the dataset"
    )
    parser.add_argument("--limit", type=int, help="cap images per split (quick runs)")


def _cmd_run(args: argparse.Namespace) -> int:
    from quantpatch.report import build_report
    from quantpatch.study import load_study, run_study

    attacks = [{"name": name} for name in args.attacks] if args.attacks else None
    config = load_study(
        args.study,
        dataset=args.dataset,
        data_root=args.data_root,
        download=args.download,
        limit=args.limit,
        models=args.models,
        precisions=args.precisions,
        attacks=attacks,
        patch_sizes=args.patch_sizes,
        seeds=args.seeds,
        n_eval=args.n_eval,
        ort_int8=False if args.no_ort else None,
        cache_dir=args.cache_dir,
        device=args.device,
    )
    out = args.out or Path("runs") / config.name
    results = run_study(config, out, progress=not args.quiet)
    print(f"results: {results}")
    print(f"report:  {build_report(out)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from quantpatch.study import train_one

    path, clean = train_one(
        model=args.model,
        precision=args.precision,
        dataset=args.dataset,
        data_root=args.data_root,
        download=args.download,
        limit=args.limit,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        cache_dir=args.cache_dir,
        device=args.device,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out)
        path = args.out
    print(f"{args.model}/{args.precision}: clean accuracy {clean}")
    print(f"checkpoint: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from quantpatch.report import build_report

    print(f"report: {build_report(args.run_dir, args.out)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args.what)
    width = max(len(name) for name, _ in registry.describe())
    for name, help_text in registry.describe():
        print(f"{name:<{width}}  {help_text}")
    if args.what == "models":
        print(f"{'tv:<name>':<{width}}  any torchvision classifier (weights from a local file)")
    return 0


def _registry(what: str):
    if what == "datasets":
        from quantpatch.data import DATASETS as registry
    elif what == "models":
        from quantpatch.models import MODELS as registry
    elif what == "attacks":
        from quantpatch.attacks import ATTACKS as registry
    else:
        from quantpatch.defenses import DEFENSES as registry
    return registry


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.what == "study":
        from quantpatch.study import StudyConfig

        schema = StudyConfig.model_json_schema()
    else:
        from quantpatch.results import results_schema

        schema = results_schema()
    print(json.dumps(schema, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except QuantpatchError as exc:
        print(f"quantpatch: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("quantpatch: interrupted; finished cells are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

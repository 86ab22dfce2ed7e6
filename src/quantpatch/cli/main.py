"""argparse front end. Bad input -> one line on stderr and exit code 2, never a traceback.

That covers usage errors (argparse's multi-line usage dump is replaced by one line and a
``--help`` hint), impossible counts (refused by the argument types), unwritable outputs (checked
before any work) and any ``OSError`` (a full disk, a folder removed mid-run)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from quantpatch import __version__
from quantpatch._io import atomic_path, require_writable_dir, require_writable_file
from quantpatch.errors import QuantpatchError
from quantpatch.study.settings.limits import MAX_REPLICATES

EXIT_BAD_INPUT = 2


class _UsageError(QuantpatchError):
    """A command line argparse refused (reported like any other bad input)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line plus a ``--help`` hint."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _csv_or_none(value: str) -> list[str]:
    """argparse type: comma-separated names, or 'none' for an empty list."""
    return [] if value.strip().lower() == "none" else _csv(value)


def _csv(value: str) -> list[str]:
    """argparse type: a non-empty comma-separated list of names."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {value!r}")
    return names


def _count(value: str) -> int:
    """argparse type: a positive integer (epochs, images, pixels)."""
    return _int_in_range(value, 1)


def _seed(value: str) -> int:
    """argparse type: a non-negative integer (numpy refuses negative seeds)."""
    return _int_in_range(value, 0)


def _replicates(value: str) -> int:
    """argparse type: a replicate count, refused before any import of torch."""
    return _int_in_range(value, 1, MAX_REPLICATES)


def _int_in_range(value: str, low: int, high: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
    if high is not None and number > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    run.add_argument("--patch-size", type=_count, action="append", dest="patch_sizes", help="px")
    run.add_argument("--seed", type=_seed, action="append", dest="seeds")
    run.add_argument("--n-eval", type=_count, help="test images each patch is evaluated on")
    run.add_argument(
        "--replicates",
        type=_replicates,
        help="train every model N times from independent seeds (1-100)",
    )
    run.add_argument(
        "--deployments",
        type=_csv_or_none,
        help="integer runtimes every model also ships on, e.g. ort-int8,ort-w8a8 "
        "(`quantpatch list deployments`); 'none' for no runtime",
    )
    run.add_argument("--epochs", type=_seed, help="fp32 training epochs of every architecture")
    run.add_argument("--qat-epochs", type=_seed, help="QAT epochs of every precision and recipe")
    run.add_argument("--steps", type=_count, help="step budget of every attack that takes one")
    run.add_argument(
        "--analyses",
        type=_csv_or_none,
        help="which 'why' analyses run: none, all, or some of gradient_alignment,features,"
        "spatial,size_curve,quant_strength",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 replicate, 100 images, 1 epoch, 10 steps, no analyses (the other "
        "flags win over it); its figures are not findings",
    )
    run.add_argument("--out", type=Path, help="run folder (default runs/<study name>)")
    run.add_argument("--cache-dir", type=Path)
    run.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--executor", choices=["local", "ray"], help="run here (default) or on a Ray cluster"
    )
    run.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (--executor ray)")
    run.set_defaults(handler=_cmd_run)

    train = sub.add_parser("train", help="train (and quantize) one model, cached by content")
    train.add_argument("--model", required=True)
    _add_data_args(train)
    train.add_argument("--precision", default="fp32")
    train.add_argument("--epochs", type=_count)
    train.add_argument("--qat-epochs", type=_count)
    train.add_argument("--out", type=Path, help="copy the checkpoint here (.safetensors)")
    train.add_argument("--cache-dir", type=Path)
    train.add_argument("--device", default=None)
    train.set_defaults(handler=_cmd_train)

    report = sub.add_parser("report", help="rebuild report.html from a run's results alone")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, help="HTML file (default RUN_DIR/report.html)")
    report.set_defaults(handler=_cmd_report)

    compare = sub.add_parser(
        "compare", help="the same cells across runs (seeds, replicates, machines, commits)"
    )
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", type=Path, help="also write an HTML page with the figure")
    compare.add_argument(
        "--all", action="store_true", help="print every common row, not only those marked"
    )
    compare.set_defaults(handler=_cmd_compare)

    lister = sub.add_parser("list", help="print a registry")
    lister.add_argument(
        "what", choices=["datasets", "models", "attacks", "defenses", "recipes", "deployments"]
    )
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
    parser.add_argument("--limit", type=_count, help="cap images per split (quick runs)")


def _cmd_run(args: argparse.Namespace) -> int:
    # the config is validated before the runner and the report load: a refusal costs no more
    from quantpatch.study.settings.config import Shortcuts, load_study

    attacks = [{"name": name} for name in args.attacks] if args.attacks else None
    shortcuts = Shortcuts.of(epochs=args.epochs, qat_epochs=args.qat_epochs, steps=args.steps,
                          analyses=args.analyses, quick=args.quick)  # fmt: skip
    config = load_study(
        args.study,
        shortcuts=shortcuts,
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
        replicates=args.replicates,
        deployments=args.deployments,
        cache_dir=args.cache_dir,
        device=args.device,
        executor=args.executor,
        ray_address=args.address,
    )
    from quantpatch.report import build_report
    from quantpatch.study.run.runner import run_study

    out = args.out or Path("runs") / config.name
    results = run_study(config, out, progress=not args.quiet)
    print(f"results: {results}")
    print(f"report:  {build_report(out)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from quantpatch.study import StudyConfig, train_one

    out = require_writable_file(args.out, "checkpoint file") if args.out else None
    cache_dir = args.cache_dir or StudyConfig.model_fields["cache_dir"].default
    require_writable_dir(cache_dir, "cache folder")
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
    if out:
        with atomic_path(out) as tmp:
            shutil.copyfile(path, tmp)
        path = out
    print(f"{args.model}/{args.precision}: clean accuracy {clean}")
    print(f"checkpoint: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from quantpatch.report import build_report

    out = require_writable_file(args.out, "report file") if args.out else None
    print(f"report: {build_report(args.run_dir, out)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from quantpatch.report.compare import compare_runs, comparison_rows, write_comparison

    out = require_writable_file(args.out, "comparison page") if args.out else None
    comparison = compare_runs(args.run_dirs)
    rows = comparison_rows(comparison)
    marked = [row for row, r in zip(rows, comparison.rows, strict=True) if any(r.differs)]
    shown = rows if args.all else marked
    print("\t".join(["quantity", *comparison.runs]))
    for row in shown:
        print("\t".join(row))
    print(f"{len(marked)} of {len(rows)} common rows differ from {comparison.runs[0]} beyond "
          f"the 95 % intervals (marked *); {comparison.only_some} in only some runs")  # fmt: skip
    if out is not None:
        print(f"comparison: {write_comparison(comparison, out)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args.what)
    width = max(len(name) for name, _ in registry.describe())
    for name, help_text in registry.describe():
        print(f"{name:<{width}}  {help_text}")
    if args.what == "models":
        print(f"{'tv:<name>':<{width}}  any torchvision classifier (weights from a local file)")
        print(f"{'timm:<name>':<{width}}  any timm classifier (pip install 'quantpatch[timm]')")
    return 0


def _registry(what: str):
    if what == "datasets":
        from quantpatch.data import DATASETS as registry
    elif what == "models":
        from quantpatch.models import MODELS as registry
    elif what == "attacks":
        from quantpatch.attacks import ATTACKS as registry
    elif what == "defenses":
        from quantpatch.defenses import DEFENSES as registry
    elif what == "deployments":
        from quantpatch.deployments import DEPLOYMENTS as registry
    else:
        from quantpatch.defenses.training import RECIPES as registry
    return registry


def _cmd_schema(args: argparse.Namespace) -> int:
    from quantpatch.schemas import shipped

    print(json.dumps(shipped(args.what), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
        return args.handler(args)
    except QuantpatchError as exc:
        return _fail(str(exc))
    except BrokenPipeError:  # `quantpatch list ... | head`: the reader left, nothing to say
        sys.stdout = None  # type: ignore[assignment]  # no flush error at exit either
        return 0
    except OSError as exc:  # the disk or a path, not a bug: one line as well
        return _fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        print("quantpatch: interrupted; finished cells are kept, rerun to resume", file=sys.stderr)
        return 130


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; unknown options get the subcommand's ``--help`` hint (argparse would
    report them from the top-level parser)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise _UsageError(
            f"unrecognized arguments: {' '.join(unknown)} (see 'quantpatch {args.command} --help')"
        )
    return args


def _fail(message: str) -> int:
    print(f"quantpatch: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

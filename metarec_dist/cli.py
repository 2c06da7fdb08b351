"""Command line: parse, load config, call one function per subcommand.

Errors the user can fix (``MetarecError``) print as one ``error:`` line on
stderr and exit with status 2; results go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from metarec_dist.allocator import keep_freed_memory
from metarec_dist.errors import ConfigError, MetarecError, RunInterrupted

if TYPE_CHECKING:  # the CLI imports its heavy modules where a command needs them
    from metarec_dist.storage import Location

DEFAULT_STORE = Path("store")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT

log = logging.getLogger("metarec_dist")


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", type=Path, default=DEFAULT_STORE, help=f"domain store directory (default: ./{DEFAULT_STORE})"
    )


def build_parser() -> argparse.ArgumentParser:
    from metarec_dist.data.readers import FORMATS

    parser = argparse.ArgumentParser(
        prog="metarec-dist", description="Distributed trainer for transferable sequential recommendation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="import, generate and inspect domains").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )

    imp = data.add_parser("import", help="import an interaction file as a domain")
    imp.add_argument("path", type=Path, help="interaction file (.txt sequences, .inter, .csv/.tsv, .parquet)")
    _add_store(imp)
    imp.add_argument("--name", help="domain name (default: the file name without extensions)")
    imp.add_argument("--format", choices=FORMATS, help="override the format implied by the extension")
    imp.add_argument("--user-column", default="user_id", help="user column (CSV/Parquet/RecBole)")
    imp.add_argument("--item-column", default="item_id", help="item column (CSV/Parquet/RecBole)")
    imp.add_argument(
        "--timestamp-column", default="timestamp", help="time column; '' keeps file order (CSV/Parquet/RecBole)"
    )
    imp.add_argument("--k-core", type=int, default=0, help="keep users and items with >= K events (0: off)")
    imp.add_argument("--min-length", type=int, default=3, help="drop users with fewer events (>= 3)")
    imp.add_argument("--max-length", type=int, default=None, help="keep only each user's most recent events")
    imp.add_argument("--no-reindex", action="store_true", help="keep positive integer ids instead of 1..N")
    imp.add_argument("--keep-duplicates", action="store_true", help="keep exact duplicate events")
    imp.add_argument("--overwrite", action="store_true", help="replace a domain of the same name")
    imp.add_argument("--json", action="store_true", help="print the import report as one JSON object")

    describe = data.add_parser("describe", help="statistics of one domain")
    describe.add_argument("name", help="domain name")
    _add_store(describe)
    describe.add_argument("--json", action="store_true", help="print one JSON object")

    listing = data.add_parser("list", help="the domains in a store")
    _add_store(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON object")

    generate = data.add_parser("generate", help="generate the embedded synthetic domains")
    _add_store(generate)
    generate.add_argument("--config", type=Path, help="generator config YAML (default: built-in defaults)")
    generate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    generate.add_argument("--overwrite", action="store_true", help="replace domains made with other settings")

    log = data.add_parser("generate-log", help="generate one large domain: a Zipf-popularity interaction log")
    _add_store(log)
    log.add_argument("--name", required=True, help="domain name")
    log.add_argument("--items", type=_positive, required=True, help="catalog size")
    log.add_argument("--users", type=_positive, help="default: items / 5")
    log.add_argument("--interactions", type=_positive, help="default: 5 per item")
    log.add_argument("--seed", type=int, default=0)
    log.add_argument("--overwrite", action="store_true", help="replace an existing domain of this name")
    train = commands.add_parser("train", help="train one method on domains from a store")
    train.add_argument("config", type=Path, nargs="?", help="run config YAML (see configs/)")
    train.add_argument(
        "--resume", type=Path, metavar="RUN_DIR",
        help="continue a stopped distributed run from its last complete checkpoint (--set runner.* allowed)",
    )
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=500",
    )
    train.add_argument("--reference", type=Path, metavar="RUN_DIR",
                       help="a finished target_only run on the same data: warn if it validates better")

    compare = commands.add_parser("compare", help="train several methods over seeds on one config and compare them")
    compare.add_argument("config", type=Path, help="run config YAML (see configs/)")
    compare.add_argument("--methods", nargs="*", default=["target_only", "joint", "uniform", "metarec"],
                         choices=["target_only", "joint", "uniform", "metarec"])
    compare.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key for every run")
    compare.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                         help="override a config key for one method's runs")
    compare.add_argument("--tuned", action="append", default=[], type=Path, metavar="TUNE_DIR",
                         help="run a method with the best settings of its `metarec-dist tune` directory")
    compare.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                         help="an extra named row with its own overrides (e.g. target_only on 100%% of the data); "
                         "commas inside [ ] or { } belong to a value")

    tune = commands.add_parser("tune", help="search one method's settings (tune.space) with Ray Tune, on validation")
    tune.add_argument("config", type=Path, help="run config YAML with a tune.space section")
    tune.add_argument("--method", required=True, choices=["target_only", "joint", "uniform", "metarec"])
    tune.add_argument("--trials", type=_positive, help="trials (default: the config's tune.trials)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set train.steps=500")

    evaluate = commands.add_parser("evaluate", help="re-evaluate a finished run's model (validation and test)")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory with model.pt")
    evaluate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="change how it is evaluated, e.g. --set eval.retrieval.index=hnsw (eval.* only)",
    )
    export = commands.add_parser("export", help="item vectors, a FAISS index and the encoder of a finished run")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory with model.pt")
    export.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="e.g. --set eval.retrieval.index=ivf_pq for the saved index (eval.* only)",
    )

    cluster = commands.add_parser("cluster", help="cluster definitions (cluster/)").add_subparsers(
        dest="cluster_command", required=True, metavar="SUBCOMMAND"
    )
    check = cluster.add_parser(
        "check", help="validate KubeRay manifests against KubeRay's CRDs and launcher YAMLs against Ray's schema"
    )
    check.add_argument("files", type=Path, nargs="+", metavar="FILE")
    check.add_argument("--crds", type=Path, metavar="DIR",
                       help="a folder with KubeRay's ray.io_rayjobs.yaml and ray.io_rayclusters.yaml")

    bench = commands.add_parser("bench", help="offline benchmarks").add_subparsers(
        dest="bench_command", required=True, metavar="SUBCOMMAND"
    )
    retrieval = bench.add_parser("retrieval", help="exact and approximate top-k search on large synthetic catalogs")
    retrieval.add_argument("--items", type=int, nargs="+", default=[1_000_000], help="catalog sizes")
    retrieval.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="vector widths")
    retrieval.add_argument("--queries", type=int, default=4096, help="queries per catalog")
    retrieval.add_argument("--k", type=int, default=10, help="top-k")
    retrieval.add_argument("--repeats", type=int, default=3, help="timed passes per searcher (median)")
    retrieval.add_argument(
        "--approximate", nargs="*", metavar="LABEL",
        help="approximate settings to run, by label (default: all of retrieval.benchmark.DEFAULT_APPROXIMATE)",
    )
    retrieval.add_argument(
        "--norm-sigma", type=float, default=0.25, help="spread of the log item norms (0: every item has norm 1)"
    )
    retrieval.add_argument(
        "--output-dir", type=Path, default=Path("bench-runs"), help="a new directory is made here per run"
    )
    return parser


def cmd_evaluate(args: argparse.Namespace) -> None:
    import time

    from metarec_dist.eval.metrics import metrics_from_ranks
    from metarec_dist.meta.evaluation import rank_users
    from metarec_dist.meta.saved_run import load_saved_run
    from metarec_dist.report.run_directory import unused_path, write_json
    from metarec_dist.report.tables import format_table

    saved = load_saved_run(args.run_dir, args.overrides)
    config = saved.config
    results = {"run": str(args.run_dir), "retrieval": config.eval.retrieval.model_dump(), "overrides": args.overrides}
    for stage in ("valid", "test"):
        started = time.perf_counter()
        ranks = rank_users(saved.model, config.data.target, saved.data.split, stage, config.eval,
                           config.model.encoder.max_length)
        results[stage] = {**metrics_from_ranks(ranks, config.eval.ks), "users": len(ranks),
                          "seconds": time.perf_counter() - started}
    # Never replace an earlier evaluation.
    path = unused_path(args.run_dir, time.strftime("evaluation-%Y%m%d-%H%M%S", time.gmtime()), ".json")
    write_json(path, results)
    names = [f"{m}@{k}" for m in ("HR", "NDCG") for k in config.eval.ks] + ["MRR", "seconds"]
    rows = [{"stage": stage, **{name: results[stage][name] for name in names}} for stage in ("valid", "test")]
    print(f"{config.data.target}: {results['test']['users']:,} users, searcher {config.eval.retrieval.index}")
    print(format_table(rows, ["stage", *names]))
    print(f"evaluation: {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from metarec_dist.meta.saved_run import load_saved_run
    from metarec_dist.report.export import export_run

    directory = export_run(load_saved_run(args.run_dir, args.overrides))
    for name in ("items.parquet", "items.faiss", "encoder.pt2", "manifest.json"):
        print(f"{directory / name}  ({(directory / name).stat().st_size / 2**20:.1f} MiB)")


def cmd_bench_retrieval(args: argparse.Namespace) -> None:
    from metarec_dist.machine import machine_description
    from metarec_dist.report.plots import recall_throughput_plot
    from metarec_dist.report.run_directory import create_run_dir, write_json
    from metarec_dist.report.tables import format_table
    from metarec_dist.retrieval.benchmark import DEFAULT_APPROXIMATE, BenchPlan, run_retrieval_benchmark

    for name in ("items", "widths"):
        if min(getattr(args, name)) < 1:
            raise ConfigError(f"bench retrieval: --{name} must be positive")
    if args.queries < 1 or args.repeats < 1 or not 1 <= args.k <= min(args.items) or args.norm_sigma < 0:
        raise ConfigError(
            "bench retrieval: --queries and --repeats must be >= 1, --k in 1..the smallest catalog, --norm-sigma >= 0"
        )
    known = {setting.label: setting for setting in DEFAULT_APPROXIMATE}
    chosen = known if args.approximate is None else args.approximate
    unknown = [label for label in chosen if label not in known]
    if unknown:
        raise ConfigError(f"bench retrieval: --approximate {unknown[0]!r} is unknown; known: {', '.join(known)}")
    import faiss
    import torch

    machine = machine_description(torch=torch.__version__, faiss=faiss.__version__,
                                  simd=torch.backends.cpu.get_cpu_capability())
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, {machine['ram_gib']} GiB RAM, "
          f"GPU: {machine['gpu']}, torch {machine['torch']} ({machine['simd']}), faiss {machine['faiss']}")
    run_dir = create_run_dir(args.output_dir, "retrieval")
    columns = ["items", "width", "searcher", "build_s", "queries_per_s", "recall", "memory_mb",
               "matmul_peak_fraction"]
    plan = BenchPlan(catalogs=[(n, d) for n in args.items for d in args.widths], queries=args.queries, k=args.k,
                     repeats=args.repeats, approximate=tuple(known[label] for label in chosen),
                     norm_sigma=args.norm_sigma)
    results = run_retrieval_benchmark(
        plan, progress=lambda row: print(format_table([row], columns).splitlines()[-1], flush=True)
    )
    results = {"machine": machine, "command": "metarec-dist " + " ".join(sys.argv[1:]), **results}
    write_json(run_dir / "retrieval.json", results)
    plot = recall_throughput_plot(results["rows"], run_dir / "recall_vs_throughput.png")
    print(f"fp32 matrix multiply on this machine: {results['matmul_fp32_gflops']:.0f} GFLOP/s; "
          f"fast bf16: {'yes' if results['bf16_fast'] else 'no'}")
    print(format_table(results["rows"], columns))
    print(f"results: {run_dir / 'retrieval.json'}\nplot: {plot}")


def cmd_train(args: argparse.Namespace) -> None:
    from metarec_dist.config import load_config
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.memory_check import check_training_memory
    from metarec_dist.meta.training_data import check_domains_present
    from metarec_dist.report.run_directory import create_run_dir, write_yaml
    from metarec_dist.report.summary import format_run_summary

    if (args.config is None) == (args.resume is None):
        raise ConfigError("train: give a CONFIG file, or --resume RUN_DIR (not both)")
    resume_from = None
    if args.resume is not None:
        run_dir = args.resume
        config = _resumed_config(run_dir, args.overrides)
        resume_from = _last_checkpoint(run_dir, config)
    else:
        config = load_config(ExperimentConfig, args.config, args.overrides)
    check_domains_present(config)  # fails on a missing domain before anything is written
    check_training_memory(config)  # and on a run that cannot fit in memory
    reference = _reference_results(args.reference, config) if args.reference else None
    if resume_from is None:
        run_dir = create_run_dir(config.output_dir, f"{config.method}-{config.data.target}")
        write_yaml(run_dir / "config.yaml", config.model_dump(mode="json"))
    try:
        outcome, plots, tensorboard = train_into(run_dir, config, resume_from, reference)
    except RunInterrupted as interrupted:
        _record_interruption(run_dir, config, interrupted.step, args)
        raise
    print(format_run_summary(outcome.results))
    if outcome.results.get("reference", {}).get("warning"):
        print(outcome.results["reference"]["warning"])
    print(f"plots: {', '.join(str(path) for path in plots)}")
    if tensorboard is not None:
        print(f"tensorboard: tensorboard --logdir {tensorboard.directory}")
    print(f"results: {run_dir / 'results.json'}")


def train_into(run_dir: Path, config, resume_from: Location | None = None, reference: dict | None = None):
    """Train ``config`` (in this process, or on Ray Train workers) into ``run_dir``: its log,
    ``model.pt``, ``results.json`` and plots. Returns (outcome, plots, TensorBoard log or None).

    ``reference``: a target-only run's results on the same data; ``results.json`` then says
    whether this run validated better (``reference.negative_transfer``)."""
    from metarec_dist.meta.saved_run import MODEL_FILE
    from metarec_dist.meta.trainer import Trainer
    from metarec_dist.meta.training_data import load_training_data
    from metarec_dist.report.plots import write_plots
    from metarec_dist.report.progress import ProgressPrinter
    from metarec_dist.report.run_directory import save_state, write_json
    from metarec_dist.report.summary import negative_transfer_warning
    from metarec_dist.report.tensorboard import TensorBoardLog

    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_log = logging.getLogger("metarec_dist")
    package_log.addHandler(file_log)
    package_log.setLevel(logging.INFO)
    tensorboard = TensorBoardLog(run_dir / "tensorboard") if config.train.tensorboard else None
    try:
        print(f"run directory: {run_dir}", file=sys.stderr)
        if config.runner.workers == 1 and resume_from is None:
            trainer = Trainer(config, load_training_data(config), progress=sys.stderr.isatty())
            log_step = (lambda step: tensorboard(trainer.progress_record(step))) if tensorboard else None
            try:
                outcome = trainer.run(after_step=log_step)
            except KeyboardInterrupt:
                raise RunInterrupted(None) from None
        else:
            from metarec_dist.distributed.runner import train_distributed

            where = f", resuming from {resume_from}" if resume_from else ""
            print(f"training on {config.runner.workers} Ray Train workers{where}", file=sys.stderr)
            printer = ProgressPrinter(config.train.steps, config.train.selection_metric)

            def on_progress(record: dict) -> None:  # the leader's record after each meta-step
                printer(record)
                if tensorboard is not None:
                    tensorboard(record)

            try:
                outcome = train_distributed(config, run_dir / "ray", resume_from, on_progress=on_progress)
            finally:
                printer.close()
        save_state(run_dir / MODEL_FILE, outcome.best_state)
        if reference is not None:
            warning = negative_transfer_warning(outcome.results, reference)
            outcome.results["reference"] = {"run": reference["run"], "validation": reference["validation"],
                                            "negative_transfer": warning is not None, "warning": warning}
        write_json(run_dir / "results.json", outcome.results)
        plots = write_plots(outcome.results, run_dir)
    finally:
        package_log.removeHandler(file_log)
        file_log.close()
        if tensorboard is not None:
            tensorboard.close()
    return outcome, plots, tensorboard


def _reference_results(run_dir: Path, config) -> dict:
    """The target-only run ``--reference`` names, checked to be on this run's data."""
    from metarec_dist.report.summary import reference_problem

    try:
        reference = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--reference {run_dir}: no readable results.json ({error}); give a finished run") from None
    planned = {"method": config.method, "target": config.data.target, "selection_metric": config.train.selection_metric,
               "limited_target_fraction": config.data.limited_target_fraction}
    problem = reference_problem(planned, reference)
    if problem:
        raise ConfigError(f"--reference {run_dir}: {problem}; give a target_only run on the same target and data")
    return {**reference, "run": str(run_dir)}


def top_level_parts(overrides: str) -> list[str]:
    """``a=1,b=[x, y]`` -> ``["a=1", "b=[x, y]"]``: commas inside brackets or braces belong to a value."""
    parts, depth, current = [], 0, ""
    for character in overrides:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    return [*parts, current]


def comparison_runs(args: argparse.Namespace, tunings: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(row label, overrides) for every method and variant of ``metarec-dist compare``; a tuned
    method's runs take its best settings (``read_tunings``)."""
    per_method: dict[str, list[str]] = {}
    for item in args.method_set:
        method, separator, override = item.partition(":")
        if not separator or method not in args.methods:
            raise ConfigError(f"--method-set {item}: expected METHOD:KEY=VALUE with METHOD one of {args.methods}")
        per_method.setdefault(method, []).append(override)
    for method, tuning in tunings.items():
        settings = [f"{key}={json.dumps(value)}" for key, value in tuning["settings"].items()]
        repeated = {o.partition("=")[0] for o in per_method.get(method, [])} & {s.partition("=")[0] for s in settings}
        if repeated:
            raise ConfigError(f"--method-set {method}:{sorted(repeated)[0]}: that setting comes from --tuned; "
                              "drop one of the two")
        per_method.setdefault(method, []).extend(settings)
    rows = [(method, [f"method={method}", *per_method.get(method, [])]) for method in args.methods]
    for item in args.variant:
        name, separator, overrides = item.partition(":")
        if not separator or not name or name in dict(rows):
            raise ConfigError(f"--variant {item}: expected a new NAME:KEY=VALUE[,KEY=VALUE]")
        rows.append((name, top_level_parts(overrides)))
    if not rows:
        raise ConfigError("compare: give at least one of --methods or --variant")
    return rows


def read_tunings(args: argparse.Namespace) -> dict[str, dict]:
    """Per tuned method, what its ``--tuned`` directory says: trials, best settings and validation."""
    import yaml

    from metarec_dist.config import load_config
    from metarec_dist.meta.config import ExperimentConfig

    if not args.tuned:
        return {}
    data = load_config(ExperimentConfig, args.config, args.overrides).data
    compared = {"target": data.target, "sources": data.sources, "limited_target_fraction": data.limited_target_fraction}
    tunings: dict[str, dict] = {}
    for directory in args.tuned:
        try:
            tuning = json.loads((directory / "tune.json").read_text())
            best_data = yaml.safe_load((directory / "best.yaml").read_text())["data"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"--tuned {directory}: no readable tune.json and best.yaml there ({error}); "
                              "give a directory that metarec-dist tune finished") from None
        method = tuning["method"]
        tuned_on = {key: best_data[key] for key in compared}
        if tuned_on != compared:
            raise ConfigError(f"--tuned {directory}: tuned on {tuned_on}, not on this comparison's data; "
                              "tune each method on the data it is compared on")
        if method not in args.methods or method in tunings:
            raise ConfigError(f"--tuned {directory}: tuned {method}, which is not in --methods or is tuned twice")
        tunings[method] = {"directory": str(directory), "trials": len(tuning["trials"]),
                           "overrides": tuning["overrides"], "settings": tuning["best"]["settings"],
                           "best_valid": tuning["best"]["best_valid"]}
    return tunings


def cmd_compare(args: argparse.Namespace) -> None:
    from metarec_dist.config import load_config
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.memory_check import check_training_memory
    from metarec_dist.meta.training_data import check_domains_present
    from metarec_dist.report.comparison import comparison_plot, negative_transfer_warnings, summary_rows, table_rows
    from metarec_dist.report.run_directory import create_run_dir, write_json, write_yaml
    from metarec_dist.report.tables import format_table

    tunings = read_tunings(args)
    planned = []  # every run's config, checked before anything is written
    for label, overrides in comparison_runs(args, tunings):
        for seed in args.seeds:
            config = load_config(ExperimentConfig, args.config, [*args.overrides, *overrides, f"train.seed={seed}"])
            check_domains_present(config)
            check_training_memory(config)
            planned.append((label, seed, config))
    trials = {**{method: tuning["trials"] for method, tuning in tunings.items()},
              **{method: 0 for method in args.methods if method not in tunings}}
    if tunings and len(set(trials.values())) > 1:
        print("warning: the methods were not tuned with equal budgets (trials: "
              f"{', '.join(f'{method} {count}' for method, count in trials.items())})", file=sys.stderr)
    first = planned[0][2]
    directory = create_run_dir(first.output_dir, f"compare-{first.data.target}")
    print(f"comparison directory: {directory} ({len(planned)} runs)", file=sys.stderr)
    records = []
    for label, seed, config in planned:
        run_dir = directory / f"{label}-seed{seed}"
        run_dir.mkdir()
        write_yaml(run_dir / "config.yaml", config.model_dump(mode="json"))
        try:
            outcome, _, _ = train_into(run_dir, config)
        except RunInterrupted:
            done = f"; the {len(records)} finished runs are in {directory / 'comparison.json'}" if records else ""
            print(f"interrupted during {run_dir.name}{done}", file=sys.stderr)
            raise
        results = outcome.results
        records.append({"label": label, "seed": seed, "run": run_dir.name, "results": results})
        print(f"{label} seed {seed}: test NDCG@10 {results['test']['NDCG@10']:.4f} HR@10 "
              f"{results['test']['HR@10']:.4f} (best step {results['best_step']}, {results['wall_seconds']:.0f} s)",
              file=sys.stderr)
        write_json(directory / "comparison.json", _comparison_json(args, tunings, records, summary_rows(records)))
    rows = summary_rows(records)  # comparison.json already holds them: it is written after every run
    plot = comparison_plot(rows, directory / "comparison.png")
    cells = table_rows(rows)
    print(format_table(cells, list(cells[0])))
    for warning in negative_transfer_warnings(records):
        print(warning)
    print("* best mean; every run selected its model on validation, the test split was read once per run")
    print(f"results: {directory / 'comparison.json'}\nplot: {plot}")


def cmd_tune(args: argparse.Namespace) -> None:
    from metarec_dist.config import load_config
    from metarec_dist.distributed.tuning import tune_method
    from metarec_dist.machine import machine_description
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.search_space import checked_space, with_settings
    from metarec_dist.meta.training_data import check_domains_present
    from metarec_dist.report.run_directory import create_run_dir, write_json, write_yaml
    from metarec_dist.report.tables import format_table

    config = with_settings(load_config(ExperimentConfig, args.config, args.overrides), {"method": args.method},
                           where=f"--method {args.method}")
    check_domains_present(config)
    checked_space(config, args.method)  # a bad space fails before anything is written
    trials = args.trials or config.tune.trials
    directory = create_run_dir(config.output_dir, f"tune-{args.method}-{config.data.target}")
    print(f"tuning directory: {directory} ({trials} trials)", file=sys.stderr)
    outcome = tune_method(config, args.method, trials, directory)
    metric = config.train.selection_metric
    write_yaml(directory / "best.yaml", outcome.best_config.model_dump(mode="json"))
    write_json(directory / "tune.json", {
        "config": str(args.config), "overrides": args.overrides, "method": args.method, "metric": metric,
        "space": {key: value.model_dump(exclude_none=True) for key, value in config.tune.space.items()},
        "trials": outcome.trials, "best": outcome.best, "machine": machine_description()})
    ranked = sorted(outcome.trials, key=lambda row: -1.0 if row["best_valid"] is None else -row["best_valid"])
    keys = list(outcome.best["settings"])
    print(format_table(
        [{**{key: _short(row["settings"][key]) for key in keys},
          f"valid {metric}": "failed" if row["best_valid"] is None else f"{row['best_valid']:.4f}",
          "validations": row["validations"], "stopped by ASHA": "yes" if row["stopped_by_asha"] else ""}
         for row in ranked],
        [*keys, f"valid {metric}", "validations", "stopped by ASHA"],
    ))
    settings = ", ".join(f"{key}={_short(value)}" for key, value in outcome.best["settings"].items())
    print(f"best: {settings} (validation {metric} {outcome.best['best_valid']:.4f}; the test split was not read)")
    print(f"best config: {directory / 'best.yaml'} (metarec-dist train {directory / 'best.yaml'})")
    print(f"results: {directory / 'tune.json'}")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _comparison_json(args: argparse.Namespace, tunings: dict[str, dict], records: list[dict], rows: list[dict]) -> dict:
    from metarec_dist.machine import machine_description

    def slim(results: dict) -> dict:  # per-step histories stay in each run's results.json
        kept = {k: v for k, v in results.items() if k != "history"}
        if "source_weights" in kept:
            kept["source_weights"] = {"final": kept["source_weights"]["final"]}
        return kept

    runs = [{**record, "results": slim(record["results"])} for record in records]
    return {"config": str(args.config), "overrides": args.overrides, "method_overrides": args.method_set,
            "tuned": tunings, "variants": args.variant, "seeds": args.seeds, "machine": machine_description(),
            "table": rows, "runs": runs}


def _record_interruption(run_dir: Path, config, step: int | None, args: argparse.Namespace) -> None:
    """Say how to continue a run the user stopped, and record the stop in its directory."""
    import shlex
    import time

    from metarec_dist.distributed.checkpoint import latest_complete
    from metarec_dist.report.run_directory import unused_path, write_json

    distributed = config.runner.workers > 1 or args.resume is not None
    checkpoint = latest_complete(_storage(run_dir, config)) if distributed else None
    overrides = [f"--set {shlex.quote(override)}" for override in args.overrides]
    if checkpoint is not None:
        command = " ".join(["metarec-dist train --resume", shlex.quote(str(run_dir)),
                            *(overrides if args.resume is not None else [])])
        checkpoint_step = json.loads(checkpoint.child("state.json").read_text())["step"]
        how = (f"every worker stopped after step {step} and wrote a checkpoint" if step is not None
               else f"stopped at once; the newest complete checkpoint is of step {checkpoint_step}")
    else:
        command = " ".join(["metarec-dist train", shlex.quote(str(args.config)), *overrides])
        checkpoint_step = None
        how = ("this run trained in one process, which writes no checkpoints" if not distributed
               else "stopped before its first checkpoint")
    write_json(unused_path(run_dir, "interrupted", ".json"), {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stopped_after_step": step,
        "checkpoint": str(checkpoint) if checkpoint else None, "checkpoint_step": checkpoint_step,
        "continue_with": command,
    })
    print(f"interrupted: {how}; continue with:\n  {command}", file=sys.stderr)


def _resumed_config(run_dir: Path, overrides: list[str]):
    """The stopped run's own config; only where it runs (runner.*) may change."""
    from metarec_dist.meta.saved_run import run_config

    config = run_config(run_dir, overrides, "runner.", "a resumed run")
    if (run_dir / "results.json").exists():
        raise ConfigError(f"--resume {run_dir}: this run already finished (results.json exists); start a new one")
    return config


def _storage(run_dir: Path, config) -> Location:
    """Where a distributed run's reports and checkpoints live (a ``storage.Location``)."""
    from metarec_dist.distributed.runner import run_storage

    return run_storage(config, run_dir / "ray")


def _last_checkpoint(run_dir: Path, config) -> Location:
    from metarec_dist.distributed.checkpoint import latest_complete

    storage = _storage(run_dir, config)
    checkpoint = latest_complete(storage)
    if checkpoint is None:
        raise ConfigError(f"--resume {run_dir}: no complete checkpoint under {storage}; start a new run")
    return checkpoint


def cmd_data_import(args: argparse.Namespace) -> None:
    from metarec_dist.config import build_config
    from metarec_dist.data.domain import ImportOptions
    from metarec_dist.data.importer import default_domain_name, import_file
    from metarec_dist.data.readers import ColumnNames
    from metarec_dist.data.store import DomainStore

    options = build_config(
        ImportOptions,
        {
            "k_core": args.k_core,
            "min_sequence_length": args.min_length,
            "max_sequence_length": args.max_length,
            "reindex": not args.no_reindex,
            "drop_duplicates": not args.keep_duplicates,
        },
        where="command line",
    )
    columns = ColumnNames(args.user_column, args.item_column, args.timestamp_column or None)
    name = args.name or default_domain_name(args.path)
    report = import_file(args.path, DomainStore(args.store), name, args.format, columns, options, args.overwrite)
    if args.json:
        print(json.dumps({"name": name, "store": str(args.store), **report.as_dict()}))
        return
    print(f"imported {args.path} as domain '{name}' in {args.store}")
    dropped = {key: value for key, value in report.as_dict().items() if key.endswith("dropped") or key == "truncated"}
    print(
        f"  {report.users:,} users, {report.items:,} items, {report.interactions:,} interactions "
        f"(from {report.raw_interactions:,} raw; "
        + ", ".join(f"{key.replace('_', ' ')}: {value:,}" for key, value in dropped.items())
        + ")"
    )


def cmd_data_describe(args: argparse.Namespace) -> None:
    from metarec_dist.data.store import DomainStore

    stats = DomainStore(args.store).open(args.name).describe()
    if args.json:
        print(json.dumps(stats))
        return
    lengths = stats["sequence_length"]
    source = stats["source"]
    print(f"domain '{stats['name']}' ({source.get('format', '?')}: {source.get('path', source.get('kind', ''))})")
    print(f"  users         {stats['users']:>12,}")
    print(f"  items         {stats['items']:>12,}")
    print(f"  interactions  {stats['interactions']:>12,}")
    print(f"  density       {stats['density']:>12.6f}")
    percentiles = "  ".join(f"{key}={value:g}" for key, value in lengths.items() if key.startswith("p"))
    print(f"  length        min={lengths['min']}  mean={lengths['mean']:.2f}  max={lengths['max']}  {percentiles}")


def cmd_data_list(args: argparse.Namespace) -> None:
    from metarec_dist.data.store import DomainStore
    from metarec_dist.report.tables import format_table

    store = DomainStore(args.store)
    rows = []
    for name in store.names():
        meta = store.open(name).meta
        source = meta.get("source", {})
        rows.append({"domain": name, "source": source.get("kind") or source.get("format", "?"), **meta["counts"]})
    if args.json:
        print(json.dumps({"store": str(args.store), "domains": rows}))
    elif rows:
        print(format_table(rows, ["domain", "source", "users", "items", "interactions"]))
    else:
        print(f"no domains in {args.store}")


def cmd_data_generate(args: argparse.Namespace) -> None:
    from metarec_dist.config import load_config
    from metarec_dist.data.store import DomainStore
    from metarec_dist.data.synthetic import SyntheticConfig, generate_store
    from metarec_dist.report.tables import format_table

    config = load_config(SyntheticConfig, args.config, args.overrides)
    results = generate_store(config, DomainStore(args.store), overwrite=args.overwrite)
    store = DomainStore(args.store)
    rows = [
        {"domain": result.name, "kind": result.kind, "status": result.status, **store.open(result.name).meta["counts"]}
        for result in results
    ]
    print(format_table(rows, ["domain", "kind", "status", "users", "items", "interactions"]))
    written = sum(result.status != "unchanged" for result in results)
    print(f"{len(results)} synthetic domains in {args.store} ({written} written, seed {config.seed})")


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_data_generate_log(args: argparse.Namespace) -> None:
    from metarec_dist.data.interaction_log import generate_interaction_domain
    from metarec_dist.data.store import DomainStore

    users = args.users or max(args.items // 5, 1)
    interactions = args.interactions or 5 * args.items
    started = time.perf_counter()
    report = generate_interaction_domain(DomainStore(args.store), args.name, interactions, users, args.items,
                                         args.seed, overwrite=args.overwrite)
    counts = report.as_dict()
    print(f"{args.name}: {counts['users']:,} users, {counts['items']:,} items, {counts['interactions']:,} "
          f"interactions in {args.store} ({time.perf_counter() - started:.1f} s)")


def cmd_cluster_check(args: argparse.Namespace) -> None:
    from metarec_dist.cluster_manifests import check_manifest

    for path in args.files:
        print(f"{path}: {check_manifest(path, args.crds)}")


COMMANDS = {
    ("train", None): cmd_train,
    ("compare", None): cmd_compare,
    ("tune", None): cmd_tune,
    ("data", "import"): cmd_data_import,
    ("data", "describe"): cmd_data_describe,
    ("data", "list"): cmd_data_list,
    ("data", "generate"): cmd_data_generate,
    ("data", "generate-log"): cmd_data_generate_log,
    ("evaluate", None): cmd_evaluate,
    ("export", None): cmd_export,
    ("bench", "retrieval"): cmd_bench_retrieval,
    ("cluster", "check"): cmd_cluster_check,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminal = logging.StreamHandler()  # run logs also go to files; the terminal gets warnings
    terminal.setLevel(logging.INFO if args.verbose else logging.WARNING)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[terminal], force=True)
    command = COMMANDS[(args.command, getattr(args, f"{args.command}_command", None))]
    keep_freed_memory()  # every command allocates the same large tensors again and again
    try:
        command(args)
    except MetarecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunInterrupted:  # the command has said how to continue
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0

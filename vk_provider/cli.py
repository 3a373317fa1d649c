"""The ``vk-provider`` command line.

Every expected failure (bad settings, bad kubeconfig, unreachable API server) ends with one line
``vk-provider: error: ...`` on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vk_provider import __version__
from vk_provider.config import ConfigError, Settings, load_settings
from vk_provider.domain.messages import first_line

if TYPE_CHECKING:
    from vk_provider.report import Comparison

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
DEFAULT_DB = "vk-provider.db"
# Simulated Pod starts and caches must not mix into the registry a running agent uses.
SIMULATION_DB = "vk-provider-sim.db"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vk-provider",
        description="A virtual-kubelet node that emulates Alibaba Cloud ECI ImageCache and simulates image pulls.",
    )
    parser.add_argument("--version", action="version", version=f"vk-provider {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="join the cluster as a virtual node and run the Pods bound to it")
    _agent_flags(run)

    demo = sub.add_parser(
        "demo", help="start a local control plane (or use --kubeconfig), run the agent on it, show the results"
    )
    _agent_flags(demo, db=False)
    demo.add_argument("--keep-cluster", action="store_true", help="leave the local control plane running")
    demo.add_argument(
        "--time-scale",
        type=float,
        default=10.0,
        metavar="X",
        help="simulated seconds per wall second (default 10, in place of pull.time_scale; reported times stay "
        "simulated)",
    )
    demo.add_argument("--workdir", metavar="DIR", help="where the demo keeps its database and certificates")

    report = sub.add_parser("report", help="compare Pod start-up per cache outcome (table, JSON, CSV, HTML chart)")
    report.add_argument(
        "--db", metavar="PATH_OR_URL", default=DEFAULT_DB, help=f"registry database (default {DEFAULT_DB})"
    )
    report.add_argument("--namespace", metavar="NS", help="only Pods in this namespace")
    report.add_argument("--selector", "-l", metavar="SELECTOR", help="only Pods whose labels match (kubectl -l syntax)")
    report.add_argument(
        "--since", metavar="TIME", help="only Pods started at or after this ISO 8601 time (UTC if no offset)"
    )
    report.add_argument("--until", metavar="TIME", help="only Pods started before this ISO 8601 time")
    _output_flags(report)

    simulate = sub.add_parser(
        "simulate", help="run a workload file through the cache and pull model with no cluster, then report"
    )
    simulate.add_argument("workload", metavar="WORKLOAD.yaml", help="workload file (see config/workload-*.yaml)")
    simulate.add_argument(
        "--db",
        metavar="PATH_OR_URL",
        default=SIMULATION_DB,
        help=f"registry database to write the run into (default {SIMULATION_DB}: not the agent's own)",
    )
    simulate.add_argument("--seed", type=_seed, metavar="N", help="random seed, from 0 (default: the workload file's)")
    _output_flags(simulate)

    db = sub.add_parser("db", help="manage the registry database schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (("upgrade", "to the newest revision"), ("current", "print the revision the database is at")):
        action = db_sub.add_parser(name, help=text)
        action.add_argument(
            "--db", metavar="PATH_OR_URL", default=DEFAULT_DB, help=f"registry database (default {DEFAULT_DB})"
        )
    downgrade = db_sub.add_parser("downgrade", help="to REVISION ('base' drops every table)")
    downgrade.add_argument("revision", metavar="REVISION")
    downgrade.add_argument(
        "--db", metavar="PATH_OR_URL", default=DEFAULT_DB, help=f"registry database (default {DEFAULT_DB})"
    )
    return parser


def _output_flags(p: argparse.ArgumentParser) -> None:
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the comparison as JSON")
    form.add_argument("--csv", action="store_true", help="print the comparison as CSV")
    chart = p.add_mutually_exclusive_group()
    chart.add_argument(
        "--chart", metavar="PATH", help="write the HTML chart here (default: <db>-report.html beside the database)"
    )
    chart.add_argument("--no-chart", action="store_true", help="do not write the HTML chart")


def _agent_flags(p: argparse.ArgumentParser, *, db: bool = True) -> None:
    """``db=False``: --db is accepted but not offered (the demo refuses it, saying what to give instead)."""
    p.add_argument("--config", metavar="FILE", help="settings file (YAML; see config/agent.yaml)")
    p.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig (default: in-cluster config, then $KUBECONFIG, then ~/.kube/config)",
    )
    p.add_argument("--node-name", metavar="NAME", help="name of the virtual Node (default virtual-kubelet)")
    p.add_argument(
        "--db",
        metavar="PATH_OR_URL",
        help="registry database: a SQLite file or a SQLAlchemy URL" if db else argparse.SUPPRESS,
    )
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(
        getattr(args, "config", None),
        overrides={
            "kube.kubeconfig": getattr(args, "kubeconfig", None),
            "node.name": getattr(args, "node_name", None),
            "registry.db": getattr(args, "db", None),
            "log_level": getattr(args, "log_level", None),
        },
    )


def _error(message: str) -> None:
    print(f"vk-provider: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("report", "simulate", "db"):
        # Offline commands: no agent settings, no cluster.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        try:
            return {"report": _report, "simulate": _simulate, "db": _db}[args.command](args)
        except KeyboardInterrupt:
            # The interrupted run's half-made coroutines are thrown away with it: no warnings about them.
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            _error(f"{args.command} interrupted")
            return EXIT_INTERRUPTED
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command == "run":
        return _run(settings)
    if args.command == "demo":
        return _demo(settings, args)
    _error(f"unknown command {args.command}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


def _run(settings: Settings) -> int:
    from vk_provider.app import StartupError, run_agent

    try:
        asyncio.run(run_agent(settings))
    except StartupError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_FAILURE
    return EXIT_OK


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from vk_provider.app import StartupError
    from vk_provider.demo import DemoOptions
    from vk_provider.demo import main as demo_main

    if not 0 < args.time_scale < math.inf:
        _error("--time-scale must be a positive number")
        return EXIT_USAGE
    if args.db:
        _error("demo keeps its registry in its work directory (DIR/registry.db): give --workdir DIR, not --db")
        return EXIT_USAGE
    options = DemoOptions(
        kubeconfig=args.kubeconfig or "",
        keep_cluster=args.keep_cluster,
        workdir=args.workdir or "",
        time_scale=args.time_scale,
    )
    try:
        demo_main(settings, options)
    except StartupError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return EXIT_OK


def _chart_path(args: argparse.Namespace, db: str) -> Path | int | None:
    """Where the chart goes (None with --no-chart), or the exit code after saying why it cannot go there."""
    from vk_provider.report import ReportError, chart_target, default_chart_path

    if args.no_chart:
        return None
    if args.chart is not None and not args.chart.strip():
        _error("--chart needs a path (or give --no-chart)")
        return EXIT_USAGE
    path = Path(args.chart) if args.chart else default_chart_path(db)
    try:
        chart_target(path)
    except ReportError as exc:
        _error(str(exc))
        return EXIT_USAGE
    return path


def _write_chart(comparison: Comparison, path: Path | None) -> Path | int | None:
    """The HTML chart written at ``path`` (from :func:`_chart_path`; None: --no-chart), or the exit
    code after saying why it cannot be written."""
    from vk_provider.report import ReportError, write_chart

    if path is None:
        return None
    try:
        return write_chart(comparison, path)
    except ReportError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error(f"cannot write the chart {path}: {exc.strerror or exc}")
        return EXIT_FAILURE


def _print_comparison(
    comparison: Comparison, args: argparse.Namespace, chart: Path | None, preamble: Sequence[str] = ()
) -> None:
    from vk_provider.report import render_csv, render_json, render_text

    if args.json:
        sys.stdout.write(render_json(comparison))
    elif args.csv:
        sys.stdout.write(render_csv(comparison))
    else:
        for line in preamble:
            print(line)
        if preamble:
            print()
        sys.stdout.write(render_text(comparison))
        if chart is not None:
            print(f"chart: {chart}")
        return
    # Machine output stays clean on stdout; people still learn what the run said and where the chart went.
    for line in preamble:
        print(f"vk-provider: {line}", file=sys.stderr)
    if chart is not None:
        print(f"vk-provider: chart written to {chart}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from vk_provider.report import (
        LabelSelector,
        ReportError,
        ReportFilter,
        build_comparison,
        load_records,
        parse_selector,
        parse_time,
    )

    try:
        report_filter = ReportFilter(
            namespace=args.namespace,
            selector=parse_selector(args.selector) if args.selector is not None else LabelSelector(),
            since=parse_time(args.since, "--since") if args.since is not None else None,
            until=parse_time(args.until, "--until") if args.until is not None else None,
        )
        for problem in report_filter.problems():
            raise ReportError(problem)
    except ReportError as exc:
        _error(str(exc))
        return EXIT_USAGE
    from vk_provider.registry.engine import db_problem

    db_refused = db_problem(args.db) if args.db else None
    if db_refused is not None:
        _error(f"registry database {args.db}: {db_refused}")
        return EXIT_USAGE
    try:
        records = asyncio.run(load_records(args.db, report_filter))
    except ReportError as exc:
        hint = ""
        if args.db == DEFAULT_DB and not Path(DEFAULT_DB).exists() and Path(SIMULATION_DB).is_file():
            hint = f" (simulate writes {SIMULATION_DB} unless given --db: add --db {SIMULATION_DB})"
        _error(f"{exc}{hint}")
        return EXIT_FAILURE
    comparison = build_comparison(records, report_filter)
    chart_path = _chart_path(args, args.db)
    if isinstance(chart_path, int):
        return chart_path
    chart = _write_chart(comparison, chart_path)
    if isinstance(chart, int):
        return chart
    return _output(comparison, args, chart)


def _simulate(args: argparse.Namespace) -> int:
    from vk_provider.registry import CacheConflictError
    from vk_provider.report import ReportFilter, build_comparison
    from vk_provider.simulate import CacheNameTakenError, WorkloadError, load_workload, simulate, store, summary_lines

    refused = _refuse_db(args.db, must_exist=False)  # before a long run: a --db that can never be written
    if refused is None:
        refused = _refuse_unknown_schema(args.db)
    if refused is not None:
        return refused
    chart_path = _chart_path(args, args.db)  # nor a chart path that is some other file (the database!)
    if isinstance(chart_path, int):
        return chart_path
    try:
        workload = load_workload(args.workload)
        result = simulate(workload, seed=args.seed)
    except WorkloadError as exc:
        _error(str(exc))
        return EXIT_USAGE
    comparison = build_comparison(result.records, ReportFilter())
    chart = _write_chart(comparison, chart_path)  # before the database: nothing half done
    if isinstance(chart, int):
        return chart
    from vk_provider.registry.engine import sqlite_file

    file = sqlite_file(args.db)
    new_file = file if file is not None and not file.exists() else None
    try:
        stored = asyncio.run(store(result, args.db))
    except Exception as exc:
        if new_file is not None:  # made for this run, which stored nothing: not left behind empty
            _remove_database(new_file)
        if isinstance(exc, CacheConflictError):
            _error(f"{args.workload}: a cache id is already used by another cache in {args.db}: {exc}")
        elif isinstance(exc, CacheNameTakenError):
            _error(f"{args.workload}: {exc} (database {args.db}: nothing of this run was written)")
        else:  # a database that cannot be opened or written
            _error(f"cannot write registry database {args.db}: {first_line(exc)}")
        return EXIT_FAILURE
    return _output(comparison, args, chart, summary_lines(result, stored))


def _remove_database(file: Path) -> None:
    for path in (file, file.with_name(file.name + "-wal"), file.with_name(file.name + "-shm")):
        path.unlink(missing_ok=True)


def _output(comparison: Comparison, args: argparse.Namespace, chart: Path | None, preamble: Sequence[str] = ()) -> int:
    try:
        _print_comparison(comparison, args, chart, preamble)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `| head`: the reader has gone, which is no error of ours
        # Python would report the pipe again when it flushes stdout at exit: point stdout elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _seed(text: str) -> int:
    from vk_provider.simulate import MAX_SEED

    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}, got {text!r}")
    return seed


def _refuse_db(db: str, *, must_exist: bool) -> int | None:
    """The exit code for a ``--db`` that cannot be used (after saying why), or None if it can."""
    from vk_provider.registry.engine import DatabaseArgumentError, existing_sqlite_file

    try:
        existing_sqlite_file(db, must_exist=must_exist)
    except DatabaseArgumentError as exc:
        _error(str(exc))
        return EXIT_USAGE if exc.usage else EXIT_FAILURE
    return None


def _refuse_unknown_schema(db: str) -> int | None:
    """The exit code for an existing database a newer vk-provider made, or a server that cannot be
    reached (after saying so), or None."""
    from vk_provider.registry import migrate
    from vk_provider.registry.engine import sqlite_file

    file = sqlite_file(db)
    if file is not None and not file.is_file():
        return None  # a new file: nothing to check, and none made here
    try:
        asyncio.run(migrate.check_known(db))
    except Exception as exc:  # a newer schema; a server that cannot be reached (found out before the run)
        _error(f"registry database {db}: {first_line(exc)}")
        return EXIT_FAILURE
    return None


def _db(args: argparse.Namespace) -> int:
    from vk_provider.registry import migrate

    refused = _refuse_db(args.db, must_exist=args.db_command != "upgrade")
    if refused is not None:
        return refused
    try:
        if args.db_command == "upgrade":
            migrate.upgrade_sync(args.db)
            print(f"{args.db}: at revision {migrate.current_sync(args.db)}")
        elif args.db_command == "downgrade":
            migrate.downgrade_sync(args.db, args.revision)
            print(f"{args.db}: at revision {migrate.current_sync(args.db) or 'base (empty)'}")
        else:
            print(migrate.current_sync(args.db) or "base (empty)")
    except Exception as exc:  # Alembic's errors (unknown revision, …) and the database's
        _error(f"db {args.db_command} {args.db}: {first_line(exc)}")
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``vk-provider`` command line.

Every expected failure (bad settings, bad kubeconfig, unreachable API server) ends with one line
``vk-provider: error: ...`` on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from vk_provider import __version__
from vk_provider.config import ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


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
    _agent_flags(demo)
    demo.add_argument("--keep-cluster", action="store_true", help="leave the local control plane running")
    demo.add_argument("--workdir", metavar="DIR", help="where the demo keeps its database and certificates")
    return parser


def _agent_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="settings file (YAML; see config/agent.yaml)")
    p.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig (default: in-cluster config, then $KUBECONFIG, then ~/.kube/config)",
    )
    p.add_argument("--node-name", metavar="NAME", help="name of the virtual Node (default virtual-kubelet)")
    p.add_argument("--db", metavar="PATH_OR_URL", help="registry database: a SQLite file or a SQLAlchemy URL")
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

    options = DemoOptions(kubeconfig=args.kubeconfig or "", keep_cluster=args.keep_cluster, workdir=args.workdir or "")
    try:
        demo_main(settings, options)
    except StartupError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Command line: `cscs-storage-daemon <command>` and the seed's `waldur_cscs_storage_sync`.

Exit codes: 0 success, 1 runtime failure, 2 usage, 3 done with invalid resources reported, 78 configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

import structlog

from cscs_storage_daemon import __version__, logs

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2, 3, 78

log = structlog.get_logger("cscs_storage_daemon.cli")


def _load(path: str, *, log_level: str | None = None, stream: TextIO | None = None) -> object:
    """Load and validate the config; on error print one clear line and exit 78 before anything connects."""
    from cscs_storage_daemon.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    for offering in config.offerings:
        logs.register_secret(offering.waldur_api_token.get_secret_value())
    logs.configure(
        level=log_level or config.daemon.log.level, fmt=config.daemon.log.format, stream=stream or sys.stderr
    )
    for warning in config.warnings:
        log.warning("config.warning", message=warning)
    if config.ignored_keys:
        log.info("config.ignored_keys", keys=sorted(set(config.ignored_keys)))
    return config


def cmd_sync(args: argparse.Namespace) -> int:
    from cscs_storage_daemon.config import Config

    config = _load(args.config, log_level="debug" if args.verbose else None)
    assert isinstance(config, Config)
    from cscs_storage_daemon.sync import run_sync  # after the check: the Waldur client's models take seconds to load

    try:
        code, _reports = run_sync(config, offering_uuid=args.offering_uuid, dry_run=args.dry_run)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


def cmd_check_config(args: argparse.Namespace) -> int:
    from cscs_storage_daemon.config import Config, render_effective_config

    config = _load(args.config)
    assert isinstance(config, Config)
    print(json.dumps(render_effective_config(config), indent=2, ensure_ascii=False))
    print(f"configuration OK: {len(config.offerings)} offering(s)", file=sys.stderr)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from cscs_storage_daemon.config import Config

    config = _load(args.config, stream=sys.stdout)  # journald keeps stdout
    assert isinstance(config, Config)
    from cscs_storage_daemon.daemon import run_daemon  # after the check: a bad config exits 78 at once

    return run_daemon(config, record=args.record)


def cmd_serve(args: argparse.Namespace) -> int:
    from cscs_storage_daemon.config import Config

    config = _load(args.config)
    assert isinstance(config, Config)
    from cscs_storage_daemon.daemon import serve_once  # after the check: a bad config exits 78 at once

    return serve_once(config)


def cmd_replay(args: argparse.Namespace) -> int:
    from cscs_storage_daemon.replay import run_replay_command

    logs.configure(level="info", fmt="auto", stream=sys.stderr)
    return int(run_replay_command(args.capture, output_dir=args.output_dir, config_path=args.config))


def cmd_demo(args: argparse.Namespace) -> int:
    from cscs_storage_daemon.demo import run_demo

    logs.configure(level="warning", fmt="auto", stream=sys.stderr)
    return int(run_demo(output_dir=args.output_dir, serve=args.serve, listen=args.listen))


def _add_sync_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML configuration file")
    parser.add_argument("--offering-uuid", help="only this offering (dashed or hex)")
    parser.add_argument("--dry-run", action="store_true", help="fetch and map, write nothing, print the counts")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cscs-storage-daemon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the event daemon")
    run.add_argument("-c", "--config", required=True)
    run.add_argument("--record", metavar="CAPTURE", help="append every event and Waldur exchange to this file")
    run.set_defaults(func=cmd_run)

    sync = sub.add_parser("sync", help="one full pass: write all.json per offering and exit")
    _add_sync_flags(sync)
    sync.set_defaults(func=cmd_sync)

    check = sub.add_parser("check-config", help="validate the configuration and print it, secrets masked")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check_config)

    serve = sub.add_parser("serve", help="fill the mirror with one sync and serve the HTTP API (no broker)")
    serve.add_argument("-c", "--config", required=True)
    serve.set_defaults(func=cmd_serve)

    replay = sub.add_parser("replay", help="re-run a capture offline")
    replay.add_argument("capture")
    replay.add_argument("--output-dir", required=True)
    replay.add_argument("-c", "--config", help="override the configuration stored in the capture")
    replay.set_defaults(func=cmd_replay)

    demo = sub.add_parser("demo", help="replay the bundled demo capture into ./demo-output")
    demo.add_argument("--output-dir", default="demo-output")
    demo.add_argument("--serve", action="store_true", help="then serve the HTTP API over the result")
    demo.add_argument("--listen", default="127.0.0.1:8080")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args))
    except KeyboardInterrupt:
        code = EXIT_FAILED
    return code


def seed_sync_main(argv: Sequence[str] | None = None) -> int:
    """`waldur_cscs_storage_sync`: the seed's name and flags, so existing cron jobs keep working."""
    parser = argparse.ArgumentParser(prog="waldur_cscs_storage_sync", description="Write all.json per offering")
    _add_sync_flags(parser)
    return cmd_sync(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

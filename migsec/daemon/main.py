"""``migsecd [--config PATH] [--foreground]``: the per-host migsec daemon."""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import sys

from migsec import __version__
from migsec.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config
from migsec.daemon.logsetup import setup_logging
from migsec.daemon.server import Daemon
from migsec.daemon.services import Services
from migsec.errors import MigsecError

log = logging.getLogger("migsecd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migsecd", description="migsec per-host daemon (AS, AZ, peer endpoint, VMM agent)")
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG_PATH)), help="TOML configuration (default %(default)s)")
    parser.add_argument("--foreground", action="store_true", help="stay in the foreground (the default under systemd; migsecd never forks)")
    parser.add_argument("--debug", action="store_true", help="log debugging detail")
    parser.add_argument("--version", action="version", version=f"migsecd {__version__}")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    faulthandler.enable()  # a crash in a C extension (libvirt's, cryptography's) leaves every thread's stack in the log
    try:
        config = load_config(args.config)
        services = Services.load(config)
        daemon = Daemon(services)
        asyncio.run(daemon.run())
    except MigsecError as exc:
        # the message names the setting; the key material itself never appears
        print(f"migsecd: refusing to start: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

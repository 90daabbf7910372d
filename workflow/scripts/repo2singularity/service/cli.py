"""`repo2singularity-service`: serve, or add a user (printing the user's token, once)."""

import argparse
import sys

from .. import PROGRAM
from .accounts import AccountError, Accounts
from .settings import SettingsError, load

DEFAULT_CONFIG = "/etc/repo2singularity/service.yaml"


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"{PROGRAM}-service", description="the repo2singularity build service")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"the settings file (default {DEFAULT_CONFIG})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the service")
    commands.add_parser("check", help="check the settings file and say what it sets")
    add_user = commands.add_parser("add-user", help="add a user, or give one a new token (the old one stops working)")
    add_user.add_argument("name")
    args = parser.parse_args(argv)
    try:
        settings = load(args.config)
        if args.command == "check":
            print(f"settings of {args.config}: OK")
            for key, value in settings.items():
                print(f"  {key}: {value}")
            return 0
        if args.command == "add-user":
            from pathlib import Path

            token = Accounts(Path(settings["work_dir"]) / "users.json").add_user(args.name)
            print(f"token of {args.name} (shown this once; the service keeps only its hash):", file=sys.stderr)
            print(token)
            return 0
        from .app import serve

        serve(settings)
    except (SettingsError, AccountError, OSError) as error:
        sys.exit(f"{PROGRAM}-service: {error}")
    return 0

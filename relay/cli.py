"""The `invoice-relay` command line: parses arguments and hands each verb to its module."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence

from relay.exitcodes import EXIT_OK, EXIT_USAGE
from relay.queue.envelope import State

STATE_NAMES = tuple(s.value for s in State)

# The verbs that open the queue folder: run as root, they act as its owner.
QUEUE_VERBS = frozenset({"queue", "status", "backup", "restore"})


def _version() -> str:
    try:
        return importlib.metadata.version("invoice-relay")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    # --config is global: accepted before or after the verb.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="main config file (default: $INVOICE_RELAY_CONFIG, ./relay.toml, "
                             "/etc/invoice-relay/relay.toml, then embedded defaults)")
    parser = argparse.ArgumentParser(prog="invoice-relay", parents=[common],
                                     description="Durable SMTP relay for e-invoice mail.")
    parser.add_argument("--version", action="version", version=f"invoice-relay {_version()}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    verbs.add_parser("serve", parents=[common], help="run the relay in the foreground")
    verbs.add_parser("check-config", parents=[common], help="validate config and policy files")
    verbs.add_parser("hash-password", parents=[common],
                     help="read a password on standard input, print its hash for users_file")
    queue = verbs.add_parser("queue", parents=[common], help="inspect and repair the queue")
    qverbs = queue.add_subparsers(dest="queue_verb", metavar="QUEUE_COMMAND", required=True)
    qlist = qverbs.add_parser("list", parents=[common], help="one line per queued recipient")
    qlist.add_argument("--state", choices=STATE_NAMES, metavar="STATE",
                       help="only recipients in this state (" + ", ".join(STATE_NAMES)
                            + "); default: every state that is not final")
    qlist.add_argument("--domain", help="only recipients at this domain")
    qlist.add_argument("--limit", type=int, metavar="N", help="print at most N recipients")
    qlist.add_argument("--offset", type=int, default=0, metavar="N",
                       help="skip the first N recipients")
    qlist.add_argument("--json", action="store_true", help="one JSON object per line")
    qsum = qverbs.add_parser("summary", parents=[common],
                             help="counts by state and by domain, with the oldest message's age")
    qsum.add_argument("--json", action="store_true", help="one JSON object")
    qretry = qverbs.add_parser("retry", parents=[common],
                               help="make deferred recipients due now (held ones stay held)")
    qretry.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    qretry.add_argument("--all", action="store_true", help="every pending recipient")
    qretry.add_argument("--domain", help="every pending recipient at this domain")
    for verb, text in (("hold", "stop delivery attempts until `queue release`"),
                       ("release", "resume delivery attempts of held recipients, due now"),
                       ("delete", "remove without notifying anyone (a `deleted` record stays)"),
                       ("bounce", "fail now and send the sender a DSN")):
        qverb = qverbs.add_parser(verb, parents=[common], help=text, description=text)
        qverb.add_argument("ids", nargs="+", metavar="ID", help="queue ids")
    qshow = qverbs.add_parser("show", parents=[common], help="envelope, state and attempts")
    qshow.add_argument("id")
    rebuild = qverbs.add_parser("rebuild", parents=[common],
                                help="rebuild the index from the spool files")
    rebuild.add_argument("--force", action="store_true",
                         help="rebuild even an index that looks healthy")
    status = verbs.add_parser("status", parents=[common],
                              help="delivery records of a message, or an export of them")
    status.add_argument("key", nargs="?", metavar="KEY",
                        help="a queue id, a Message-ID (with or without <>) or an X-Invoice-Id")
    status.add_argument("--export", nargs=2, metavar=("FROM", "TO"),
                        help="every record between two UTC dates (YYYY-MM-DD, inclusive)")
    status.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="of --export (default: jsonl)")
    dkim = verbs.add_parser("dkim", parents=[common], help="DKIM keys")
    dverbs = dkim.add_subparsers(dest="dkim_verb", metavar="DKIM_COMMAND", required=True)
    keygen = dverbs.add_parser("keygen", parents=[common],
                               help="write a new private key, print its DNS TXT record")
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=), e.g. s2026")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (2048 bits, the default) or ed25519")
    keygen.add_argument("--out", metavar="DIR",
                        help="folder for DOMAIN.SELECTOR.pem (default: keys/ beside the config)")
    doctor = verbs.add_parser("doctor", parents=[common],
                              help="check SPF, DKIM, DMARC and PTR records in DNS")
    doctor.add_argument("--domain", help="check only this sender domain")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(_parser().parse_args(argv))
    except BrokenPipeError:
        # `invoice-relay queue list | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    config_path: str | None = getattr(args, "config", None)
    if os.geteuid() == 0 and args.verb in QUEUE_VERBS:
        # Root must not leave root-owned files the service cannot open (relay.ops.privileges).
        from relay.ops.privileges import act_as_queue_owner

        if (refused := act_as_queue_owner(config_path)) is not None:
            return refused
    if args.verb == "serve":
        from relay.serve import serve

        return serve(config_path)
    if args.verb == "check-config":
        from relay.config import check_config_command

        return check_config_command(config_path)
    if args.verb == "hash-password":
        from relay.smtp.auth import hash_password_command

        return hash_password_command()
    if args.verb == "dkim":
        from relay.ops.dkimcmd import keygen_command

        return keygen_command(config_path, args.domain, args.selector, args.algorithm, args.out)
    if args.verb == "doctor":
        from relay.ops.doctor import doctor_command

        return doctor_command(config_path, args.domain)
    if args.verb == "status":
        from relay.ops.statuscmd import status_command

        return status_command(config_path, args)
    if args.verb == "queue":
        from relay.ops.queuecmd import queue_command

        return queue_command(config_path, args)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

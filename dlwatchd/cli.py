"""The `dlwatchd` command: the only place that parses arguments, configures logging and sets exit codes.

Exit codes: 0 success; 1 the job failed, was rejected or cancelled; 2 bad usage or invalid input;
3 the daemon could not start; 4 a wait timed out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dlwatchd import __version__
from dlwatchd.errors import DlwatchdError, ErrorCode

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_START, EXIT_TIMEOUT = 0, 1, 2, 3, 4


def _add_spool(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spool", type=Path, help="spool folder (default: $DLWATCHD_SPOOL or the user data dir)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _tile_size(text: str) -> int:
    value = int(text)
    if not 32 <= value <= 512:
        raise argparse.ArgumentTypeError(f"must be between 32 and 512 pixels, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlwatchd",
        description="Deep-learning pixel classification for QuPath, served through a spool folder.",
    )
    parser.add_argument("--version", action="version", version=f"dlwatchd {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    _add_spool(run)
    run.add_argument("--config", type=Path, help="TOML config file ($DLWATCHD_CONFIG)")
    run.add_argument("--daemon-id", help="this daemon's id (default: <short hostname>-1)")
    run.add_argument(
        "--read-root",
        action="append",
        type=Path,
        dest="read_roots",
        help="extra folder requests may read (repeatable)",
    )
    run.add_argument(
        "--write-root",
        action="append",
        type=Path,
        dest="write_roots",
        help="extra folder outputs may go to (repeatable)",
    )
    run.add_argument(
        "--watch",
        choices=["auto", "native", "polling"],
        help="filesystem events, or polling for network shares (default auto: polling when the spool is on one)",
    )
    run.add_argument("--rescan-interval", type=float, help="seconds between full rescans (default 2)")
    run.add_argument("--http-port", type=int, help="serve the read-only HTTP shim on 127.0.0.1:PORT (off by default)")
    run.add_argument(
        "--executor",
        choices=["local", "slurm"],
        help="run trainings and inference in local workers (default) or as Slurm jobs ([slurm] settings)",
    )

    exec_job = commands.add_parser(
        "exec-job", help="run one claimed job here (what a Slurm job of the slurm executor runs on its node)"
    )
    exec_job.add_argument("--spool", type=Path, required=True, help="the spool, as the node sees it")
    exec_job.add_argument("job_id", help="the claimed job to run")

    submit = commands.add_parser("submit", help="publish a request file into the spool")
    _add_spool(submit)
    submit.add_argument("file", type=Path, help="request JSON file ('-' for standard input)")
    submit.add_argument("--id", dest="job_id", help="job id (default: a new UUID)")
    submit.add_argument("--wait", action="store_true", help="follow the job and exit non-zero unless it succeeds")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")

    status = commands.add_parser("status", help="show a job's status.json")
    _add_spool(status)
    status.add_argument("job_id")
    status.add_argument("--follow", action="store_true", help="print every new version until the job ends")
    status.add_argument("--timeout", type=float, help="with --follow: give up after this many seconds")

    for name, text in (
        ("cancel", "cancel a job"),
        ("pause", "pause a training at the end of its epoch"),
        ("resume", "resume a paused training"),
        ("finish", "stop a training after this epoch and publish its best model"),
    ):
        marker = commands.add_parser(name, help=text)
        _add_spool(marker)
        marker.add_argument("job_id")

    listing = commands.add_parser("list", help="list jobs by state")
    _add_spool(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    check = commands.add_parser("check", help="check the spool's invariants (each job in one place, statuses valid)")
    _add_spool(check)
    check.add_argument(
        "--watch", type=float, metavar="SECONDS", help="keep checking for this long (every 0.5 s) while daemons run"
    )

    schema = commands.add_parser("schema", help="print the JSON Schema of a request kind, status.json or a heartbeat")
    schema.add_argument(
        "kind", nargs="?", help="a request kind, 'status' or 'heartbeat' (daemons/<id>.json; default: every request)"
    )

    validate = commands.add_parser("validate", help="check a request file offline, as the daemon would")
    validate.add_argument("file", type=Path)

    weights = commands.add_parser("weights", help="list or import pretrained encoder weights (offline store)")
    weights_commands = weights.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    weights_list = weights_commands.add_parser("list", help="list the installed weights")
    weights_list.add_argument("--json", action="store_true", help="machine-readable output")
    weights_import = weights_commands.add_parser(
        "import", help="verify a weights file or copied Hugging Face cache folder and store it"
    )
    weights_import.add_argument("name", help="encoder name, e.g. resnet34 or resnet50_lunit-swav")
    weights_import.add_argument("file", type=Path, help=".safetensors, .pth/.pt/.bin, or a models--org--name folder")
    weights_import.add_argument("--tag", choices=["imagenet", "histology"], help="default: the encoder's own tag")
    for sub in (weights_list, weights_import):
        sub.add_argument("--weights-dir", type=Path, help="weights store (default: $DLWATCHD_WEIGHTS_DIR or user data)")
    demo = commands.add_parser(
        "demo", help="train on synthetic data and predict held-out tiles, end to end (a few minutes on a CPU)"
    )
    demo.add_argument(
        "--spool", type=Path, help="use the daemon serving this spool (default: start one on a temp spool)"
    )
    demo.add_argument("--out", type=Path, default=Path("dlwatchd-demo"), help="where the pictures and summary go")
    demo.add_argument("--epochs", type=_positive_int, help="training epochs (default 10; 8 with --quick)")
    demo.add_argument("--size", type=_tile_size, help="tile size in pixels, 32-512 (default 64)")
    demo.add_argument("--quick", action="store_true", help="a smaller run of about a minute (used in CI)")
    demo.add_argument("--clean", action="store_true", help="remove the temporary spool at the end")

    synth = commands.add_parser("synth", help="write a synthetic QuPath-style training set with brush-stroke labels")
    synth.add_argument("dir", type=Path, help="the dataset folder to write (train/, validation/, config.json)")
    synth.add_argument("--train", type=_positive_int, default=8, help="training tiles (default 8)")
    synth.add_argument("--validation", type=_positive_int, default=4, help="validation tiles (default 4)")
    synth.add_argument("--size", type=_tile_size, default=64, help="tile size in pixels, 32-512 (default 64)")
    synth.add_argument("--classes", type=int, choices=[2, 3], default=2, help="2 or 3 classes (default 2)")
    synth.add_argument("--channels", type=_positive_int, default=3, help="image channels (default 3)")
    synth.add_argument("--bit-depth", type=int, choices=[8, 16], default=8, help="8 or 16 bits (default 8)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    service = commands.add_parser("service", help="install dlwatchd as a systemd or launchd service")
    service_commands = service.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    for action, text in (("install", "render and write the unit (or plist)"), ("uninstall", "remove it")):
        sub = service_commands.add_parser(action, help=text)
        scope = sub.add_mutually_exclusive_group()
        scope.add_argument("--user", dest="mode", action="store_const", const="user", help="a user service (default)")
        scope.add_argument("--system", dest="mode", action="store_const", const="system", help="a system service")
        sub.add_argument("--spool", type=Path, help="the spool the service serves (default: the platform default)")
        sub.add_argument("--print", action="store_true", help="only print what would be written and run")
        sub.set_defaults(mode="user")
    return parser


def configure_logging(verbosity: int) -> None:
    """One line per event on stderr; under systemd (JOURNAL_STREAM set) with `<N>` priority prefixes."""
    from dlwatchd.journal import configure_stderr_logging

    configure_stderr_logging(max(logging.DEBUG, logging.INFO - 10 * verbosity))


def _spool(args: argparse.Namespace) -> Path:
    from dlwatchd.settings import load_settings

    return load_settings(overrides={"spool": args.spool}).spool


def cmd_run(args: argparse.Namespace) -> int:
    from dlwatchd.settings import load_settings
    from dlwatchd.supervisor.daemon import Supervisor

    overrides = {
        "spool": args.spool,
        "daemon_id": args.daemon_id,
        "read_roots": args.read_roots,
        "write_roots": args.write_roots,
        "watch": args.watch,
        "rescan_interval": args.rescan_interval,
        "http_port": args.http_port,
        "executor": args.executor,
    }
    try:
        settings = load_settings(config_file=args.config, overrides=overrides)
        return Supervisor(
            settings, reload_source=lambda: load_settings(config_file=args.config, overrides=overrides)
        ).run()
    except DlwatchdError as error:
        print(f"dlwatchd: cannot start: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return EXIT_START


def _follow(client: Any, job_id: str, timeout: float | None) -> int:
    """Show the job's progress until it ends: a bar redrawn in place on a terminal, plain lines otherwise.

    Ends with a summary and the result JSON (exit 0), or the error and hint on stderr (exit 1); a paused
    training also exits 0.
    """
    from dlwatchd.client import format_error
    from dlwatchd.progress import StatusFollower, result_summary

    follower = StatusFollower(sys.stdout)
    try:
        final = client.wait(job_id, timeout=timeout, on_update=follower)
    except TimeoutError as exc:
        follower.close()
        print(f"dlwatchd: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    follower.close()
    if final.state.value == "succeeded":
        for line in result_summary(final.kind, final.result):
            print(line)
        print(json.dumps(final.result, indent=2), flush=True)
        return EXIT_OK
    if final.state.value == "paused":
        print(f"paused; continue with: dlwatchd resume {job_id}", flush=True)
        return EXIT_OK
    sys.stdout.flush()
    print(format_error(final), file=sys.stderr)
    return EXIT_JOB_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from dlwatchd.client import SpoolClient

    data = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    client = SpoolClient(_spool(args))
    job_id = client.submit(data, job_id=args.job_id)
    print(job_id, flush=True)
    return _follow(client, job_id, args.timeout) if args.wait else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from dlwatchd.client import SpoolClient

    client = SpoolClient(_spool(args))
    if args.follow:
        return _follow(client, args.job_id, args.timeout)
    status = client.status(args.job_id)
    if status is None:
        where = client.where(args.job_id)
        state = (
            "waiting for pickup"
            if where is None and (client.layout.incoming / f"{args.job_id}.json").exists()
            else "unknown"
        )
        print(f"dlwatchd: job {args.job_id}: no status yet ({state})", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(status.model_dump(mode="json"), indent=2))
    return EXIT_OK


def cmd_marker(args: argparse.Namespace) -> int:
    from dlwatchd.client import SpoolClient

    client = SpoolClient(_spool(args))
    getattr(client, args.command)(args.job_id)
    status = client.status(args.job_id)
    print(f"{args.command} requested for {args.job_id} (now {status.state.value if status else 'unknown'})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from dlwatchd.client import SpoolClient
    from dlwatchd.progress import collect_rows, render_table

    client = SpoolClient(_spool(args))
    if args.json:
        print(json.dumps(client.list_jobs(), indent=2))
        return EXIT_OK
    print(render_table(collect_rows(client)))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    import time

    from dlwatchd.spool.invariants import SpoolChecker

    spool = _spool(args)
    if not (spool / "dlwatchd.json").exists():
        raise DlwatchdError(ErrorCode.NOT_FOUND, f"{spool} is not a dlwatchd spool (it has no dlwatchd.json).")
    checker = SpoolChecker(spool)
    problems = checker.check()
    rounds = 1
    deadline = time.monotonic() + (args.watch or 0.0)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        problems += checker.check()
        rounds += 1
    for problem in problems:
        print(problem)
    checked = f"{rounds} check{'s' if rounds > 1 else ''} of {spool}"
    print(f"{len(problems)} problem{'' if len(problems) == 1 else 's'} in {checked}", file=sys.stderr)
    return EXIT_JOB_FAILED if problems else EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from dlwatchd.protocol.schema import schema_for

    print(json.dumps(schema_for(args.kind), indent=2))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from dlwatchd.jobs._registry import build_registry
    from dlwatchd.protocol.decode import decode_request
    from dlwatchd.protocol.status import ErrorInfo

    registry = build_registry()
    try:
        decoded = decode_request(args.file.read_bytes(), registry)
        registry.require_available(decoded.kind)
    except DlwatchdError as error:
        print(json.dumps(ErrorInfo.from_error(error).model_dump(mode="json", exclude_none=True), indent=2))
        return EXIT_USAGE
    print(f"valid '{decoded.kind}' request")
    return EXIT_OK


def cmd_weights(args: argparse.Namespace) -> int:
    from dlwatchd.settings import load_settings
    from dlwatchd.weights_cli import import_weights, list_weights

    weights_dir = load_settings(overrides={"weights_dir": args.weights_dir}).weights_dir
    if args.weights_command == "list":
        print(list_weights(weights_dir, as_json=args.json))
    else:
        print(import_weights(weights_dir, args.name, args.file, args.tag))
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    from dlwatchd.service import install, plan_install, uninstall

    plan = plan_install(args.mode, args.spool.expanduser().absolute() if args.spool else None)
    if args.service_command == "uninstall":
        if args.print:
            print(f"would remove {plan.path}; then run:\n  " + "\n  ".join(plan.disable))
            return EXIT_OK
        print("first run:\n  " + "\n  ".join(plan.disable))
        removed = uninstall(plan)
        print(f"{'removed' if removed else 'not installed:'} {plan.path}")
        return EXIT_OK
    if args.print:
        print(f"# {plan.path}\n{plan.text}")
        print("# then run:\n#   " + "\n#   ".join(plan.enable))
        return EXIT_OK
    install(plan)
    print(f"wrote {plan.path}\nnow run:\n  " + "\n  ".join(plan.enable))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from dlwatchd.demo import DemoOptions, run_demo

    options = DemoOptions(
        spool=args.spool, out=args.out, epochs=args.epochs, size=args.size, quick=args.quick, clean=args.clean
    )
    return run_demo(options)


def cmd_synth(args: argparse.Namespace) -> int:
    from dlwatchd.synth import SynthSpec, class_names, write_dataset

    if args.channels > 128:
        print("dlwatchd: --channels must be at most 128", file=sys.stderr)
        return EXIT_USAGE
    root = args.dir.expanduser().absolute()
    spec = SynthSpec(
        train=args.train,
        validation=args.validation,
        size=args.size,
        classes=args.classes,
        channels=args.channels,
        bit_depth=args.bit_depth,
        seed=args.seed,
    )
    write_dataset(root, spec)
    request = {
        "kind": "train",
        "model_type": "unet",
        "architecture": {"backbone": "resnet18", "input_size": [args.size, args.size], "use_pretrained": False},
        "input_config": {"num_channels": args.channels, "bit_depth": args.bit_depth},
        "classes": class_names(args.classes),
        "training": {"epochs": 10, "batch_size": 4, "learning_rate": 0.001, "seed": args.seed},
        "data_path": str(root),
    }
    request_path = root / "train-request.json"
    request_path.write_text(json.dumps(request, indent=2) + "\n")
    kind = "PNG" if args.channels == 3 and args.bit_depth == 8 else "TIFF"
    print(
        f"wrote {args.train} training and {args.validation} validation tiles ({args.size}x{args.size} px, "
        f"{args.channels} channels, {args.bit_depth}-bit {kind}, classes {', '.join(class_names(args.classes))}) "
        f"to {root}"
    )
    print("  train/ and validation/ hold images/, masks/ (sparse brush strokes, 255 = unlabeled) and truth/ (dense)")
    print(f"a training request for it is in {request_path}; with a daemon running, train with:")
    print(f"  dlwatchd submit {request_path} --wait")
    print("(the folder must be inside the daemon's read roots: your home by default, or the spool's inputs/)")
    return EXIT_OK


def cmd_exec_job(args: argparse.Namespace) -> int:
    from dlwatchd.slurm.node import exec_job

    return exec_job(args.spool.expanduser().absolute(), args.job_id)


COMMANDS = {
    "run": cmd_run,
    "exec-job": cmd_exec_job,
    "submit": cmd_submit,
    "status": cmd_status,
    "cancel": cmd_marker,
    "pause": cmd_marker,
    "resume": cmd_marker,
    "finish": cmd_marker,
    "list": cmd_list,
    "check": cmd_check,
    "schema": cmd_schema,
    "validate": cmd_validate,
    "weights": cmd_weights,
    "service": cmd_service,
    "demo": cmd_demo,
    "synth": cmd_synth,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    configure_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except DlwatchdError as error:
        print(f"dlwatchd: {error.code.value}: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        print(f"dlwatchd: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `dlwatchd schema | head`: the reader left, which is fine
        sys.stderr.close()
        return EXIT_OK

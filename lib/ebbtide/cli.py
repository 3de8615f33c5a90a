"""`ebbtide <command>`: one entry point for the terminal, spark-submit (jobs/*.py) and notebooks."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

from ebbtide.config import Config, ConfigError, load_config

log = logging.getLogger("ebbtide")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebbtide", description=__doc__)
    parser.add_argument("--conf", default="local",
                        help="a packaged environment (local, cluster, databricks) or a YAML file path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set sessionize.session_gap_minutes=20 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("generate", help="write synthetic raw logs with a planted ground truth")

    p = sub.add_parser("sessionize", help="raw logs of a run date (or range) -> Delta tables")
    p.add_argument("--date", type=_date, required=True, help="run date (UTC)")
    p.add_argument("--to", type=_date, help="last run date of a range, processed in order")
    p.add_argument("--lag-days", type=int, default=0,
                   help="process DATE minus this many days (schedulers pass their start date and 1)")
    p.add_argument("--report", help="write the run reports as JSON here")

    p = sub.add_parser("train", help="train the configured models on a pinned user_sequences snapshot")
    p.add_argument("--snapshot-version", type=int, help="user_sequences version (default: latest)")
    p.add_argument("--export-worker-args", metavar="DIR",
                   help="only pin the snapshot and write <model>.json per model for torchrun -m ebbtide.train")

    p = sub.add_parser("evaluate", help="full-ranking metrics of the latest models and the baselines + report")
    p.add_argument("--out", help="report folder (default evaluate.output)")

    p = sub.add_parser("nightly", help="interest embeddings and top-K recommendations as of a date")
    p.add_argument("--as-of", type=_date, required=True, help="the run date (embeddings as of its end, UTC)")
    p.add_argument("--to", type=_date, help="last date of a range, processed in order")
    p.add_argument("--lag-days", type=int, default=0,
                   help="score AS_OF minus this many days (schedulers pass their start date and 1)")
    p.add_argument("--full", action="store_true", help="re-encode every user instead of rescaling stored states")
    p.add_argument("--model-version", help="an artifact folder or version (default: the promoted one)")
    p.add_argument("--allow-stale", action="store_true",
                   help="score even if the date's sessionized data is missing or stale (see nightly guards)")

    p = sub.add_parser("backfill", help="sessionize + nightly for each date of a range, in order, resumable")
    p.add_argument("--from", dest="first", type=_date, required=True, help="first date (UTC)")
    p.add_argument("--to", dest="last", type=_date, required=True, help="last date (UTC), inclusive")
    p.add_argument("--force", action="store_true", help="re-run dates whose commits are already in the tables")
    p.add_argument("--no-nightly", action="store_true", help="sessionize only")
    p.add_argument("--allow-stale", action="store_true", help="passed to every nightly of the range")
    p.add_argument("--full", action="store_true", help="nightly re-encodes every user")

    p = sub.add_parser("promote", help="point nightly at a model version (train.output/MODEL/PROMOTED.json)")
    p.add_argument("model", help="model name, e.g. decay_pool")
    p.add_argument("version", help="an artifact version folder name, or `latest` for the newest")
    p.add_argument("--note", default="", help="why (kept in the pointer's history)")

    p = sub.add_parser("tables", help="row counts, versions and protocol of every table")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("forget-user", aliases=["forget"],
                       help="delete users from every table; VACUUM completes physical deletion")
    p.add_argument("user_ids", nargs="+", metavar="USER_ID")

    p = sub.add_parser("maintain", help="expire old outputs, compact small files, vacuum removed ones")
    p.add_argument("--expire", action="store_true",
                   help="delete user_recommendations partitions / user_interest rows older than their retention")
    p.add_argument("--optimize", action="store_true")
    p.add_argument("--vacuum", action="store_true", help="delete removed files (Delta's retention check stays on)")
    p.add_argument("--as-of", type=_date, help="reference date for --expire (default: today, UTC)")
    p.add_argument("--retention-hours", type=int, help="vacuum retention (default storage.vacuum_retention_hours)")
    p.add_argument("--no-retention-check", action="store_true",
                   help="allow a retention below delta.deletedFileRetentionDuration (ends time travel to older "
                        "versions; for physical deletion after forget-user, with no job running)")
    p.add_argument("--json", action="store_true")
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "urllib3", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_pipeline(cfg: Config):
    from ebbtide.spark import get_spark
    from ebbtide.storage import open_storage

    spark = get_spark(cfg.spark)
    return spark, open_storage(spark, cfg.storage)


def table_summary(cfg: Config, storage) -> list[dict]:
    from ebbtide.tables import table_specs

    out = []
    for key, spec in table_specs(cfg).items():
        if not storage.exists(spec):
            out.append({"table": key, "exists": False})
            continue
        out.append({"table": key, "exists": True, "version": storage.version(spec),
                    "rows": storage.read(spec).count(), "files": len(storage.active_files(spec)),
                    "protocol": list(storage.protocol(spec))})
    return out


def utc_today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.command == "promote":
        from ebbtide.artifacts import latest_artifact
        from ebbtide.promotion import promote

        version = latest_artifact(cfg.train.output, args.model).name if args.version == "latest" else args.version
        pointer = promote(cfg.train.output, args.model, version, args.note)
        print(f"promoted {args.model} {pointer['version']} (content hash {pointer['content_hash'][:12]}); "
              f"previous: {pointer['history'][0]['version'] if pointer['history'] else 'none'}")
        return 0
    if args.command == "generate":
        from ebbtide.generate import generate

        truth = generate(cfg.generate)
        print(f"wrote {truth['total_events']:,} events over {truth['days']} days to {cfg.generate.out}")
        return 0

    spark, storage = open_pipeline(cfg)
    lag = dt.timedelta(days=getattr(args, "lag_days", 0))
    if args.command == "sessionize":
        from ebbtide.sessionize import Sessionizer

        first = args.date - lag
        reports = Sessionizer(spark, cfg, storage).run_range(first, (args.to or args.date) - lag)
        for report in reports:
            print(report.line())
        if args.report:
            with open(args.report, "w") as fh:
                json.dump([r.as_dict() for r in reports], fh, indent=2)
    elif args.command == "train":
        from ebbtide.train import train_models

        for name, path in train_models(cfg, storage, args.snapshot_version, args.export_worker_args).items():
            print(f"{name}: {path}")
    elif args.command == "evaluate":
        from ebbtide.evaluate import evaluate_all

        result = evaluate_all(cfg, storage, out_dir=args.out)
        print(Path(result["report"]).read_text())
    elif args.command == "nightly":
        from ebbtide.nightly import Nightly

        if args.model_version:
            cfg.nightly.model_version = args.model_version
        if args.allow_stale:
            cfg.nightly.require_fresh = False
        job = Nightly(spark, cfg, storage)
        first, last = args.as_of - lag, (args.to or args.as_of) - lag
        for i in range((last - first).days + 1):
            print(job.run(first + dt.timedelta(days=i), full=args.full).line())
    elif args.command == "tables":
        summary = table_summary(cfg, storage)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for t in summary:
                print(f"{t['table']:<18} " + (f"v{t['version']:<4} {t['rows']:>12,} rows {t['files']:>5} files "
                                              f"protocol {tuple(t['protocol'])}" if t["exists"] else "missing"))
    elif args.command in ("forget-user", "forget"):
        from ebbtide.forget import forget_users

        for table, rows in forget_users(cfg, storage, args.user_ids).items():
            print(f"{table:<22} {rows:>10,} rows deleted")
        print("older versions' files keep the rows until `ebbtide maintain --vacuum --retention-hours 0 "
              "--no-retention-check` (see README, Forgetting users)")
    elif args.command == "backfill":
        from ebbtide.backfill import backfill

        if args.allow_stale:
            cfg.nightly.require_fresh = False
        summary = backfill(spark, cfg, storage, args.first, args.last, force=args.force,
                           with_nightly=not args.no_nightly, full=args.full)
        print("\n".join(summary.lines()))
        return 1 if summary.failed else 0
    elif args.command == "maintain":
        from ebbtide.maintain import maintain, report_lines

        rows = maintain(cfg, storage, args.as_of or utc_today(), expire=args.expire, optimize=args.optimize,
                        vacuum=args.vacuum, retention_hours=args.retention_hours,
                        enforce_retention=not args.no_retention_check)
        print(json.dumps(rows, indent=2, default=str) if args.json else "\n".join(report_lines(rows)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        cfg = load_config(args.conf, args.overrides)
    except ConfigError as err:
        print(f"ebbtide: {err}", file=sys.stderr)
        return 2
    from ebbtide.nightly import NightlyCheckError, StaleDataError
    from ebbtide.sessionize import InputError, ReconciliationError
    from ebbtide.storage import StorageError

    try:
        return run(args, cfg)
    except (InputError, StorageError, ReconciliationError, NightlyCheckError, StaleDataError, FileNotFoundError,
            ValueError) as err:
        print(f"ebbtide {args.command}: {err}", file=sys.stderr)
        return 1


def job_main(command: str, argv: list[str] | None = None) -> int:
    """Entry for jobs/<stage>.py and the per-stage entry points: global options may come in any position, e.g.
    `jobs/sessionize.py --date 2026-11-01 --conf cluster --set storage.user_buckets=4096`."""
    return main(job_argv(command, list(sys.argv[1:] if argv is None else argv)))


def job_argv(command: str, argv: list[str]) -> list[str]:
    """A stage's arguments with the global ones (--conf, --set, -v) moved in front of the command."""
    global_args, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--conf", "--set") and i + 1 < len(argv):
            global_args += argv[i:i + 2]
            i += 2
            continue
        (global_args if arg.startswith(("--conf=", "--set=")) or arg in ("-v", "--verbose") else rest).append(arg)
        i += 1
    return [*global_args, command, *rest]


def _stage_entry(command: str):
    def entry() -> None:
        raise SystemExit(job_main(command))
    entry.__name__ = f"{command}_entry"
    entry.__doc__ = f"Console script / Databricks python_wheel_task entry point: `ebbtide {command}`."
    return entry


# One entry point per stage ([project.scripts] ebbtide-<stage>): Databricks python_wheel_task names them.
STAGES = ("sessionize", "train", "evaluate", "nightly", "backfill", "maintain", "promote", "tables")
sessionize_entry, train_entry, evaluate_entry, nightly_entry, backfill_entry, maintain_entry, promote_entry, \
    tables_entry = (_stage_entry(stage) for stage in STAGES)


if __name__ == "__main__":
    sys.exit(main())

"""The ``recsvc`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# One thread-pool level: gRPC workers parallelise across requests, so BLAS
# must not fan out inside one (set before numpy is first imported).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
import time
import uuid
from pathlib import Path


def _config(args: argparse.Namespace):
    from recsvc.config import load_config

    overrides: dict = {}
    if getattr(args, "port", None) is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if getattr(args, "host", None) is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if getattr(args, "catalog", None) is not None:
        overrides.setdefault("catalog", {})["path"] = args.catalog
    if getattr(args, "state_dir", None) is not None:
        overrides.setdefault("state", {})["dir"] = args.state_dir
    return load_config(args.config, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from recsvc.server import serve

    if args.workers != 1:
        from recsvc.server.workers import serve_workers

        try:
            serve_workers(_config(args), args.workers)
        except OSError as exc:
            print(f"error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    serve(_config(args))
    return 0


def cmd_build_index(args: argparse.Namespace) -> int:
    from recsvc.engine import load_catalog_and_index

    cfg = _config(args)
    t = time.perf_counter()
    catalog, ann = load_catalog_and_index(cfg, progress=True, rebuild=args.rebuild)
    print(f"index ready: {ann.live_count} items x {catalog.dim} dims ({cfg.index.space}) "
          f"in {time.perf_counter() - t:.1f} s")
    return 0


def _stub(target: str):
    import grpc

    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.RecommenderStub(channel)


def cmd_recommend(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from recsvc.v1 import recommender_pb2 as pb

    channel, stub = _stub(args.target)
    req = pb.RecommendRequest(user_id=args.user, n=args.n, debug=args.debug,
                              context=dict(kv.split("=", 1) for kv in args.context or []))
    if args.category:
        req.filter.allowed_categories.extend(args.category)
    if args.max_maturity:
        req.filter.max_maturity = args.max_maturity
    resp = stub.Recommend(req, timeout=args.timeout)
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
    else:
        print(f"request_id {resp.request_id}  variant {resp.variant or '-'}  "
              f"total {resp.timings.total_us} us{'  (degraded)' if resp.degraded else ''}")
        print(f"{'pos':>3}  {'item':<16} {'category':<10} {'score':>8} {'prop':>6}  sources")
        for it in resp.items:
            print(f"{it.position:>3}  {it.item_id:<16} {it.category:<10} {it.score:8.4f} "
                  f"{it.propensity:6.3f}  {','.join(it.sources)}{'  [sponsored]' if it.sponsored else ''}")
    channel.close()
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from recsvc.v1 import recommender_pb2 as pb

    channel, stub = _stub(args.target)
    ev = pb.FeedbackEvent(event_id=args.event_id or uuid.uuid4().hex, request_id=args.request_id or "",
                          user_id=args.user, item_id=args.item, type=pb.EventType.Value(args.type.upper()),
                          value=args.value, timestamp_ms=int(time.time() * 1000))
    resp = stub.Feedback(pb.FeedbackRequest(events=[ev]), timeout=args.timeout)
    print(f"accepted {resp.accepted}  duplicates {resp.duplicates}")
    for r in resp.rejected:
        print(f"rejected events[{r.index}] ({r.event_id}): {r.reason}")
    channel.close()
    return 0 if not resp.rejected else 1


def cmd_config(args: argparse.Namespace) -> int:
    from recsvc.config import defaults_as_toml

    if args.config:
        cfg = _config(args)
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        sys.stdout.write(defaults_as_toml())
    return 0


def cmd_train_ranker(args: argparse.Namespace) -> int:
    from recsvc.training import train_from_state_dir

    cfg = _config(args)
    ranker, metrics = train_from_state_dir(Path(cfg.state.dir).expanduser(), kind=args.kind,
                                           ipw=not args.no_ipw, seed=args.seed,
                                           attribution_window_s=cfg.state.attribution_window_s)
    ranker.save(args.output)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.output}; point ranking.model_path at it and send SIGHUP (or ReloadRanker)")
    return 0


def cmd_experiment_report(args: argparse.Namespace) -> int:
    from recsvc.v1 import recommender_pb2 as pb

    channel, stub = _stub(args.target)
    resp = stub.GetExperimentReport(
        pb.GetExperimentReportRequest(experiment=args.name or "",
                                      plot_metric=args.metric if args.plot else ""),
        timeout=args.timeout)
    print(resp.report_json if args.json else resp.report_text)
    if args.plot:
        args.plot.write_bytes(resp.plot_png)
        print(f"wrote {args.plot}")
    channel.close()
    return 0


def cmd_ope(args: argparse.Namespace) -> int:
    if args.state_dir is not None:
        from recsvc.evaluation.service_log import evaluate_service_log

        report = evaluate_service_log(args.state_dir, args.target_ranker, args.temperature)
        print(json.dumps(report, indent=2, default=float))
        return 0
    from recsvc.evaluation.datasets import format_obd_report, validate_on_obd

    if not args.data.is_dir():
        print(f"error: --data {args.data}: no such directory ({args.data.resolve()})", file=sys.stderr)
        return 2
    report = validate_on_obd(args.data)
    print(json.dumps(report, indent=2, default=float) if args.json else format_obd_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsvc", description="A multi-stage recommendation service over gRPC.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", type=Path, help="TOML config file (see `recsvc config`)")
        sp.add_argument("--catalog", type=Path, help="catalog directory (default: the demo catalog)")
        sp.add_argument("--state-dir", type=Path, help="state directory (event log, snapshots)")
        return sp

    def client(sp):
        sp.add_argument("--target", default="127.0.0.1:50051", help="host:port of a recsvc server")
        sp.add_argument("--timeout", type=float, default=10.0, help="seconds")
        return sp

    s = with_config(sub.add_parser("serve", help="run the gRPC server (demo catalog by default)"))
    s.add_argument("--port", type=int, help="TCP port (0: pick a free one)")
    s.add_argument("--host", help="address to listen on")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port (0: one per core); more than one needs the Redis backend")
    s.set_defaults(fn=cmd_serve)

    s = with_config(sub.add_parser("build-index", help="build and persist the HNSW index for the catalog"))
    s.add_argument("--rebuild", action="store_true", help="rebuild even if a matching index exists")
    s.set_defaults(fn=cmd_build_index)

    s = client(sub.add_parser("recommend", help="ask a running server for recommendations"))
    s.add_argument("user", help="user id")
    s.add_argument("-n", type=int, default=0, help="slate size (0: server default)")
    s.add_argument("--category", action="append", help="allowed category (repeatable)")
    s.add_argument("--max-maturity", type=int, default=0)
    s.add_argument("--context", action="append", help="key=value (repeatable)")
    s.add_argument("--debug", action="store_true")
    s.add_argument("--json", action="store_true", help="print the raw response as JSON")
    s.set_defaults(fn=cmd_recommend)

    s = client(sub.add_parser("feedback", help="send one feedback event to a running server"))
    s.add_argument("user")
    s.add_argument("item")
    s.add_argument("--type", default="click", choices=["impression", "click", "conversion"])
    s.add_argument("--request-id", help="request_id of the slate the item was served in")
    s.add_argument("--event-id", help="idempotency key (default: random)")
    s.add_argument("--value", type=float, default=0.0)
    s.set_defaults(fn=cmd_feedback)

    s = with_config(sub.add_parser("config", help="print the default config as TOML (or a file's, resolved)"))
    s.set_defaults(fn=cmd_config)

    s = with_config(sub.add_parser("train-ranker", help="train the ranker from the feedback log"))
    s.add_argument("--kind", choices=["logistic", "mlp", "gbdt"], default="logistic",
                   help="gbdt: LambdaRank trees over each served slate (needs the 'train' extra: LightGBM)")
    s.add_argument("--no-ipw", action="store_true", help="do not weight by inverse propensity")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", type=Path, required=True, help="weights file to write")
    s.set_defaults(fn=cmd_train_ranker)

    s = sub.add_parser("experiment", help="A/B experiments")
    esub = s.add_subparsers(dest="experiment_command", required=True)
    r = client(esub.add_parser("report", help="per-variant metrics and significance"))
    r.add_argument("name", nargs="?", help="experiment name (default: all)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--plot", type=Path, help="write a PNG of the metric over time (needs NAME)")
    r.add_argument("--metric", default="ctr", choices=["ctr", "conversion_rate", "value_per_user"])
    r.set_defaults(fn=cmd_experiment_report)

    from recsvc.evaluation import replay, simulator

    s = sub.add_parser("evaluate", help="replay evaluation on MovieLens (or any interactions dataset)")
    replay.add_arguments(s)
    s.set_defaults(fn=replay.run)

    s = sub.add_parser("simulate", help="closed-loop simulation: feedback loops, exploration, A/B variants")
    simulator.add_arguments(s)
    s.set_defaults(fn=simulator.run)

    s = sub.add_parser("ope", help="off-policy estimates: the Open Bandit sample, or the service's own log")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, metavar="DIR",
                        help="Open Bandit Dataset directory with random/ and bts/, e.g. ../shared/data/obd-men "
                             "(validation: the random policy's CTR estimated from the bts log)")
    source.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="or: evaluate on this service state directory's served log")
    s.add_argument("--json", action="store_true")
    s.add_argument("--target-ranker", type=Path, help="with --state-dir: weights file of the policy to evaluate")
    s.add_argument("--temperature", type=float, default=0.1, help="soft top-k temperature of the target")
    s.set_defaults(fn=cmd_ope)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from recsvc.config import ConfigError

    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

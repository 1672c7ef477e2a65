"""The ``recsvc`` command."""

from __future__ import annotations

import argparse
import json
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
    from recsvc.catalog import CatalogError
    from recsvc.server import serve
    from recsvc.state.store import ACCEPT_LOSS_ENV, StateUnusable

    if args.accept_loss:
        os.environ[ACCEPT_LOSS_ENV] = "1"  # read where the state directory is opened
    cfg = _config(args)
    from recsvc.logs import configure

    configure(cfg.logging.format, "debug" if args.verbose else cfg.logging.level)
    try:
        if args.workers != 1:
            from recsvc.server.workers import serve_workers

            serve_workers(cfg, args.workers, config_path=args.config)
        else:
            serve(cfg, config_path=args.config)
    except (CatalogError, StateUnusable, OSError) as exc:
        # A refused start: the message names the file and the fix; a traceback would only bury it.
        message = str(exc).replace("\n", " ")
        print(f"recsvc serve: cannot start: {message}", file=sys.stderr)
        return 1
    return 0


def cmd_build_index(args: argparse.Namespace) -> int:
    from recsvc.engine import load_catalog_and_index

    cfg = _config(args)
    t = time.perf_counter()
    catalog, ann = load_catalog_and_index(cfg, progress=True, rebuild=args.rebuild)
    print(f"index ready: {ann.live_count} items x {catalog.dim} dims ({cfg.index.space}) "
          f"in {time.perf_counter() - t:.1f} s")
    return 0


def _client_config(args: argparse.Namespace):
    """The settings of ``--config`` (default: none) for the client verbs, with ``--target`` on top (the target:
    ``client.target``, else the file's ``server.host:server.port``)."""
    from recsvc.config import load_config

    cfg = load_config(args.config)
    target = getattr(args, "target", None) or cfg.client_target()
    return cfg.with_overrides({"client": {"target": target}}, source="--target")


def _stub(args: argparse.Namespace):
    from recsvc.server.security import client_channel, normalise_target
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    cfg = _client_config(args)
    args.resolved_target = normalise_target(cfg.client.target)
    channel = client_channel(cfg.client)
    return channel, pb_grpc.RecommenderStub(channel)


def cmd_recommend(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from recsvc.v1 import recommender_pb2 as pb

    channel, stub = _stub(args)
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

    channel, stub = _stub(args)
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
    from recsvc.config import as_toml

    cfg = _config(args)
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    elif args.config:
        sys.stdout.write(as_toml(cfg, f"recsvc configuration: {args.config} resolved, every key with its value."))
    else:
        sys.stdout.write(as_toml(cfg))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check: exit 0 when the server is SERVING (container health checks)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel, _ = _stub(args)
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                     timeout=args.timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.resolved_target}: {status}")
    channel.close()
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_reload(args: argparse.Namespace) -> int:
    from recsvc.v1 import recommender_pb2 as pb

    channel, stub = _stub(args)
    resp = stub.ReloadRanker(pb.ReloadRankerRequest(), timeout=args.timeout)
    print("reloaded the config's reloadable keys (see the server log) and the ranker weights: "
          + ", ".join(f or "(default)" for f in resp.reloaded))
    channel.close()
    return 0


#: Below these, held-out metrics swing by more than the differences between models (train-ranker warns).
SMALL_DATA_EXAMPLES = 5000
SMALL_DATA_POSITIVES = 100


def cmd_train_ranker(args: argparse.Namespace) -> int:
    import numpy as np

    from recsvc.ranking import Ranker
    from recsvc.training import log_loss, roc_auc, served_examples, train_from_state_dir, train_ranker

    cfg = _config(args)
    state_dir = Path(cfg.state.dir).expanduser()
    ex = served_examples(state_dir, cfg.state.attribution_window_s)
    ipw = not args.no_ipw
    if args.kind == "gbdt":  # LambdaRank over slates, with its own held-out slates (not comparable below)
        ranker, metrics = train_from_state_dir(state_dir, kind="gbdt", ipw=ipw, seed=args.seed,
                                               attribution_window_s=cfg.state.attribution_window_s)
    else:
        ranker, metrics = train_ranker(ex.X, ex.y, ex.propensity, kind=args.kind, ipw=ipw, seed=args.seed,
                                       feature_names=ex.feature_names)
    metrics = dict(metrics, examples=len(ex), positives=int(ex.y.sum()))
    metrics.setdefault("n_holdout", int(round(len(ex) * 0.2)))
    print(json.dumps(metrics, indent=2))
    if len(ex) < SMALL_DATA_EXAMPLES or metrics["positives"] < SMALL_DATA_POSITIVES:
        print(f"warning: small data: {len(ex)} examples, {metrics['positives']} positives (fewer than "
              f"{SMALL_DATA_EXAMPLES} examples or {SMALL_DATA_POSITIVES} positives); held-out metrics on "
              f"{metrics['n_holdout']} examples are noisy and the model may be poorly calibrated",
              file=sys.stderr)

    # The incumbent (ranking.model_path, else the shipped default) on the same held-out split (train_ranker's:
    # the first round(n * 0.2) of a permutation seeded by --seed; n >= 10).
    n = len(ex)
    hold = np.random.default_rng(args.seed).permutation(n)[:int(round(n * 0.2)) if n >= 10 else 0]
    current_name = str(cfg.ranking.model_path) if cfg.ranking.model_path else "the shipped default weights"
    verdict = None
    if args.kind == "gbdt":
        print("note: boosted trees hold out whole slates of their own; the comparison with the current model "
              "is not made (check the held-out NDCG above)", file=sys.stderr)
    elif hold.size and 0 < ex.y[hold].sum() < hold.size:
        try:
            current = Ranker.load(cfg.ranking.model_path) if cfg.ranking.model_path else Ranker.default()
        except (OSError, ValueError) as exc:
            current = None
            print(f"note: the current model ({current_name}) does not load ({exc}); not compared",
                  file=sys.stderr)
        if current is not None and tuple(current.feature_names) == tuple(ex.feature_names):
            w = (1.0 / np.maximum(ex.propensity[hold], 0.01)) if ipw else None
            new_p, old_p = ranker.score_features(ex.X[hold]), current.score_features(ex.X[hold])
            new_ll, old_ll = log_loss(ex.y[hold], new_p, w), log_loss(ex.y[hold], old_p, w)
            new_auc, old_auc = roc_auc(ex.y[hold], new_p, w), roc_auc(ex.y[hold], old_p, w)
            kind = "IPW-weighted " if ipw else ""
            print(f"held-out {kind}log loss: new {new_ll:.4f}, current ({current_name}) {old_ll:.4f} (lower is "
                  f"better); AUC: new {new_auc:.3f}, current {old_auc:.3f} (higher is better)", file=sys.stderr)
            verdict = new_ll <= old_ll
        elif current is not None:
            print(f"note: the current model ({current_name}) uses other features; not compared", file=sys.stderr)
    if verdict is False and not args.force:
        print(f"refused: the new model is worse than the current one ({current_name}) on the held-out split; "
              f"nothing written. --force writes it anyway.", file=sys.stderr)
        return 1
    ranker.save(args.output)
    print(f"wrote {args.output}; point ranking.model_path at it and send SIGHUP (or run `recsvc reload`)")
    return 0


def cmd_experiment_report(args: argparse.Namespace) -> int:
    from recsvc.v1 import recommender_pb2 as pb

    channel, stub = _stub(args)
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

        if args.validate:
            from recsvc.evaluation.service_log import validate_random_slice

            report = validate_random_slice(args.state_dir)
        else:
            report = evaluate_service_log(args.state_dir, args.target_ranker, args.temperature)
        print(json.dumps(report, indent=2, default=float))
        return 0
    from recsvc.evaluation.datasets import format_obd_report, validate_on_obd

    if not args.data.is_dir():
        print(f"error: --data {args.data}: no such directory ({args.data.resolve()})", file=sys.stderr)
        return 2
    report = validate_on_obd(args.data, campaign=args.campaign)
    print(json.dumps(report, indent=2, default=float) if args.json else format_obd_report(report))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recsvc")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _rpc_error(args: argparse.Namespace, exc) -> str:
    """One line for a failed call; a refused connection says whether anything listens there and what to do."""
    import grpc

    code, details = exc.code(), exc.details() or ""
    target = getattr(args, "resolved_target", "?")
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "refused" in details.lower()
                                                or "dns" in details.lower()):
        return (f"error: no recsvc server answers at {target} ({details.splitlines()[0][:200]}). Start one with "
                f"`recsvc serve` (it listens on 127.0.0.1:50051 by default), or pass --target HOST:PORT or "
                "--config FILE (its client.target, else its server.host:server.port).")
    if code == grpc.StatusCode.UNAVAILABLE and ("ssl" in details.lower() or "handshake" in details.lower()
                                                or "tls" in details.lower()):
        return (f"error: UNAVAILABLE: {details} (a TLS mismatch? the server and [client] tls / tls_ca must "
                "agree)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"error: UNAUTHENTICATED: {details}"
    return f"error: {code.name}: {details}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsvc", description="A multi-stage recommendation service over gRPC.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"recsvc {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", type=Path, help="TOML config file (see `recsvc config`)")
        sp.add_argument("--catalog", type=Path, help="catalog directory (default: the demo catalog)")
        sp.add_argument("--state-dir", type=Path, help="state directory (event log, snapshots)")
        return sp

    def client(sp):
        sp.add_argument("--config", type=Path,
                        help="TOML config file: its [client] section (target, token, TLS) is used")
        sp.add_argument("--target", help="host[:port] of a recsvc server (default: client.target of --config, "
                                         "else 127.0.0.1:50051; no port: 50051)")
        sp.add_argument("--timeout", type=float, default=10.0, help="seconds")
        return sp

    s = with_config(sub.add_parser("serve", help="run the gRPC server (demo catalog by default)"))
    s.add_argument("--port", type=int, help="TCP port (0: pick a free one)")
    s.add_argument("--host", help="address to listen on")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port (0: one per core); more than one needs the Redis backend")
    s.add_argument("--accept-loss", action="store_true",
                   help="start even though the event log is damaged or misses records (a start refused "
                        "and said why): the valid records are kept, the lost ones are logged; use once")
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

    s = with_config(sub.add_parser("config", help="print the default config as commented TOML (or a file's, resolved)"))
    s.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    s.set_defaults(fn=cmd_config)

    s = client(sub.add_parser("reload", help="make a running server re-read its config's reloadable keys and "
                                             "its ranker weights (like SIGHUP)"))
    s.set_defaults(fn=cmd_reload)

    s = client(sub.add_parser("health", help="ask a server's grpc.health.v1 service; exit 0 when SERVING"))
    s.add_argument("--service", default="", help="service name ('' = the whole server)")
    s.set_defaults(fn=cmd_health)

    s = with_config(sub.add_parser("train-ranker", help="train the ranker from the feedback log"))
    s.add_argument("--kind", choices=["logistic", "mlp", "gbdt"], default="logistic",
                   help="gbdt: LambdaRank trees over each served slate (needs the 'train' extra: LightGBM)")
    s.add_argument("--no-ipw", action="store_true", help="do not weight by inverse propensity")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", type=Path, required=True, help="weights file to write")
    s.add_argument("--force", action="store_true",
                   help="write the model even when it is worse than the current one on the held-out split")
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
    s.add_argument("--campaign", default="men",
                   help="with --data: the campaign, i.e. the CSV name in bts/ and random/ (men, women, all)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--target-ranker", type=Path, help="with --state-dir: weights file of the policy to evaluate")
    s.add_argument("--temperature", type=float, default=0.1, help="soft top-k temperature of the target")
    s.add_argument("--validate", action="store_true",
                   help="with --state-dir: estimate the random-exposure slice's click rate (exploration.random_share) "
                        "from the main policy's log, and the main policy's from the slice's (\"reverse\": exact, with "
                        "the main policy's propensities logged on the slice's slates; by item on a log older than "
                        "that, marked \"exact\": false), and report whether the intervals cover the observed values")
    s.set_defaults(fn=cmd_ope)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recsvc.logs import configure

    configure("text", "debug" if args.verbose else "info")
    from recsvc.config import ConfigError

    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `recsvc recommend bob | head -1`: the reader left; say nothing (and let Python's exit flush nothing)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1  # as Python documents for SIGPIPE (signal module, "Note on SIGPIPE")
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(_rpc_error(args, exc), file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

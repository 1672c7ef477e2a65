"""Operability and security on a live server: Prometheus metrics, TLS, bearer tokens, reload, client verbs."""

import datetime
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from conftest import free_port, small_config


def _start(cfg, config_path=None):
    from recsvc.server import serve

    stop, started, ready = threading.Event(), threading.Event(), {}

    def on_ready(port):
        ready["port"] = port
        started.set()

    t = threading.Thread(target=serve, args=(cfg,), daemon=True,
                         kwargs={"on_ready": on_ready, "stop_event": stop, "config_path": config_path})
    t.start()
    assert started.wait(120), "server did not become ready"
    return ready["port"], stop, t


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, **labels) -> float:
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric == name and set(filter(None, rest.rstrip("}").split(","))) == want:
            return float(value)
    raise AssertionError(f"{name}{sorted(want)} not in the scrape")


# -- metrics --------------------------------------------------------------------------------------------------

def test_metrics_endpoint_counts_rpcs_stages_feedback_and_sizes(tmp_path):
    mport = free_port()
    cfg = small_config(tmp_path, server={"port": 0}, metrics={"port": mport, "sample_interval_s": 0.2})
    port, stop, t = _start(cfg)
    try:
        before = _scrape(mport)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RecommenderStub(ch)
            resp = stub.Recommend(pb.RecommendRequest(user_id="alice", n=5), timeout=10)
            stub.Feedback(pb.FeedbackRequest(events=[
                pb.FeedbackEvent(event_id="m1", request_id=resp.request_id, user_id="alice",
                                 item_id=resp.items[0].item_id, type=pb.CLICK),
                pb.FeedbackEvent(event_id="m1", user_id="alice", item_id=resp.items[0].item_id, type=pb.CLICK),
                pb.FeedbackEvent(event_id="m2", user_id="alice", item_id="ghost", type=pb.CLICK),
            ]), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stub.Recommend(pb.RecommendRequest(user_id=""), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        time.sleep(0.5)
        after = _scrape(mport)
    finally:
        stop.set()
        t.join(30)

    def delta(name, **labels):
        try:
            old = _value(before, name, **labels)
        except AssertionError:
            old = 0.0
        return _value(after, name, **labels) - old

    assert delta("recsvc_rpcs_total", method="Recommend", code="OK") == 1
    assert delta("recsvc_rpcs_total", method="Recommend", code="INVALID_ARGUMENT") == 1
    assert delta("recsvc_rpcs_total", method="Feedback", code="OK") == 1
    assert delta("recsvc_rpc_duration_seconds_count", method="Recommend") == 2
    assert delta("recsvc_recommend_stage_duration_seconds_count", stage="ranking") == 1
    assert delta("recsvc_feedback_events_total", outcome="accepted") == 1
    assert delta("recsvc_feedback_events_total", outcome="duplicate") == 1
    assert delta("recsvc_feedback_rejected_total", reason="unknown_item") == 1
    assert _value(after, "recsvc_catalog_items") == 3000
    assert _value(after, "recsvc_index_items") == 3000
    assert _value(after, "recsvc_served_log_slates") >= 1
    assert _value(after, "recsvc_served_log_bytes") > 0
    assert _value(after, "recsvc_queue_depth") == 0
    assert "alice" not in after  # no caller data in labels


def test_rejection_reasons_map_to_bounded_labels():
    from recsvc.metrics import rejection_kind

    assert rejection_kind("unknown item_id 'x'") == "unknown_item"
    assert rejection_kind("request_id 'r' is unknown or has expired") == "unknown_request"
    assert rejection_kind("item 'a' was not served in request 'r'") == "not_served_in_request"
    assert rejection_kind("timestamp_ms 5 is outside the accepted range [...]") == "timestamp_out_of_range"
    assert rejection_kind("something new") == "other"


def test_degraded_reasons_are_counted(engine):
    from recsvc import metrics
    from recsvc.engine import RecommendQuery

    before = metrics.DEGRADED.labels("ranking_skipped")._value.get()
    rec = engine.recommend(RecommendQuery(user_id="bob", n=5, budget_ms=0.001))
    assert rec.degraded and "ranking_skipped" in rec.degraded_reasons
    assert metrics.DEGRADED.labels("ranking_skipped")._value.get() == before + 1


def test_workers_metrics_are_summed_by_the_supervisor(tmp_path):
    """prometheus_client multiprocess mode: each worker process writes, the supervisor's endpoint sums."""
    from recsvc.metrics import start_endpoint

    d = tmp_path / "mp"
    d.mkdir()
    code = ("from recsvc import metrics; metrics.RPCS.labels('Recommend', 'OK').inc(3); "
            "metrics.CATALOG_ITEMS.set(42)")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(d))
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
    try:
        server, port = start_endpoint("127.0.0.1", 0)
        try:
            text = _scrape(port)
        finally:
            server.shutdown()
            server.server_close()
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert _value(text, "recsvc_rpcs_total", code="OK", method="Recommend") == 6
    assert _value(text, "recsvc_catalog_items") == 42  # every replica holds the same catalog: the largest


# -- TLS and tokens -------------------------------------------------------------------------------------------

def _self_signed(directory):
    """A CA, a server certificate for localhost and a client certificate, generated now (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_name=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("recsvc test CA", ca=True)
    files = {}
    for name, san in (("server", "localhost"), ("client", None)):
        key, cert = make(name, ca_cert.subject, ca_key, san=san)
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{name}_cert"] = directory / f"{name}.pem"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["ca"] = directory / "ca.pem"
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    certs = _self_signed(tmp)
    (tmp / "read.tokens").write_text("# read scope\nread-token-1\n")
    os.environ["RECSVC_TEST_WRITE_TOKEN"] = "write-token-1"
    cfg = small_config(tmp, server={"port": 0},
                       tls={"cert": str(certs["server_cert"]), "key": str(certs["server_key"])},
                       auth={"read_tokens": [f"file:{tmp / 'read.tokens'}"],
                             "write_tokens": ["env:RECSVC_TEST_WRITE_TOKEN"]})
    port, stop, t = _start(cfg)
    yield port, certs, tmp
    stop.set()
    t.join(30)
    del os.environ["RECSVC_TEST_WRITE_TOKEN"]


def _secure_stub(port, certs, token=None):
    creds = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    ch = grpc.secure_channel(f"localhost:{port}", creds)
    return ch, pb_grpc.RecommenderStub(ch)


def _feedback_request():
    return pb.FeedbackRequest(events=[pb.FeedbackEvent(event_id="t1", user_id="u", item_id="ghost", type=pb.CLICK)])


def test_no_token_is_unauthenticated(secure_server):
    port, certs, _ = secure_server
    ch, stub = _secure_stub(port, certs)
    with ch, pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb.RecommendRequest(user_id="u", n=3), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in err.value.details()


def test_wrong_token_is_unauthenticated(secure_server):
    port, certs, _ = secure_server
    ch, stub = _secure_stub(port, certs, "read-token-2")
    with ch, pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb.RecommendRequest(user_id="u", n=3), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid" in err.value.details() and "read-token" not in err.value.details()


def test_read_token_reads_but_may_not_write(secure_server):
    port, certs, _ = secure_server
    ch, stub = _secure_stub(port, certs, "read-token-1")
    with ch:
        assert len(stub.Recommend(pb.RecommendRequest(user_id="u", n=3), timeout=10).items) == 3
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(_feedback_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "write scope" in err.value.details()


def test_write_token_writes(secure_server):
    port, certs, _ = secure_server
    ch, stub = _secure_stub(port, certs, "write-token-1")
    with ch, pytest.raises(grpc.RpcError) as err:
        stub.Feedback(_feedback_request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # authorised; the event itself is refused


def test_plaintext_to_a_tls_server_fails(secure_server):
    port, _, _ = secure_server
    with grpc.insecure_channel(f"localhost:{port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_id="u", n=3), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token(secure_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port, certs, _ = secure_server
    ch, _ = _secure_stub(port, certs)
    with ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_client_verbs_use_the_config_client_section(secure_server, tmp_path):
    port, certs, _ = secure_server
    config = tmp_path / "client.toml"
    config.write_text(f'[client]\ntarget = "localhost:{port}"\ntoken = "env:MY_TOKEN"\n'
                      f'tls_ca = "{certs["ca"]}"\n')
    env = dict(os.environ, MY_TOKEN="read-token-1")
    out = subprocess.run([sys.executable, "-m", "recsvc.cli", "recommend", "bob", "-n", "2", "--config",
                          str(config)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "request_id" in out.stdout
    env["MY_TOKEN"] = "nope"
    out = subprocess.run([sys.executable, "-m", "recsvc.cli", "recommend", "bob", "--config", str(config)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr and "nope" not in out.stderr


def test_mutual_tls_refuses_a_caller_without_a_certificate(tmp_path):
    certs = _self_signed(tmp_path)
    cfg = small_config(tmp_path, server={"port": 0},
                       tls={"cert": str(certs["server_cert"]), "key": str(certs["server_key"]),
                            "client_ca": str(certs["ca"])})
    port, stop, t = _start(cfg)
    try:
        ch, stub = _secure_stub(port, certs)
        with ch, pytest.raises(grpc.RpcError) as err:
            stub.Recommend(pb.RecommendRequest(user_id="u", n=3), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(certs["ca"].read_bytes(), certs["client_key"].read_bytes(),
                                             certs["client_cert"].read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            assert len(pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_id="u", n=3),
                                                             timeout=10).items) == 3
    finally:
        stop.set()
        t.join(30)


def test_tokens_never_sit_in_the_config_itself():
    from recsvc.config import Config, ConfigError, load_config

    with pytest.raises(ConfigError, match="'file:PATH' or 'env:VARIABLE'"):
        load_config(None, {"auth": {"write_tokens": ["hunter2"]}})
    assert Config().auth.write_tokens == []


def test_token_compare_scopes():
    from recsvc.config import AuthConfig
    from recsvc.server.security import TokenSet

    os.environ["RECSVC_T_R"], os.environ["RECSVC_T_W"] = "r", "w"
    try:
        ts = TokenSet(AuthConfig(read_tokens=["env:RECSVC_T_R"], write_tokens=["env:RECSVC_T_W"]))
    finally:
        del os.environ["RECSVC_T_R"], os.environ["RECSVC_T_W"]
    assert (ts.scope(b"r"), ts.scope(b"w"), ts.scope(b"x"), ts.scope(b"")) == ("read", "write", None, None)


# -- logs -----------------------------------------------------------------------------------------------------

def test_json_logs_one_object_per_line_with_request_id_and_no_secrets():
    import logging

    from recsvc.logs import JsonFormatter, _Context, reset_request_id, set_request_id

    rec = logging.LogRecord("recsvc.x", logging.INFO, __file__, 1,
                            "called with Bearer s3cret and %s", ([0.125] * 64,), None)
    token = set_request_id("abc123")
    try:
        _Context().filter(rec)
    finally:
        reset_request_id(token)
    line = JsonFormatter().format(rec)
    data = json.loads(line)
    assert data["request_id"] == "abc123" and data["level"] == "info" and data["logger"] == "recsvc.x"
    assert "s3cret" not in line and "Bearer [redacted]" in data["message"]
    assert data["message"].count("0.125") == 4 and "60 more" in data["message"]


# -- reload ---------------------------------------------------------------------------------------------------

def test_reload_rereads_the_reloadable_keys_and_reports_the_rest(tmp_path):
    from recsvc.config import reloaded

    running = small_config(tmp_path)
    fresh = running.with_overrides({"reranking": {"max_per_category": 1}, "server": {"max_workers": 3}})
    cfg, applied, restart = reloaded(running, fresh)
    assert applied == ["reranking.max_per_category"] and restart == ["server.max_workers"]
    assert cfg.reranking.max_per_category == 1 and cfg.server.max_workers == running.server.max_workers


def test_reload_rpc_applies_a_changed_config_file(tmp_path):
    config = tmp_path / "recsvc.toml"
    base = small_config(tmp_path, server={"port": 0})
    from recsvc.config import as_toml

    config.write_text(as_toml(base))
    port, stop, t = _start(base, config_path=config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RecommenderStub(ch)
            assert len(stub.Recommend(pb.RecommendRequest(user_id="r", n=0), timeout=10).items) == 10
            config.write_text(as_toml(base.with_overrides({"recommend": {"default_n": 4}})))
            assert stub.ReloadRanker(pb.ReloadRankerRequest(), timeout=30).reloaded == [""]
            assert len(stub.Recommend(pb.RecommendRequest(user_id="r", n=0), timeout=10).items) == 4
    finally:
        stop.set()
        t.join(30)


# -- CLI ------------------------------------------------------------------------------------------------------

def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "recsvc.cli", *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("recsvc ")


def test_target_without_port_means_50051():
    from recsvc.server.security import normalise_target

    assert normalise_target("localhost") == "localhost:50051"
    assert normalise_target("10.0.0.1:7000") == "10.0.0.1:7000"
    assert normalise_target("::1") == "[::1]:50051"
    assert normalise_target("[::1]:9") == "[::1]:9"


def test_refused_connection_says_how_to_start_a_server():
    out = _cli("recommend", "bob", "--target", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert out.returncode == 1
    assert "no recsvc server answers at 127.0.0.1:" in out.stderr and "recsvc serve" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_file_prints_commented_toml(tmp_path):
    import tomllib

    from recsvc.config import Config

    p = tmp_path / "c.toml"
    p.write_text("[recommend]\ndefault_n = 7\n")
    out = _cli("config", "--config", str(p))
    assert out.returncode == 0, out.stderr
    assert "# Slate size when a request says n = 0." in out.stdout
    assert Config.model_validate(tomllib.loads(out.stdout)).recommend.default_n == 7


def test_broken_pipe_ends_quietly():
    code = ("import sys, recsvc.cli as c\n"
            "c.cmd_config = lambda a: [print('x' * 1000) for _ in range(10000)] and 0\n"
            "sys.exit(c.main(['config']))")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_the_grafana_dashboard_queries_metrics_that_exist():
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    import recsvc.metrics  # noqa: F401 - registers the metrics

    dash = json.loads((Path(__file__).parent.parent / "examples" / "grafana" / "recsvc-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"recsvc_[a-z_]+", e)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    known = {m.name + s for m in REGISTRY.collect() for s in suffixes.get(m.type, ())}
    assert used and used <= known, used - known


def test_config_typos_get_a_suggestion(tmp_path):
    from recsvc.config import ConfigError, load_config

    p = tmp_path / "typo.toml"
    p.write_text("[retrival]\nn_candidates = 5\n[ranking]\nmodel_pth = 'x'\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert f"{p}: retrival: unknown key; did you mean 'retrieval'?" in str(err.value)
    assert f"{p}: ranking.model_pth: unknown key; did you mean 'model_path'?" in str(err.value)


def test_an_unbuilt_source_tree_is_explained():
    import recsvc

    exc = recsvc._explained(ImportError("cannot import name '_retrieval'", name="recsvc._fastpath._retrieval"))
    assert "source tree" in str(exc) and "pip install -e ." in str(exc) and "another directory" in str(exc)
    other = ImportError("No module named 'hnswlib'", name="hnswlib")
    assert recsvc._explained(other) is other


def test_simulate_against_a_server_takes_the_catalog_from_its_config(tmp_path):
    from recsvc.config import as_toml

    cfg = small_config(tmp_path, server={"port": 0}, state={"fsync": "none"})
    config = tmp_path / "server.toml"
    config.write_text(as_toml(cfg))
    port, stop, t = _start(cfg)
    try:
        out = _cli("simulate", "--target", f"127.0.0.1:{port}", "--config", str(config), "--rounds", "2",
                   "--users", "4", "--no-progress", "--items", "500")
    finally:
        stop.set()
        t.join(30)
    assert out.returncode == 0, out.stderr
    assert "--items/--dim/--catalog-seed are ignored" in out.stderr and "Traceback" not in out.stderr


def test_train_ranker_warns_on_small_data_and_refuses_a_worse_model(tmp_path, clock, capsys):
    from test_train_from_log import _traffic

    from recsvc.cli import main
    from recsvc.engine import Engine

    cfg = small_config(tmp_path)
    engine = Engine.from_config(cfg, clock=clock)
    _traffic(engine)
    engine.close(snapshot=False)
    first = tmp_path / "a.json"
    assert main(["train-ranker", "--state-dir", str(cfg.state.dir), "-o", str(first)]) == 0
    err = capsys.readouterr().err
    assert "warning: small data: 480 examples" in err
    assert "current (the shipped default weights)" in err
    conf = tmp_path / "c.toml"
    conf.write_text(f'[state]\ndir = "{cfg.state.dir}"\n[ranking]\nmodel_path = "{first}"\n')
    worse = tmp_path / "mlp.json"
    assert main(["train-ranker", "--config", str(conf), "--kind", "mlp", "-o", str(worse)]) == 1
    assert "refused: the new model is worse than the current one" in capsys.readouterr().err
    assert not worse.exists()
    assert main(["train-ranker", "--config", str(conf), "--kind", "mlp", "--force", "-o", str(worse)]) == 0
    assert worse.exists()


def test_health_verb_exits_0_when_serving(tmp_path):
    cfg = small_config(tmp_path, server={"port": 0})
    port, stop, t = _start(cfg)
    try:
        out = _cli("health", "--target", f"127.0.0.1:{port}")
    finally:
        stop.set()
        t.join(30)
    assert out.returncode == 0 and out.stdout.strip() == f"127.0.0.1:{port}: SERVING", out.stderr


def test_dockerfile_wraps_the_readme_commands():
    from pathlib import Path

    root = Path(__file__).parent.parent
    docker = (root / "Dockerfile").read_text()
    assert "pip wheel --no-cache-dir --wheel-dir /wheels ." in docker  # README: pip install .
    assert '"recsvc", "health"' in docker and 'CMD ["serve"' in docker
    compose = (root / "docker-compose.yml").read_text()
    assert compose.count("<<: *replica") == 1 and "redis:7" in compose
    from recsvc.config import load_config

    assert load_config(root / "examples" / "docker" / "recsvc.toml").state.backend == "redis"


def test_workers_serve_one_metrics_endpoint_for_the_whole_server_and_log_json(tmp_path):
    import signal

    from redis_server import RedisServer
    from test_workers import children, write_config

    redis = RedisServer(tmp_path / "redis")
    mport = free_port()
    config = write_config(tmp_path, "redis", redis.url)
    text = config.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {mport}")
    config.write_text(text + '\n[logging]\nformat = "json"\n')
    proc = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(config), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("recsvc serving with"):
                port = int(line.rsplit(":", 1)[1])
                break
            assert line, proc.stderr.read()
        assert port is not None and len(children(proc.pid)) == 2
        for k in range(8):  # a connection each: the kernel spreads them over the workers
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = pb_grpc.RecommenderStub(ch)
                for j in range(3):
                    stub.Recommend(pb.RecommendRequest(user_id=f"w{k}-{j}", n=3), timeout=10)
        time.sleep(1)
        scraped = _scrape(mport)
        assert _value(scraped, "recsvc_rpcs_total", method="Recommend", code="OK") == 24
        assert _value(scraped, "recsvc_recommend_stage_duration_seconds_count", stage="total") == 24
        assert _value(scraped, "recsvc_catalog_items") == 2000  # each replica's, not their sum
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        redis.stop()
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and {r["worker"] for r in records if "worker" in r} == {"worker-0", "worker-1"}
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)


def test_sighup_rereads_the_config_file(tmp_path):
    import signal

    from recsvc.config import as_toml

    cfg = small_config(tmp_path, server={"port": free_port()})
    config = tmp_path / "recsvc.toml"
    config.write_text(as_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if line.startswith("recsvc serving"):
                break
        with grpc.insecure_channel(f"127.0.0.1:{cfg.server.port}") as ch:
            stub = pb_grpc.RecommenderStub(ch)
            assert len(stub.Recommend(pb.RecommendRequest(user_id="h", n=0), timeout=10).items) == 10
            config.write_text(as_toml(cfg.with_overrides({"recommend": {"default_n": 3},
                                                          "server": {"max_workers": 2}})))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while len(stub.Recommend(pb.RecommendRequest(user_id="h", n=0), timeout=10).items) != 3:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "applied recommend.default_n" in err
    assert "needs a restart (running values kept): server.max_workers" in err


def test_tokens_over_plaintext_and_token_files_reread_on_reload(tmp_path):
    tokens = tmp_path / "write.tokens"
    tokens.write_text("first\n")
    cfg = small_config(tmp_path, server={"port": 0}, auth={"write_tokens": [f"file:{tokens}"]})
    port, stop, t = _start(cfg)
    try:
        env = dict(os.environ, RECSVC_TOKEN="first")
        out = _cli("recommend", "bob", "-n", "2", "--target", f"127.0.0.1:{port}", env=env)
        assert out.returncode == 0, out.stderr
        tokens.write_text("second\n")
        assert _cli("reload", "--target", f"127.0.0.1:{port}", env=env).returncode == 0
        out = _cli("recommend", "bob", "--target", f"127.0.0.1:{port}", env=env)
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
        env["RECSVC_TOKEN"] = "second"
        assert _cli("recommend", "bob", "--target", f"127.0.0.1:{port}", env=env).returncode == 0
    finally:
        stop.set()
        t.join(30)


def test_client_verbs_call_the_server_of_a_server_config(tmp_path):
    from recsvc.config import as_toml

    cfg = small_config(tmp_path, server={"port": free_port()})
    config = tmp_path / "recsvc.toml"
    config.write_text(as_toml(cfg))
    port, stop, t = _start(cfg)
    try:
        out = _cli("recommend", "bob", "-n", "2", "--config", str(config))
    finally:
        stop.set()
        t.join(30)
    assert out.returncode == 0, out.stderr

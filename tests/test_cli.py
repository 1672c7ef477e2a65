"""The recsvc command: offline subcommands (the client ones run in test_server_e2e)."""

import tomllib

import pytest

from recsvc.cli import main
from recsvc.config import Config

from conftest import SHARED_DATA


def test_config_prints_loadable_defaults(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert Config.model_validate(tomllib.loads(text)) == Config()


def test_config_errors_name_the_key(tmp_path, capsys):
    p = tmp_path / "bad.toml"
    p.write_text("[retrieval]\nn_candidates = -5\n")
    assert main(["config", "--config", str(p)]) == 2
    assert "retrieval.n_candidates" in capsys.readouterr().err


def test_build_index_then_reuse(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text(f'[catalog]\ncache_dir = "{tmp_path}/cache"\n[catalog.demo]\nn_items = 500\ndim = 8\n')
    assert main(["build-index", "--config", str(p)]) == 0
    assert "index ready: 500 items x 8 dims" in capsys.readouterr().out
    assert list((tmp_path / "cache").glob("*/index.bin"))


@pytest.mark.skipif(not (SHARED_DATA / "obd-men").exists(), reason="../shared/data/obd-men is not present")
def test_ope_on_the_open_bandit_sample(capsys):
    assert main(["ope", "--data", str(SHARED_DATA / "obd-men")]) == 0
    out = capsys.readouterr().out
    for name in ("IPS", "SNIPS", "DR"):
        assert name in out


def test_ope_needs_a_data_source(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ope"])
    assert exc.value.code == 2
    assert "recsvc ope: error: one of the arguments --data --state-dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ope", "--help"])
    assert "e.g. ../shared/data/obd-men" in " ".join(capsys.readouterr().out.split())


def test_ope_reports_a_missing_data_directory(tmp_path, capsys):
    assert main(["ope", "--data", str(tmp_path / "nope")]) == 2
    assert f"error: --data {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err

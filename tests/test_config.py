import re

import pytest

from recsvc.config import (
    DATA_MAPPINGS,
    Config,
    ConfigError,
    deep_merge,
    defaults_as_toml,
    load_config,
    read_toml,
)


def test_defaults_are_documented_and_valid():
    cfg = Config()
    assert cfg.recommend.default_n == 10
    assert cfg.retrieval.shares == {"ann": 600, "cooccurrence": 200, "popular": 100, "fresh": 100}
    text = defaults_as_toml()
    for section in ("[server]", "[catalog]", "[catalog.demo]", "[retrieval]", "[exploration]", "[state]"):
        assert section in text
    # every field carries a description
    for section in Config.model_fields.values():
        model = section.annotation
        for name, field in model.model_fields.items():
            if not hasattr(field.annotation, "model_fields"):
                assert field.description, f"{model.__name__}.{name} has no description"


def test_defaults_toml_round_trips(tmp_path):
    text = defaults_as_toml()
    # unset optionals are written commented out, so the file loads as the defaults
    p = tmp_path / "d.toml"
    p.write_text(text)
    assert load_config(p) == Config()


def test_file_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[server]\nport = 6000\n[retrieval.shares]\nann = 10\npopular = 5\n')
    cfg = load_config(p)
    assert cfg.server.port == 6000
    assert cfg.retrieval.shares == {"ann": 10, "popular": 5}
    assert cfg.server.host == "127.0.0.1"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"server\.prot: unknown key"):
        load_config(p)


def test_bad_value_names_the_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[exploration]\npolicy = "random"\n')
    with pytest.raises(ConfigError, match=r"exploration\.policy"):
        load_config(p)
    p.write_text("[retrieval.shares]\nann = -1\n")
    with pytest.raises(ConfigError, match=r"retrieval\.shares\.ann"):
        load_config(p)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_read_toml_names_the_file_in_every_error(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[server]\nport = 6000\n')
    assert read_toml(good) == {"server": {"port": 6000}}
    assert read_toml(str(good)) == {"server": {"port": 6000}}
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: config file not found")):
        read_toml(missing)
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: experiment file not found")):
        read_toml(missing, what="experiment file")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid TOML: ") + ".*line 1"):
        read_toml(bad)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{latin1}: not valid TOML: not UTF-8")):
        read_toml(latin1)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read the config file: ")):
        read_toml(tmp_path)  # a directory


def test_deep_merge_merges_sections_and_replaces_values():
    base = {"server": {"port": 1, "host": "h"}, "catalog": {"demo": {"n_items": 10, "dim": 8}}, "x": [1, 2]}
    extra = {"server": {"port": 2}, "catalog": {"demo": {"dim": 4}}, "x": [3]}
    assert deep_merge(base, extra) == {"server": {"port": 2, "host": "h"},
                                       "catalog": {"demo": {"n_items": 10, "dim": 4}}, "x": [3]}
    assert base["server"] == {"port": 1, "host": "h"} and extra == {"server": {"port": 2},
                                                                   "catalog": {"demo": {"dim": 4}}, "x": [3]}


def test_deep_merge_replaces_shares_whole():
    base = {"retrieval": {"n_candidates": 300, "shares": {"ann": 180, "cooccurrence": 60, "popular": 30}}}
    merged = deep_merge(base, {"retrieval": {"shares": {"popular": 1}}})
    assert merged == {"retrieval": {"n_candidates": 300, "shares": {"popular": 1}}}
    # the same through a config and a file
    assert Config().with_overrides({"retrieval": {"shares": {"ann": 5}}}).retrieval.shares == {"ann": 5}
    assert load_config(overrides={"retrieval": {"shares": {"fresh": 2}}}).retrieval.shares == {"fresh": 2}


def test_deep_merge_replaces_pinned_whole():
    base = {"reranking": {"mmr_lambda": 0.2, "pinned": {"item-1": 0, "item-2": 3}}}
    merged = deep_merge(base, {"reranking": {"pinned": {"item-9": 1}}})
    assert merged == {"reranking": {"mmr_lambda": 0.2, "pinned": {"item-9": 1}}}
    cfg = Config().with_overrides({"reranking": {"pinned": {"item-1": 0, "item-2": 3}}})
    assert cfg.with_overrides({"reranking": {"pinned": {"item-9": 1}}}).reranking.pinned == {"item-9": 1}
    assert cfg.with_overrides({"reranking": {"pinned": {}}}).reranking.pinned == {}  # an override can clear it


def test_data_mappings_are_the_mapping_valued_settings():
    # what deep_merge replaces whole; a new mapping-valued setting joins this set by itself
    assert DATA_MAPPINGS == {("retrieval", "shares"), ("reranking", "pinned")}
    # a key named like one elsewhere is still a section key
    assert deep_merge({"a": {"shares": {"x": 1}}}, {"a": {"shares": {"y": 2}}}) == {"a": {"shares": {"x": 1, "y": 2}}}


def test_cross_field_check():
    with pytest.raises(ConfigError, match="default_n"):
        Config().with_overrides({"recommend": {"default_n": 50, "max_n": 20}})

"""Dataset loaders: the interactions format, MovieLens, OBD, and the per-user temporal split."""

from pathlib import Path

import numpy as np
import pytest

from recsvc.evaluation.datasets import (
    DatasetFormatError,
    Interactions,
    load_interactions,
    load_movielens,
    load_obd,
    temporal_split_per_user,
)

from conftest import SHARED_DATA


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"data set not found at {path} (expected ../shared/data next to the repo)")
    return path


# ---- the generic CSV format -----------------------------------------------------------------------------


def test_load_interactions_generic_csv(tmp_path):
    (tmp_path / "events.csv").write_text(
        "timestamp,user_id,item_id,value,extra\n"
        "100,1,10,4.5,x\n"
        "\n"  # blank lines are skipped
        "2019-11-24 00:00:01+00:00,2,11,1,y\n"
    )
    (tmp_path / "items.csv").write_text(
        'item_id,title,categories\n11,"Heat, The",Crime|Drama\n10,Alien,\n'
    )
    data = load_interactions(tmp_path / "events.csv", tmp_path / "items.csv")
    np.testing.assert_array_equal(data.user_id, [1, 2])
    np.testing.assert_array_equal(data.item_id, [10, 11])
    np.testing.assert_array_equal(data.value, [4.5, 1.0])
    np.testing.assert_array_equal(data.timestamp, [100, 1574553601])  # ISO-8601 -> epoch seconds (UTC)
    assert data.items is not None
    np.testing.assert_array_equal(data.items.item_id, [10, 11])  # sorted by id
    assert data.items.title == ("Alien", "Heat, The")
    assert data.items.categories == ((), ("Crime", "Drama"))
    np.testing.assert_array_equal(data.items.rows_of([11, 10]), [1, 0])


def test_load_interactions_value_column_is_optional(tmp_path):
    (tmp_path / "clicks.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    np.testing.assert_array_equal(load_interactions(tmp_path / "clicks.csv").value, [1.0])


def test_load_interactions_reports_missing_column(tmp_path):
    (tmp_path / "bad.csv").write_text("user,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DatasetFormatError, match=r"missing column\(s\) \['user_id'\]"):
        load_interactions(tmp_path / "bad.csv")


def test_load_interactions_reports_the_bad_line(tmp_path):
    (tmp_path / "bad.csv").write_text("user_id,item_id,timestamp\n1,2,3\n1,x,4\n")
    with pytest.raises(DatasetFormatError, match=r"bad.csv: line 3: column 'item_id' holds 'x', expected int64"):
        load_interactions(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("user_id,item_id,timestamp\n1,2\n")
    with pytest.raises(DatasetFormatError, match="line 2 has 2 fields, the header has 3"):
        load_interactions(tmp_path / "short.csv")


def test_load_interactions_unknown_items(tmp_path):
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\n1,10,3\n1,99,4\n")
    (tmp_path / "items.csv").write_text("item_id,title,categories\n10,Alien,Horror\n")
    with pytest.warns(UserWarning, match=r"1 interaction\(s\) reference item ids missing .* item 99 \(lines \[3\]\)"):
        assert load_interactions(tmp_path / "events.csv", tmp_path / "items.csv").item_id.tolist() == [10]
    kept = load_interactions(tmp_path / "events.csv", tmp_path / "items.csv", unknown_items="keep")
    assert kept.item_id.tolist() == [10, 99]


def test_load_interactions_missing_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="nope.csv: file not found"):
        load_interactions(tmp_path / "nope.csv")


# ---- temporal split ------------------------------------------------------------------------------------


def small_log() -> Interactions:
    # user 1: 5 events at t = 50, 10, 40, 20, 30 (out of order); user 2: 2 events; user 3: 1 event
    return Interactions(
        user_id=[1, 1, 2, 1, 1, 3, 2, 1],
        item_id=[105, 101, 201, 104, 102, 301, 202, 103],
        value=np.ones(8),
        timestamp=[50, 10, 5, 40, 20, 7, 6, 30],
    )


def test_temporal_split_last_n():
    train, test = temporal_split_per_user(small_log(), last_n=2)
    # user 1 -> its two latest (104 @ 40, 105 @ 50); user 2 keeps one in train, so 1 in test; user 3 all train
    assert sorted(zip(test.user_id.tolist(), test.item_id.tolist())) == [(1, 104), (1, 105), (2, 202)]
    assert sorted(train.item_id.tolist()) == [101, 102, 103, 201, 301]


def test_temporal_split_fraction():
    # floor(0.5 * 5) = 2 for user 1; floor(0.5 * 2) = 1 for user 2; user 3 has a single event -> train
    train, test = temporal_split_per_user(small_log(), test_fraction=0.5)
    assert sorted(test.item_id.tolist()) == [104, 105, 202]
    # and a small fraction still puts at least one event per (multi-event) user in test
    _, test = temporal_split_per_user(small_log(), test_fraction=0.01)
    assert sorted(test.item_id.tolist()) == [105, 202]


def test_temporal_split_every_test_event_is_later_than_the_users_train_events():
    data = small_log()
    train, test = temporal_split_per_user(data, test_fraction=0.4)
    assert len(train) + len(test) == len(data)
    for u in np.unique(test.user_id):
        assert train.timestamp[train.user_id == u].max() <= test.timestamp[test.user_id == u].min()


def test_temporal_split_needs_exactly_one_rule():
    with pytest.raises(ValueError, match="give exactly one of test_fraction and last_n"):
        temporal_split_per_user(small_log())
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        temporal_split_per_user(small_log(), test_fraction=1.0)


# ---- real data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movielens():
    # The shared ratings.csv carries one extra row not in the published data set, "999,999999,5.0,1493846415"
    # (no trailing newline): a user and a movie that exist nowhere else. The loader drops it, loudly.
    with pytest.warns(UserWarning, match=r"1 interaction\(s\) reference item ids missing .* item 999999"):
        return load_movielens(needs(SHARED_DATA / "movielens-small"))


def test_movielens_rating_of_a_movie_missing_from_movies_csv_is_reported():
    message = r"ratings.csv: 1 interaction\(s\) .* item 999999 \(lines \[100838\]\)"
    with pytest.raises(DatasetFormatError, match=message):
        load_movielens(needs(SHARED_DATA / "movielens-small"), unknown_items="raise")


def test_movielens_small_counts(movielens):
    # the published counts (README.txt): 100,836 ratings by 610 users; 9,742 movies
    assert len(movielens) == 100_836
    assert movielens.n_users == 610
    assert movielens.items is not None and len(movielens.items) == 9_742
    assert movielens.n_items == 9_724  # movies with at least one rating
    assert movielens.value.min() == 0.5 and movielens.value.max() == 5.0
    assert movielens.timestamp.min() > 8e8  # 1996 onwards, in seconds


def test_movielens_titles_and_genres(movielens):
    items = movielens.items
    row = items.rows_of([1])[0]
    assert items.title[row] == "Toy Story (1995)"
    assert items.categories[row] == ("Adventure", "Animation", "Children", "Comedy", "Fantasy")
    indicators, names = items.category_indicators()
    assert indicators.shape == (9_742, len(names)) and "(no genres listed)" not in names
    assert len(movielens.implicit(4.0)) == int((movielens.value >= 4.0).sum())


def test_movielens_temporal_split(movielens):
    train, test = temporal_split_per_user(movielens, test_fraction=0.2)
    assert len(train) + len(test) == 100_836
    assert np.unique(test.user_id).size == 610  # every user has >= 20 ratings, so every user is in test


def test_load_obd_bts():
    log = load_obd(needs(SHARED_DATA / "obd-men" / "bts"))
    assert log.n == 10_000 and log.n_actions == 34
    assert set(np.unique(log.position).tolist()) == {1, 2, 3}
    assert log.reward.sum() == 69
    assert log.context is not None and log.context.shape[0] == 10_000
    assert (log.context.sum(axis=1) == 4).all()  # one level per hashed user feature
    with_affinity = load_obd(SHARED_DATA / "obd-men" / "bts", include_affinity=True)
    assert with_affinity.context.shape[1] == log.context.shape[1] + 34


def test_load_obd_random_has_uniform_propensities():
    log = load_obd(needs(SHARED_DATA / "obd-men" / "random" / "men.csv"))
    np.testing.assert_allclose(log.propensity, 1 / 34)


def test_temporal_split_global_cuts_everyone_at_one_moment():
    from recsvc.evaluation.datasets import temporal_split_global

    data = Interactions(np.array([1, 1, 1, 2, 2, 3, 3, 3]), np.array([10, 11, 12, 10, 13, 11, 12, 13]),
                        np.ones(8), np.array([100, 200, 500, 300, 600, 50, 500, 700]))
    train, test = temporal_split_global(data, test_fraction=0.25)
    assert sorted(test.timestamp.tolist()) == [600, 700] and train.timestamp.max() == 500
    # a tie at the cut stays on one side: 3 of 8 in test would cut between the two events at 500
    train, test = temporal_split_global(data, test_fraction=0.375)
    assert train.timestamp.max() == 500 and test.timestamp.min() == 600 and len(train) == 6
    assert np.all(np.diff(train.user_id) >= 0)  # (user, time) order, like the per-user split
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        temporal_split_global(data, test_fraction=0.0)

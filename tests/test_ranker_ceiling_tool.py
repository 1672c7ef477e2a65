"""tools/ranker_ceiling.py's popularity at the request's clock: only positives before the clock, decayed."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import ranker_ceiling  # noqa: E402 (tools/ is not a package)

DAY_S = 86_400


def test_clock_popularity_counts_only_the_past_with_its_half_life():
    # items "a" (row 0) and "b" (row 1); user 7 asks at day 400, user 9 at day 100
    timestamps = np.array([0, 35, 400, 35, 10], np.int64) * DAY_S
    item_ids = np.array(["a", "b"])
    world = SimpleNamespace(
        train_positive=SimpleNamespace(timestamp=timestamps, item_id=np.array(["a", "a", "a", "b", "b"])),
        item_ids=item_ids,
        catalog=SimpleNamespace(n_rows=2),
        eval_users=np.array([7, 9], np.int64),
        request_ms=np.array([400 * DAY_S - 1, 100 * DAY_S], np.int64) * 1000,
        train_end_ms=500 * DAY_S * 1000,
    )
    log = SimpleNamespace(users=np.array([7, 9], np.int64), user=np.array([0, 0, 1, 1]),
                          rows=np.array([0, 1, 0, 1]), y=np.zeros(4))
    out = ranker_ceiling._clock_popularity(world, log)
    assert out.shape == (4, len(ranker_ceiling.CLOCK_POPULARITY_HALF_LIVES))
    for j, days in enumerate(ranker_ceiling.CLOCK_POPULARITY_HALF_LIVES):
        def pop(t_days, event_days):
            return np.log1p(sum(2.0 ** (-(t_days - e) / days) for e in event_days if e < t_days))
        t7 = 400 - 1 / DAY_S  # the event at day 400 is after user 7's clock: not counted
        np.testing.assert_allclose(out[:, j], [pop(t7, [0, 35]), pop(t7, [35, 10]),
                                               pop(100, [0, 35]), pop(100, [35, 10])], rtol=1e-5)

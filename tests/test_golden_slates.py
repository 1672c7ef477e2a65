"""Same answers: slates recorded on the engine before its split (tests/golden.py) are served again,
item for item and propensity for propensity, for every policy, with and without experiments."""

import json

import pytest

from golden import GOLDEN, POLICIES, scenario

RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("experiments", [False, True], ids=["base", "experiments"])
@pytest.mark.parametrize("policy", POLICIES)
def test_golden_slates(tmp_path, policy, experiments):
    want = RECORDED[f"{policy}/{'experiments' if experiments else 'base'}"]
    got = scenario(tmp_path, policy, experiments)
    assert set(got) == set(want)
    for case in want:
        assert got[case] == want[case], case

"""The statistics every table and the regression gate rest on, against values computed by hand."""

import math

import pytest

from miarobust.stats import (
    holm,
    mcnemar_p,
    mcnemar_power,
    normal_sf,
    paired_drop_p,
    paired_mean_diff,
    two_proportion_drop_p,
    wilson,
)


def test_wilson_matches_the_closed_form_and_stays_in_0_1():
    lo, hi = wilson(80, 100)  # the textbook case: 80 of 100, 95%
    assert (round(lo, 4), round(hi, 4)) == (0.7112, 0.8666)
    assert wilson(0, 50)[0] == pytest.approx(0.0, abs=1e-12) and wilson(50, 50)[1] == pytest.approx(1.0)
    assert 0.0 <= wilson(0, 50)[0] and wilson(50, 50)[1] <= 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(12.5, 25)  # fractional successes (a mean over gate draws): centred, wider than at n = 100
    assert lo + hi == pytest.approx(1.0) and hi - lo > wilson(50, 100)[1] - wilson(50, 100)[0]


def test_normal_sf_and_two_proportion_drop():
    assert normal_sf(0) == 0.5 and normal_sf(1.959963984540054) == pytest.approx(0.025)
    assert two_proportion_drop_p(50, 100, 50, 100) == 0.5
    assert two_proportion_drop_p(60, 100, 40, 100) < 0.01 < two_proportion_drop_p(40, 100, 60, 100)


def test_exact_mcnemar_one_sided():
    assert paired_drop_p(0, 0) == 1.0
    assert paired_drop_p(3, 0) == 1 / 8  # three discordant pairs, all against the new run
    assert paired_drop_p(1, 2) == 7 / 8
    assert paired_drop_p(10, 10) == pytest.approx(0.5 + math.comb(20, 10) / 2**21)


def test_exact_mcnemar_two_sided_is_symmetric_and_capped():
    assert mcnemar_p(3, 0) == mcnemar_p(0, 3) == 2 / 8
    assert mcnemar_p(0, 0) == mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(12, 2) == pytest.approx(2 * sum(math.comb(14, k) for k in range(12, 15)) / 2**14)


def test_paired_mean_diff_on_fractional_outcomes():
    a = [1.0, 0.9, 0.5, 0.0, 1.0, 0.7]
    b = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 6
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / 5 / 6)
    got, lo, hi, p = paired_mean_diff(a, b)
    assert got == pytest.approx(mean) and hi - got == pytest.approx(1.959963984540054 * se)
    assert got - lo == pytest.approx(hi - got) and p == pytest.approx(2 * normal_sf(abs(mean) / se))
    # a clear, consistent gain is significant; swapping the runs flips the sign, not the p-value
    a2, b2 = [0.8 + 0.01 * (i % 5) for i in range(200)], [0.6] * 100 + [0.7] * 100
    gain = paired_mean_diff(a2, b2)
    assert gain[0] > 0 and gain[1] > 0 and gain[3] < 1e-6
    loss = paired_mean_diff(b2, a2)
    assert loss[0] == pytest.approx(-gain[0]) and loss[3] == pytest.approx(gain[3])
    assert paired_mean_diff([0.5] * 4, [0.5] * 4) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="different lengths"):
        paired_mean_diff([1.0], [1.0, 0.0])


def test_holm_adjusts_step_down_monotone_and_capped():
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 2 x 0.5 = 1, capped
    assert holm([0.02]) == [0.02] and holm([]) == []
    with pytest.raises(ValueError, match="not in"):
        holm([0.1, float("nan")])


def test_mcnemar_power_is_the_binomial_tail_above_the_smallest_flagging_count():
    """One-sided exact McNemar at 0.05 flags b discordant pairs all one way from b = 5 (0.5**5 = 0.031, 0.5**4 =
    0.0625): the power is P(Binomial(m, rate) >= 5)."""
    assert paired_drop_p(5, 0) <= 0.05 < paired_drop_p(4, 0)
    tail = 1 - sum(math.comb(200, k) * 0.05**k * 0.95 ** (200 - k) for k in range(5))
    assert mcnemar_power(200) == pytest.approx(tail) and round(mcnemar_power(200), 2) == 0.97
    assert mcnemar_power(4) == 0.0 and mcnemar_power(0) == 0.0
    assert mcnemar_power(5) == pytest.approx(0.05**5)
    assert mcnemar_power(100) < mcnemar_power(134) < mcnemar_power(200) and mcnemar_power(134) >= 0.8
    assert mcnemar_power(200, rate=1.0) == 1.0

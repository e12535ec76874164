"""Graded tests of the assignment stats (eval.py: wilson_interval, mcnemar), against values worked out by hand.

Wilson (1927): centre (p + z^2/2n) / (1 + z^2/n), half width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n). McNemar (1947),
exact and two-sided: 2 P(Binomial(b + c, 1/2) <= min(b, c)), at most 1.
"""

import pytest

import eval as E


def test_wilson_hand_values():
    for (k, n), interval in {(8, 10): (0.4902, 0.9433), (3, 5): (0.2307, 0.8824), (50, 100): (0.4038, 0.5962),
                             (1, 20): (0.0089, 0.2361)}.items():
        assert E.wilson_interval(k, n) == pytest.approx(interval, abs=1e-4), (k, n)


def test_wilson_at_the_edges_stays_inside_0_1():
    assert E.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert E.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert E.wilson_interval(0, 0) == (0.0, 1.0)  # nothing observed: anything goes


def test_wilson_with_another_z():
    assert E.wilson_interval(8, 10, z=1.0) == pytest.approx((0.6491, 0.8964), abs=1e-4)  # about 68%


def test_mcnemar_hand_values():
    assert E.mcnemar(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    assert E.mcnemar(5, 0) == pytest.approx(2 / 32)
    assert E.mcnemar(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # 0.625


def test_mcnemar_is_two_sided_and_symmetric():
    assert E.mcnemar(2, 10) == E.mcnemar(10, 2) and E.mcnemar(0, 5) == E.mcnemar(5, 0)


def test_mcnemar_is_at_most_1():
    assert E.mcnemar(7, 7) == E.mcnemar(1, 1) == E.mcnemar(0, 0) == 1.0
    assert E.mcnemar(4, 5) == 1.0


def test_mcnemar_on_a_thousand_discordant_questions():
    assert E.mcnemar(600, 400) == pytest.approx(2.7284641560e-10, rel=1e-9)  # scipy's binomtest, no overflow

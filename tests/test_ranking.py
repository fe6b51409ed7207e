"""jisac.ranking: the class score (bounds, order, monotonicity, hand-computed values) and a run's class table."""

import numpy as np
import pandas as pd
import pytest

from jisac import ranking
from tests import fake_run


def test_good_class_scores_above_bad_class():
    s = ranking.class_scores(stable_fraction=[0.95, 0.4], mean_pixel_error_px=[0.2, 1.8], members=[190, 70],
                             resolution_angst=[8.0, 25.0], pixel_size_angst=2.5, img_per_grp=200)
    assert s[0] > 0.8 and s[1] < 0.45 and s[0] > s[1]
    assert np.all((s >= 0) & (s <= 1))


def test_hand_computed_value():
    # stable 0.5; alignment exp(-(pi 0.7 / 4)^2); resolution 2 * 2 / 8 = 0.5; size 100 / (100 + 100) = 0.5
    a = np.exp(-(np.pi * 0.7 * 0.25) ** 2)
    expected = (0.4 * 0.5 + 0.3 * a + 0.2 * 0.5 + 0.1 * 0.5) / 1.0
    got = ranking.class_scores([0.5], [0.7], [100], [8.0], 2.0, img_per_grp=200)
    np.testing.assert_allclose(got, [expected], rtol=1e-12)
    # unknown resolution: the other three, renormalised
    got = ranking.class_scores([0.5], [0.7], [100], [np.nan], 2.0, img_per_grp=200)
    np.testing.assert_allclose(got, [(0.4 * 0.5 + 0.3 * a + 0.1 * 0.5) / 0.8], rtol=1e-12)
    assert ranking.class_scores([0.5], [0.7], [100])[0] == pytest.approx((0.4 * 0.5 + 0.3 * a + 0.1 * 0.5) / 0.8)


@pytest.mark.parametrize("which, values, increasing", [
    ("stable_fraction", np.linspace(0, 1, 11), True),
    ("mean_pixel_error_px", np.linspace(0, 3, 11), False),
    ("members", np.array([10, 30, 60, 100, 200, 400, 1000]), True),
    ("resolution_angst", np.array([5.0, 6, 8, 10, 15, 20, 40]), False),  # 5 Å = Nyquist at 2.5 Å/px
])
def test_score_is_strictly_monotone_in_each_input(which, values, increasing):
    base = {"stable_fraction": 0.7, "mean_pixel_error_px": 0.5, "members": 120, "resolution_angst": 12.0}
    k = len(values)
    args = {name: np.full(k, v, np.float64) for name, v in base.items()}
    args[which] = values.astype(np.float64)
    s = ranking.class_scores(pixel_size_angst=2.5, img_per_grp=200, **args)
    diffs = np.diff(s)
    assert np.all(diffs > 0) if increasing else np.all(diffs < 0), (which, s)
    assert np.all((s >= 0) & (s <= 1))


def test_extremes_are_bounded():
    s = ranking.class_scores([1.0, 0.0], [0.0, 50.0], [1e9, 0], [1.0, 1e6], 2.5)
    assert s[0] == pytest.approx(1.0, abs=1e-5) and s[1] == pytest.approx(0.0, abs=1e-5)


def test_with_scores_writes_jisacScore_column():
    table = pd.DataFrame({"rlnClassNumber": [1, 2, 3], "jisacMembers": [10, 20, 30]})
    out = ranking.with_scores(table, [0.12345, 0.5, 1.0])
    assert list(out["jisacScore"]) == [0.123, 0.5, 1.0]
    assert "jisacScore" not in table.columns  # a copy
    with pytest.raises(ValueError, match="one score per class"):
        ranking.with_scores(table, [0.1])


def test_class_table_of_a_run_folder(tmp_path):
    fake_run.make_run(tmp_path, resolution=True)
    t = ranking.class_table(tmp_path)
    assert list(t["class"]) == [1, 2, 3, 4]
    assert list(t["members"]) == [fake_run.CLASSES[k][0] for k in range(1, 5)]
    np.testing.assert_allclose(t["stable_fraction"], [fake_run.STABLE[k] for k in range(1, 5)], rtol=1e-12)
    np.testing.assert_allclose(t["mean_pixel_error"], [fake_run.CLASSES[k][2] for k in range(1, 5)], atol=1e-9)
    np.testing.assert_allclose(t["resolution_angst"], [fake_run.RESOLUTION[k] for k in range(1, 5)])
    expected = ranking.class_scores(t["stable_fraction"], t["mean_pixel_error"], t["members"],
                                    t["resolution_angst"], fake_run.WORKING_PIXEL, img_per_grp=30)
    np.testing.assert_allclose(t["score"], expected)
    # class 4 is the worst in every term; class 3 is worse than class 1 in every term
    assert t["score"].idxmin() == 3 and t["score"][2] < t["score"][0]


def test_class_table_without_particles_star_uses_particle_classes_txt(tmp_path):
    fake_run.make_run(tmp_path, particles_star=False)
    t = ranking.class_table(tmp_path)
    np.testing.assert_allclose(t["mean_pixel_error"], [fake_run.CLASSES[k][2] for k in range(1, 5)], atol=1e-4)
    assert t["resolution_angst"].isna().all()


def test_class_table_of_a_run_in_progress_is_empty(tmp_path):
    fake_run.make_run(tmp_path, finished=False)
    assert ranking.class_table(tmp_path).empty


def test_stable_fraction_without_generation_folders_uses_img_per_grp(tmp_path):
    import shutil

    fake_run.make_run(tmp_path)
    shutil.rmtree(tmp_path / "main001")
    t = ranking.class_table(tmp_path)
    np.testing.assert_allclose(t["stable_fraction"], np.minimum([m / 30 for m, _, _ in fake_run.CLASSES.values()], 1))

"""The division's GaussianMixture settings follow the noise rate and dataset as RDE's authors
choose them (high above 40 % noise or on RSTPReid), unless named or set by hand."""
import numpy as np
import pytest

from tbps.trainer.common.config import WeightingConfig
from tbps.trainer.recipe import consensus_division
from tbps.trainer.recipe.consensus_division import ConsensusWeighting, gmm_settings

LOW, HIGH = (10, 1e-2, 5e-4), (100, 1e-4, 1e-6)


@pytest.mark.parametrize("rate, dataset, want", [
    (0.0, "cuhk-pedes", LOW), (0.2, "icfg-pedes", LOW), (0.4, "cuhk-pedes", LOW),
    (0.5, "cuhk-pedes", HIGH), (0.8, "icfg-pedes", HIGH), (0.0, "rstpreid", HIGH)])
def test_auto_follows_the_authors_rule(rate, dataset, want):
    values, why = gmm_settings(WeightingConfig(kind="consensus"), rate, dataset)
    assert values == want and ("high" if want == HIGH else "low") in why


def test_a_named_setting_and_hand_values_win():
    assert gmm_settings(WeightingConfig(gmm="low"), 0.8, "rstpreid")[0] == LOW
    values, why = gmm_settings(WeightingConfig(gmm="high", gmm_max_iter=7), 0.0, "")
    assert values == (7, 1e-4, 1e-6) and "overridden by hand" in why
    with pytest.raises(ValueError, match="recipe.weighting.gmm"):
        WeightingConfig(gmm="medium")


def test_the_division_runs_with_the_chosen_settings(monkeypatch):
    seen = {}

    def fake_divide(branches, **kwargs):
        seen.update(kwargs)
        return consensus_division.Division(labels=np.ones(4))

    monkeypatch.setattr(consensus_division, "divide", fake_divide)
    cw = ConsensusWeighting(WeightingConfig(kind="consensus", plots=False), seed=0,
                            noise_rate=0.5, dataset="cuhk-pedes")
    cw.divide({"index": np.arange(4), "tal": np.zeros(4)}, epoch=1)
    assert (seen["max_iter"], seen["tol"], seen["reg_covar"]) == HIGH

"""bench/e2e_vs_trl.py's bookkeeping: the phase splits of both sides and the model length it fits, on
hand-written numbers."""
from __future__ import annotations

import pytest

from bench import e2e_trl_side, e2e_vs_trl


def test_trl_phases_split_the_step():
    # two steps: 10 s = 4 generate + 1 reward + 5 learner (1 ref + 2 loss forward + 2 rest);
    #            8 s = 3 generate + 1 reward + 4 learner (1 ref + 1 loss forward + 2 rest)
    p = e2e_trl_side.trl_phases([10.0, 8.0], [4.0, 3.0], [1.0, 1.0], [1.0, 1.0], [2.0, 1.0])
    assert p == pytest.approx({"generate": 3.5, "reward": 1.0, "learner": 4.5, "ref_forward": 1.0,
                               "loss_forward": 1.5, "backward_optimizer": 2.0})


def test_trl_phases_refuse_misaligned_steps():
    with pytest.raises(ValueError, match="generate 1"):
        e2e_trl_side.trl_phases([10.0, 8.0], [4.0], [1.0, 1.0], [1.0, 1.0], [2.0, 1.0])


def test_ours_phases_other_is_the_rest_of_the_step():
    rows = [{"time/step": 6.0, "time/rollout": 2.0, "time/forward": 1.0, "time/reward": 0.5, "time/update": 1.5,
             "time/push": 0.5},
            {"time/step": 4.0, "time/rollout": 1.0, "time/forward": 1.0, "time/reward": 0.5, "time/update": 1.0,
             "time/push": 0.5}]
    p = e2e_vs_trl.ours_phases(rows)
    assert p == pytest.approx({"rollout": 1.5, "forward": 1.0, "reward": 0.5, "update": 1.25, "push": 0.5,
                               "other": 0.25})


@pytest.mark.parametrize("model_len, prompt, new, want", [
    (1024, 113, 64, 1024),    # the tiny setting fits the preset's length
    (1024, 960, 64, 1024),    # exactly full
    (1024, 1410, 64, 1536),   # 1296 vision tokens + text: raised to the next multiple of 256
    (1024, 1473, 64, 1792),
])
def test_fitted_model_len(model_len, prompt, new, want):
    assert e2e_vs_trl.fitted_model_len(model_len, prompt, new) == want

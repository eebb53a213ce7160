"""The run's one-line summary against what the run then does: its passes per step and its search's forwards."""

import logging
import re

import pytest

from helpers import TinyClassifier, as_dataset, make_data, training_args
from hf_xsam import XSAMTrainer
from hf_xsam.summary import describe_run


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"sam_start_ratio": 0.5, "sam_interval": 2, "alpha_search": "coarse_to_fine"},
        {"sam_method": "sam", "sam_interval": 3, "ascent_steps": 2},
        {"sam_interval": 2, "sam_reuse": True, "extrapolate_after_drop": 0.0, "alpha_max": 1.0},
    ],
)
def test_summary_says_what_the_run_costs(tmp_path, caplog, settings):
    args = training_args(tmp_path, max_steps=10, per_device_train_batch_size=4, learning_rate=0.05, **settings)
    trainer = XSAMTrainer(model=TinyClassifier(), args=args, train_dataset=as_dataset(make_data(16)))
    with caplog.at_level(logging.INFO, logger="hf_xsam.trainer"):
        trainer.train()
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("hf_xsam: ")]
    assert len(lines) == 1
    logs = [log for log in trainer.state.log_history if "xsam/passes" in log]
    passes = sum(log["xsam/passes"] for log in logs) / len(logs)  # one log per step
    assert f"{passes:.3g} forward-backward passes per step on average" in lines[0]
    engine = trainer.xsam
    if engine.search_count:
        per_search = engine.search_forwards / engine.search_count
        said = int(re.search(r"(\d+) forward passes of one micro-batch", lines[0])[1])
        if args.alpha_search == "grid":
            assert said == per_search
        else:  # an upper bound
            assert per_search <= said < 22
        assert f"about {engine.search_count} searches" in lines[0]
    else:
        assert "searched" not in lines[0]


def test_summary_of_a_plain_run():
    from hf_xsam import XSAMConfig

    assert describe_run(XSAMConfig(sam_method="none")).startswith("plain training")

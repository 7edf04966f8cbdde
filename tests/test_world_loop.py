"""The world's small training loop (uniportrait.world.loop): what it logs."""

import json

import torch

from uniportrait.world.loop import run_loop


def test_each_logged_metric_is_the_mean_over_the_steps_that_reported_it(tmp_path):
    # as the base UNet's loop: portrait steps report "loss1", every third step a group's "lossg"
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(i: int) -> dict[str, float]:
        model(torch.ones(1, 2)).sum().backward()
        return {"lossg": 3.0 + i} if i % 3 == 2 else {"loss1": 1.0}

    run_loop(tmp_path / "run", {"model": model}, opt, step, steps=10, lr=0.0, desc="test", log_every=5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    # steps 0-4: groups at 2 (5.0); steps 5-9: groups at 5 and 8 (8.0, 11.0)
    assert rows[0]["loss1"] == 1.0 and rows[0]["lossg"] == 5.0
    assert rows[1]["loss1"] == 1.0 and rows[1]["lossg"] == 9.5

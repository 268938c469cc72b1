"""``valve-id train`` passes its overrides into the run it enqueues, for real: the command
runs in a subprocess against the tests' own Redis, and the plan job's recipe is read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from redis import Redis
from rq.job import Job

from training.fitting.config import resolve_recipe

VALVE_ID = Path(sys.executable).with_name("valve-id")


def test_train_enqueues_the_reader_settings_and_test_views_it_was_given(
    tmp_path: Path, redis_url: str
) -> None:
    """A project with a few hundred X-rays per valve model reads better with more reader
    epochs (docs/TRAINING.md, "The pressure setting"): ``--reader-epochs`` is how it asks."""
    own_db = redis_url.rsplit("/", 1)[0] + "/7"  # other tests' workers never see this run
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    result = subprocess.run(
        [
            str(VALVE_ID),
            "train",
            "--data",
            str(tmp_path),
            "--enqueue",
            "--reader-epochs",
            "40",
            "--test-views",
            "8",
            "--reader-square",
            "--reader-principal-axis",
        ],
        env={**base, "VALVE_ID_STATE_DIR": str(tmp_path / "state"), "REDIS_URL": own_db},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    plan_id = json.loads(result.stdout.strip().splitlines()[-1])["jobs"][0]
    redis = Redis.from_url(own_db)
    plan = Job.fetch(plan_id, connection=redis)
    request = plan.args[4]
    redis.flushdb()
    assert request["overrides"] == {
        "reader_epochs": 40,
        "test_views": 8,
        "reader_native": False,
        "reader_template": False,
    }
    recipe = resolve_recipe(request)
    assert recipe.reader_epochs == 40 and recipe.test_views == 8 and not recipe.reader_native
    assert not recipe.reader_template
    assert recipe.reader_lr_max == 3e-3

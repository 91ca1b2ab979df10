"""benchmarks/main_job_candidates.py: the candidate spec sets the config fields it names, and a
malformed spec stops with a message naming it (no compilation here: that is the benchmark's)."""

import pytest

from benchmarks import main_job_candidates


def test_candidate_config_sets_size_fields():
  config = main_job_candidates.candidate_config("0.5,96,48,6,2")
  assert (config.model.width, config.data.height, config.data.width) == (0.5, 96, 48)
  assert (config.data.num_ids_per_batch, config.data.num_tracklets_per_id) == (6, 2)
  assert config.model.name == "stmn" and config.data.seq_len == 4  # the rest: the main job's


@pytest.mark.parametrize("spec", ["0.5,64,32", "wide,64,32,8,4"])
def test_candidate_config_rejects_malformed_spec(spec):
  with pytest.raises(SystemExit, match=spec):
    main_job_candidates.candidate_config(spec)

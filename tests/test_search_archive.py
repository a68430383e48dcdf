"""jaxnas.search.archive: the run's bookkeeping round-trips through its checkpoint dict; a checkpoint of an older
run (fewer keys) resumes with defaults, one of an unknown newer layout is refused by name."""

import json

import pytest

from interop.jsonsafe import from_json_safe, json_safe
from jaxnas.search.archive import Archive
from jaxnas.status import Status


def test_an_archive_round_trips_through_the_checkpoints_json():
    archive = Archive(config={"seed": 0}, generation=2, evaluations=7, cache_hits=1, reference=[0.0, 1e6],
                      candidates=[{"arch": "a", "status": Status.OK, "fitness": float("-inf")}], stopped="stalled: 3")
    stored = json.loads(json.dumps(json_safe(archive.to_dict())))
    again = Archive.from_dict(from_json_safe(stored))
    assert again == archive
    assert again.candidates[0]["fitness"] == float("-inf") and again.candidates[0]["status"] == "ok"


def test_an_older_checkpoint_without_the_newer_keys_takes_their_defaults():
    old = {"generation": 3, "candidates": [], "generations": [], "evaluations": 12, "cache_hits": 0,
           "infeasible": 0, "reference": None, "seconds": 1.5}
    archive = Archive.from_dict(old)
    assert (archive.evaluations, archive.filtered, archive.stopped, archive.stalled) == (12, 0, None, 0)
    assert archive.config == {}  # the loop then takes the current config as the fingerprint


def test_a_checkpoint_with_unknown_keys_is_refused_naming_them():
    with pytest.raises(ValueError, match="does not know \\(future_key\\)"):
        Archive.from_dict({"config": {}, "future_key": 1})

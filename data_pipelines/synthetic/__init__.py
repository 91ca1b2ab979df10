"""The synthetic video re-ID benchmark: people tracklets with spatial and temporal distractors.

Written in the MARS layout (default) or the DukeV layout, so that the real readers load it; a
JSON sidecar records which distractor touched which frame. Deterministic for `seed`.

  from data_pipelines import synthetic
  summary = synthetic.generate("/tmp/syn", num_train_ids=10, occlusion_prob=0.0)
  root = synthetic.ensure_generated("data/synthetic", {"layout": "mars"})

CLI: `python -m data_pipelines.synthetic --out=DIR [--layout=mars|dukev] [--knob=value ...]`.

Files next to the layout: `spec.json` (generator version, all knobs, summary counts; written
last, so its presence marks a complete dataset) and `synthetic_meta.json`, the ground truth:
`identities` (pid -> attributes, and which earlier pid it is a near copy of) and `tracklets`,
one entry per tracklet with `pid`, `camid` (0-based), `camera` (1-based), `split`, `query`,
`kind` (person / distractor / junk), `frames` (paths relative to the root), `view`,
`other_pid`, `distractors` (names applied) and per-frame 0/1 lists `occluded`, `misaligned`,
`out_of_frame`, `other_person`. `meta_for(root, tracklets)` maps reader tracklets to entries.

Only the knob definitions (`spec`, standard library) are imported eagerly, so that configs can
read the defaults cheaply; the generator (NumPy, PIL) loads on first use.
"""

from __future__ import annotations

from data_pipelines.synthetic.spec import (  # noqa: F401
    GENERATOR_VERSION, LAYOUTS, SyntheticSpec, defaults, knob_names, make_spec)

_LAZY = ("generate", "ensure_generated", "load_meta", "meta_by_first_frame", "meta_for",
         "read_spec",
         "render_tracklet", "make_plan", "make_scene", "make_events", "make_identities",
         "FLAGS", "META_FILE", "SPEC_FILE")


def __getattr__(name: str):
  if name in _LAZY:
    from data_pipelines.synthetic import generator  # pylint: disable=g-import-not-at-top

    return getattr(generator, name)
  raise AttributeError(f"module 'data_pipelines.synthetic' has no attribute {name!r}")


__all__ = ["GENERATOR_VERSION", "LAYOUTS", "SyntheticSpec", "defaults", "knob_names",
           "make_spec", *_LAZY]

"""Two-stage RoI inference: RoI post-processing, crops, stage-2 prefix reuse, evaluation and scoring."""

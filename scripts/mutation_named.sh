#!/usr/bin/env bash
# The seven mutants issue 20 names, each applied by hand to a copy of the working tree, and the test that must kill
# it: prints "killed by <test>" or "SURVIVED". Not part of CI (about a minute); README, Development.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD PY=${PY:-$PWD/.venv/bin/python}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
status=0
mutant() {  # name file old new tests...
  local name=$1 file=$2 old=$3 new=$4; shift 4
  local d=$WORK/$name; mkdir -p "$d"
  git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$d"
  "$PY" - "$d/$file" "$old" "$new" <<'PYEOF' || { echo "$name: the code changed, update this mutant"; exit 1; }
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
assert text.count(old) == 1, f"{path}: {old!r} found {text.count(old)} times"
open(path, "w").write(text.replace(old, new))
PYEOF
  local failed
  failed=$(cd "$d" && PYTHONPATH="$d" "$PY" -m pytest -q -x -p no:cacheprovider -rf "$@" 2>&1 | grep -m1 -E "^(FAILED|ERROR) " | cut -d' ' -f2)
  if [ -n "$failed" ]; then echo "$name: killed by $failed"; else echo "$name: SURVIVED"; status=1; fi
}
mutant swap_dump_flags pipeline/teacher/dump.py \
  "params.include_eos, params.include_last_prompt" "params.include_last_prompt, params.include_eos" \
  tests/test_dump_row_flags.py
mutant drop_grad_accumulation_normaliser pipeline/student/train.py \
  "(s * (mb.weight * info.world / norm)).backward()" "(s / max(float(mb.labels.ne(-1).sum()), 1.0)).backward()" \
  tests/test_train_step_math.py
mutant default_smooth_sigma pipeline/inference/roi.py \
  "smooth_sigma: float = 1.0" "smooth_sigma: float = 2.0" tests/test_roi_defaults.py
mutant no_annotator_answers pipeline/inference/evaluate.py \
  'man.get("answer"), man.get("answers"), params.scoring' 'man.get("answer"), None, params.scoring' \
  tests/test_evaluate_soft_accuracy.py
mutant no_validation_on_full_read pipeline/io/contracts.py \
  $'    if columns is None:\n        validate_table(table, schema, str(path))' $'    if columns is None:\n        pass' \
  tests/test_contracts_full_read.py
mutant duplicate_dropped_silently pipeline/io/manifest.py \
  $'            skip(rec, "duplicate sample_id" + (f" (first at {first})" if first else ""))\n            continue' \
  '            continue' tests/test_manifest_duplicates.py
mutant holdout_fg_accuracy_sign pipeline/student/train.py \
  "(fg & (logits > 0)).sum().double()" "(fg & (logits <= 0)).sum().double()" tests/test_train_step_math.py
exit $status

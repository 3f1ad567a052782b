#!/usr/bin/env bash
# CI: bring the cluster up, run the `slurm` tests against it, tear it down; fail if any test
# failed, was skipped or none ran. Usage: .ci/slurm-test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'scripts/slurm_cluster.sh down || true' EXIT
eval "$(.ci/slurm-up.sh)"          # exports SLURM_CONF
report=$(mktemp --suffix=.xml)
status=0
TDA_BENCH_REQUIRE_SLURM=1 python -m pytest -m slurm tests/bench/test_slurm.py -v -rA -s \
    -p no:cacheprovider --junitxml="$report" "$@" || status=$?
python - "$report" <<'PY' || status=1
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
print(f"slurm tests: {tests} run, {failed} failed, {skipped} skipped")
if tests == 0 or skipped or failed:
    sys.exit("slurm tests did not all run and pass against the live scheduler")
PY
rm -f "$report"
exit $status

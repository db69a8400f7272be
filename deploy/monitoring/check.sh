#!/usr/bin/env bash
# Checks the shipped monitoring files with Debian's promtool (package prometheus):
#   - the alerting and recording rules parse (`promtool check rules`);
#   - their unit tests pass (`promtool test rules`: each alert fires, and only when it should);
#   - every query of the Grafana dashboard is valid PromQL (checked as recording rules, with
#     Grafana's $__rate_interval replaced by 5m).
# That each name they query is one the daemons export is checked by the crates' own tests
# (`cargo test -p rebalancer-controller metrics`, `cargo test -p rebalancer-agent prom`).
# Usage: deploy/monitoring/check.sh   (needs no root; writes only a temporary directory)
set -euo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
promtool=${PROMTOOL:-$(command -v promtool || true)}
[ -n "$promtool" ] || { echo "monitoring check: promtool not found (Debian package prometheus; scripts/setup.sh installs it)" >&2; exit 1; }

"$promtool" check rules "$dir/rebalancer-rules.yml"
(cd "$dir" && "$promtool" test rules rebalancer-rules.test.yml)

tmp=$(mktemp -d /tmp/rebalancer-monitoring.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 - "$dir/grafana-dashboard.json" "$tmp/dashboard-queries.yml" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
exprs = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
if not exprs:
    sys.exit("monitoring check: the dashboard has no queries")
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, e) in enumerate(exprs):
        out.write("      - record: dashboard:q%d\n        expr: %s\n" % (i, json.dumps(e.replace("$__rate_interval", "5m"))))
print("dashboard: %d queries in %d panels" % (len(exprs), len(d["panels"])))
PY
"$promtool" check rules "$tmp/dashboard-queries.yml"
echo "monitoring check: ok"

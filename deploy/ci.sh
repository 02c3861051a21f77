#!/usr/bin/env bash
# Offline checks of blockd's deployment: Kubernetes manifests, alert rules, Grafana dashboard and
# Dockerfile. Nothing here needs a cluster, a Prometheus server or a Docker engine.
#
#   deploy/ci.sh                 install what is missing (apt, npm ci), then run every check
#   deploy/ci.sh --no-install    run the checks; fail if a tool or deploy/tools/node_modules is missing
#   deploy/ci.sh --install-only  install what is missing and stop
#   deploy/ci.sh --self-test     then plant one error per check in a copy of the tree (a misspelt
#                                field, a short grace period, a PromQL typo, a shell-form ENTRYPOINT...)
#                                and require the check to catch it; --self-test-only skips the first run
#
# Checks:
#   k8s          kubectl kustomize renders base and overlays/gpu, cpu, replica-group; every object is
#                validated against the Kubernetes / Prometheus-operator schemas with unknown fields
#                rejected, then against blockd's policy (deploy/tools/validate.mjs, policy.mjs)
#   yamllint     yamllint --strict on deploy/ (deploy/.yamllint.yaml)
#   rules-sync   base/prometheusrule.yaml is prometheus/blockd-rules.yaml (tools/sync-rules.mjs)
#   rules-check  promtool check rules on the rule file and on the rendered PrometheusRule's spec
#   rules-test   promtool test rules (prometheus/blockd-rules.test.yaml)
#   dashboard    grafana/blockd.json: structure, metric names blockd exports, PromQL parses
#   dockerfile   dockerfile-utils lint + image policy (tools/lint-dockerfile.mjs), the daemon's and the trainer's
#   scripts      bash -n and shellcheck of smoke.sh and this file, Python syntax of smoke.py
#
# Needs: kubectl (kustomize v4+), yamllint, promtool (Debian: prometheus), shellcheck, node + npm,
# python3 with python3-yaml.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TOOLS=$HERE/tools
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || PYTHON=python3

install=1
run=1
selftest=0
for arg in "$@"; do
  case $arg in
    --no-install) install=0 ;;
    --install-only) run=0 ;;
    --self-test) selftest=1 ;;
    --self-test-only) selftest=1; run=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "ci.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[[ $install == 1 && $run == 0 && $selftest == 0 ]] && install_only=1 || install_only=0

# --- tools -----------------------------------------------------------------------------------------
ensure_tools() {
  local -a apt=()
  command -v yamllint >/dev/null || apt+=(yamllint)
  command -v promtool >/dev/null || apt+=(prometheus)
  command -v shellcheck >/dev/null || apt+=(shellcheck)
  "$PYTHON" -c 'import yaml' 2>/dev/null || apt+=(python3-yaml)
  command -v node >/dev/null || apt+=(nodejs)
  command -v npm >/dev/null || apt+=(npm)
  command -v kubectl >/dev/null || apt+=(kubernetes-client)
  if ((${#apt[@]})); then
    if [[ $install == 0 ]]; then
      echo "ci.sh: missing tools; install the Debian packages: ${apt[*]}" >&2
      return 1
    fi
    echo "ci.sh: apt-get install ${apt[*]}"
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${apt[@]}" >/dev/null
  fi
  local kustomize
  kustomize=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\{0,1\}\([0-9]*\).*/\1/p')
  if [[ -z $kustomize || $kustomize -lt 4 ]]; then
    echo "ci.sh: kubectl's kustomize is v${kustomize:-?}; these manifests need v4 or later (kubectl >= 1.21)" >&2
    return 1
  fi
  # npm ci only when node_modules is missing or older than the lock file.
  local stamp=$TOOLS/node_modules/.package-lock.json
  if [[ ! -f $stamp || $TOOLS/package-lock.json -nt $stamp ]]; then
    if [[ $install == 0 ]]; then
      echo "ci.sh: $TOOLS/node_modules is missing or stale; run: (cd deploy/tools && npm ci)" >&2
      return 1
    fi
    echo "ci.sh: npm ci in deploy/tools"
    (cd "$TOOLS" && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

# --- checks: each takes ROOT (a tree with deploy/, Dockerfile, examples/Dockerfile.trainer, CMakeLists.txt, server/metrics.cc)
# and OUT (a scratch folder), prints what it found and returns non-zero on a problem. -------------
check_k8s() {
  local root=$1 out=$2 variant dir
  for variant in base gpu cpu replica-group; do
    dir=$root/deploy/overlays/$variant
    [[ $variant == base ]] && dir=$root/deploy/base
    kubectl kustomize "$dir" >"$out/$variant.yaml" || { echo "kubectl kustomize $dir failed"; return 1; }
    node "$TOOLS/validate.mjs" --variant="$variant" "$out/$variant.yaml" || return 1
  done
  echo "k8s: base and overlays/gpu, cpu and replica-group render; every object matches its schema and the policy"
}

check_yamllint() {
  local root=$1
  (cd "$root/deploy" && yamllint --strict -c .yamllint.yaml .) && echo "yamllint: deploy/ clean"
}

check_rules_sync() {
  BLOCKD_DEPLOY_DIR=$1/deploy node "$TOOLS/sync-rules.mjs" --check
}

check_rules_check() {
  local root=$1 out=$2
  promtool check rules "$root/deploy/prometheus/blockd-rules.yaml" || return 1
  # The PrometheusRule as the overlay renders it: its spec is a rule file.
  kubectl kustomize "$root/deploy/overlays/gpu" >"$out/rendered.yaml" || return 1
  "$PYTHON" - "$out/rendered.yaml" "$out/prometheusrule-spec.yaml" <<'EOF' || return 1
import sys, yaml
rules = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "PrometheusRule"]
if len(rules) != 1:
    sys.exit(f"expected one PrometheusRule in the rendering, found {len(rules)}")
yaml.safe_dump(rules[0]["spec"], open(sys.argv[2], "w"), sort_keys=False)
EOF
  promtool check rules "$out/prometheusrule-spec.yaml"
}

check_rules_test() {
  (cd "$1/deploy/prometheus" && promtool test rules blockd-rules.test.yaml)
}

check_dashboard() {
  BLOCKD_DEPLOY_DIR=$1/deploy node "$TOOLS/check-promql.mjs" --promtool="$(command -v promtool)"
}

check_dockerfile() {
  node "$TOOLS/lint-dockerfile.mjs" "$1/Dockerfile" --cmake="$1/CMakeLists.txt" || return 1
  node "$TOOLS/lint-dockerfile.mjs" "$1/examples/Dockerfile.trainer" --image=trainer
}

check_scripts() {
  local root=$1 f
  for f in "$root/deploy/smoke.sh" "$root/deploy/ci.sh"; do bash -n "$f" || return 1; done
  shellcheck "$root/deploy/smoke.sh" "$root/deploy/ci.sh" || return 1
  "$PYTHON" -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' "$root/deploy/smoke.py" || return 1
  echo "scripts: smoke.sh and ci.sh pass bash -n and shellcheck; smoke.py parses"
}

CHECKS=(k8s yamllint rules-sync rules-check rules-test dashboard dockerfile scripts)

run_check() {  # NAME ROOT OUT LOG -> status
  local name=$1 root=$2 out=$3 log=$4
  "check_${name//-/_}" "$root" "$out" >"$log" 2>&1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blockd-deploy-ci.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

ensure_tools
[[ $install_only == 1 ]] && { echo "ci.sh: tools ready"; exit 0; }

passed=0
failed=0
if [[ $run == 1 ]]; then
  echo "== deploy checks (deploy/ci.sh)"
  for name in "${CHECKS[@]}"; do
    start=$(date +%s%N)
    if run_check "$name" "$REPO" "$WORK" "$WORK/$name.log"; then
      ms=$((($(date +%s%N) - start) / 1000000))
      printf 'ok    %-12s %3d.%ds  %s\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) \
        "$(grep -v '^[[:space:]]*$' "$WORK/$name.log" | tail -n 1 | sed 's/^[[:space:]]*//')"
      passed=$((passed + 1))
    else
      printf 'FAIL  %-12s\n' "$name"
      sed 's/^/      /' "$WORK/$name.log"
      failed=$((failed + 1))
    fi
  done
fi

# --- self-test: each planted error must be caught by the check named with it ------------------------
# CHECK | FILE (under the tree) | perl substitution (applied with -0pi, must change the file) | what
# shellcheck disable=SC2016  # the $ in these are perl's
PLANTED=(
  'k8s|deploy/base/statefulset.yaml|s/readOnlyRootFilesystem: true/readOnlyRootFilesystm: true/|misspelt securityContext field'
  'k8s|deploy/base/statefulset.yaml|s/replicas: 2/replicas: two/|replicas is not an integer'
  'k8s|deploy/base/servicemonitor.yaml|s/scrapeTimeout:/scrapeTimeOut:/|misspelt ServiceMonitor (CRD) field'
  'k8s|deploy/base/poddisruptionbudget.yaml|s/AlwaysAllow/Always/|PDB enum value not allowed'
  'k8s|deploy/base/kustomization.yaml|s/- poddisruptionbudget.yaml/- pdb.yaml/|kustomization names a missing file'
  'k8s|deploy/base/statefulset.yaml|s/terminationGracePeriodSeconds: 60/terminationGracePeriodSeconds: 40/|grace period shorter than preStop + drain + shutdown'
  'k8s|deploy/base/blockd.flags|s/--drain_grace=10s/--drain_grace=1m/|drain_grace too long for the grace period'
  'k8s|deploy/base/blockd.flags|s/--restore_on_start=true/--restore_on_start=false/|blocks not restored after a restart'
  'k8s|deploy/base/service-headless.yaml|s/  clusterIP: None\n//|serviceName Service is not headless'
  'k8s|deploy/base/servicemonitor.yaml|s/- port: metrics/- port: metric/|ServiceMonitor names a port the Service lacks'
  'k8s|deploy/base/statefulset.yaml|s/allowPrivilegeEscalation: false/allowPrivilegeEscalation: true/|privilege escalation allowed'
  'k8s|deploy/base/statefulset.yaml|s/(readinessProbe:\n\s+grpc:\n\s+port:) 50051/$1 8080/|readiness probe on the wrong port'
  'k8s|deploy/overlays/gpu/statefulset-gpu.yaml|s/^\s+nvidia\.com\/gpu: 1\n//mg|gpu overlay without a GPU'
  'k8s|deploy/overlays/cpu/backend.flags|s/--backend=cpu/--backend=cuda/|cpu overlay on the CUDA backend'
  'k8s|deploy/overlays/replica-group/kustomization.yaml|s/\$\(POD_NAME\)/blockd-0/|every group member claiming to be blockd-0'
  'k8s|deploy/overlays/replica-group/trainer-job.yaml|s/,\\\n\s+blockd-2[^"]+//|trainer reaches two of the three members'
  'k8s|deploy/overlays/replica-group/trainer-job.yaml|s/component: trainer/component: server/g|trainer pods selected as daemons'
  'yamllint|deploy/base/service-metrics.yaml|s/name: blockd-metrics\n/name: blockd-metrics   \n/|trailing spaces'
  'yamllint|deploy/base/serviceaccount.yaml|s/^kind: ServiceAccount$/kind: ServiceAccount\nkind: ServiceAccount/m|duplicate key'
  'rules-sync|deploy/base/prometheusrule.yaml|s/for: 5m/for: 1m/|PrometheusRule edited by hand'
  'rules-check|deploy/prometheus/blockd-rules.yaml|s/expr: blockd_backend_healthy == 0/expr: blockd_backend_healthy ==/|PromQL syntax error'
  'rules-test|deploy/prometheus/blockd-rules.yaml|s/rate5m > 0.05/rate5m > 0.5/|error-rate threshold no longer fires'
  'dashboard|deploy/grafana/blockd.json|s/blockd_tokens_total\{/blockd_tokens_totl{/|dashboard metric blockd does not export'
  'dashboard|deploy/grafana/blockd.json|s/sum by \(method\) \(rate\(/sum by (method) (rate((/|dashboard PromQL syntax error'
  'dashboard|deploy/grafana/blockd.json|s/instance=~\\"\$instance\\"/pod=~\\"\$pod\\"/|dashboard variable not defined'
  'dockerfile|Dockerfile|s/^ENTRYPOINT \[.*\]$/ENTRYPOINT \/usr\/local\/bin\/blockd/m|shell-form ENTRYPOINT'
  'dockerfile|Dockerfile|s/^USER 10001:10001$/USER root/m|runs as root'
  'dockerfile|Dockerfile|s/      libgrpc\+\+-dev protobuf-compiler-grpc \\\n//|build stage lacks a find_package dependency'
  'dockerfile|Dockerfile|s/^EXPOSE 50051 9464$/EXPOSE 50051\/tcpx 9464/m|invalid EXPOSE protocol'
  'dockerfile|Dockerfile|s/^COPY server\/ server\/\n//m|build stage does not copy a CMake folder'
  'dockerfile|examples/Dockerfile.trainer|s/^USER 10001:10001$/USER 0/m|trainer image runs as root'
  'dockerfile|examples/Dockerfile.trainer|s/ python3-grpcio / /|trainer image without grpcio'
  'dockerfile|Dockerfile|s/^FROM nvidia\/cuda:13.0.2-cudnn-runtime-ubuntu24.04/FROM nvidia\/cuda:latest/m|unpinned runtime image'
  'scripts|deploy/smoke.sh|s/^exec "\$PYTHON"/exec "\$PYTHON" (/m|smoke.sh syntax error'
  'scripts|deploy/smoke.sh|s/exec "\$PYTHON" "\$\(dirname "\$0"\)\/smoke.py" "\$@"/exec \$PYTHON \$(dirname \$0)\/smoke.py \$@/|unquoted expansions (shellcheck)'
)

copy_tree() {  # a pristine copy of what the checks read
  local dst=$1
  mkdir -p "$dst/server"
  cp "$REPO/Dockerfile" "$REPO/CMakeLists.txt" "$dst/"
  mkdir -p "$dst/examples" && cp "$REPO/examples/Dockerfile.trainer" "$dst/examples/"
  cp "$REPO/server/metrics.cc" "$dst/server/"
  (cd "$REPO" && tar --exclude=deploy/tools/node_modules -cf - deploy) | (cd "$dst" && tar -xf -)
}

first_problem() {  # the first line of a failed check's log that says what is wrong
  grep -vE '^schema: [0-9]+ objects checked|^policy\([a-z]+\): ok$|^validate: [0-9]+ problem|^(Checking|Unit Testing:) |^[[:space:]]*(FAILED|SUCCESS)?:?[[:space:]]*$|^\./.*\.yaml$|^lint-dockerfile: .* ok \(' "$1" \
    | sed "s|$WORK/planted-[0-9]*/||g; s/^[[:space:]]*//" | head -n 1
}

caught=0
missed=0
if [[ $selftest == 1 ]]; then
  echo "== planted errors (deploy/ci.sh --self-test): each must fail its check"
  i=0
  for entry in "${PLANTED[@]}"; do
    IFS='|' read -r name file subst what <<<"$entry"
    i=$((i + 1))
    root=$WORK/planted-$i
    copy_tree "$root"
    cp "$root/$file" "$WORK/before"
    perl -0pi -e "$subst" "$root/$file"
    if cmp -s "$root/$file" "$WORK/before"; then
      printf 'STALE %-12s %s: the substitution no longer matches %s\n' "$name" "$what" "$file"
      missed=$((missed + 1))
      continue
    fi
    mkdir -p "$root/out"
    if run_check "$name" "$root" "$root/out" "$root/log"; then
      printf 'MISSED %-11s %s (%s still passes)\n' "$name" "$what" "$file"
      missed=$((missed + 1))
    else
      printf 'caught %-11s %-52s %s\n' "$name" "$what" "$(first_problem "$root/log" | cut -c1-160)"
      caught=$((caught + 1))
    fi
    rm -rf "$root"
  done
fi

echo
if [[ $run == 1 ]]; then
  echo "deploy checks: $passed passed, $failed failed"
fi
if [[ $selftest == 1 ]]; then
  echo "planted errors: $caught caught, $missed missed"
fi
[[ $failed == 0 && $missed == 0 ]]

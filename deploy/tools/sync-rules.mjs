// Writes deploy/base/prometheusrule.yaml (a PrometheusRule for the Prometheus operator) from the
// plain rule file deploy/prometheus/blockd-rules.yaml, so that the two never disagree.
//   node deploy/tools/sync-rules.mjs          rewrite the PrometheusRule
//   node deploy/tools/sync-rules.mjs --check  fail if it is out of date (deploy/ci.sh)
// The rule file's text is kept as it is (indented under `spec:`), comments and all; --check also
// compares the parsed groups, so a hand edit of either file is caught.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { isDeepStrictEqual } from "node:util";
import { parse, parseAllDocuments } from "yaml";

const deployDir = process.env.BLOCKD_DEPLOY_DIR || join(dirname(fileURLToPath(import.meta.url)), "..");
const rulesPath = join(deployDir, "prometheus/blockd-rules.yaml");
const crPath = join(deployDir, "base/prometheusrule.yaml");

export function render(rulesText) {
  const lines = rulesText.split("\n");
  const start = lines.findIndex((l) => l.startsWith("groups:"));
  if (start < 0) throw new Error(`${rulesPath}: no top-level "groups:"`);
  const body = lines.slice(start).map((l) => (l.trim() === "" ? "" : `  ${l}`)).join("\n").replace(/\n*$/, "\n");
  return [
    "# GENERATED from deploy/prometheus/blockd-rules.yaml by `node deploy/tools/sync-rules.mjs`:",
    "# edit that file and run the script (deploy/ci.sh fails while the two differ).",
    "apiVersion: monitoring.coreos.com/v1",
    "kind: PrometheusRule",
    "metadata:",
    "  name: blockd",
    "  labels:",
    "    app.kubernetes.io/name: blockd",
    "spec:",
    body,
  ].join("\n");
}

const rulesText = readFileSync(rulesPath, "utf8");
const want = render(rulesText);
if (process.argv.includes("--check")) {
  let have;
  try {
    have = readFileSync(crPath, "utf8");
  } catch (e) {
    console.error(`sync-rules: ${crPath}: ${e.message}`);
    process.exit(1);
  }
  const docs = parseAllDocuments(have).map((d) => d.toJS());
  const groupsOk = docs.length === 1 && isDeepStrictEqual(docs[0]?.spec?.groups, parse(rulesText).groups);
  if (have !== want || !groupsOk) {
    console.error(`sync-rules: ${crPath} differs from ${rulesPath}` +
      `${groupsOk ? " (text only)" : " (its rule groups differ)"}; run: node deploy/tools/sync-rules.mjs`);
    process.exit(1);
  }
  console.log(`sync-rules: ${crPath} matches ${rulesPath}`);
} else {
  writeFileSync(crPath, want);
  console.log(`sync-rules: wrote ${crPath}`);
}

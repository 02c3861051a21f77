// Checks the PromQL that operators will run against blockd: the Grafana dashboard's queries and the
// alert rules' expressions.
//   node deploy/tools/check-promql.mjs [--promtool=PATH] [--metrics-source=server/metrics.cc]
// - the dashboard is well-formed: uid, title, unique panel ids, every panel on the grid with a
//   query, every $variable defined, every query on the ${datasource} variable;
// - every blockd_* metric a query or rule names is one blockd exports (the families registered
//   in server/metrics.cc, so a renamed metric breaks CI instead of a dashboard);
// - every dashboard query parses: they are written, with Grafana's variables substituted, into a
//   rule file of recording rules that `promtool check rules` must accept.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parse } from "yaml";

const deployDir = process.env.BLOCKD_DEPLOY_DIR || join(dirname(fileURLToPath(import.meta.url)), "..");
const opts = { promtool: "promtool", metricsSource: join(deployDir, "../server/metrics.cc") };
for (const a of process.argv.slice(2)) {
  if (a.startsWith("--promtool=")) opts.promtool = a.slice("--promtool=".length);
  else if (a.startsWith("--metrics-source=")) opts.metricsSource = a.slice("--metrics-source=".length);
  else {
    console.error(`check-promql: unknown argument ${a}`);
    process.exit(2);
  }
}

const problems = [];
const fail = (msg) => problems.push(msg);

// The metric families blockd registers: .Name("blockd_...") in server/metrics.cc.
const families = new Set([...readFileSync(opts.metricsSource, "utf8").matchAll(/Name\("(blockd_[a-z0-9_]+)"\)/g)].map((m) => m[1]));
if (families.size < 10) fail(`${opts.metricsSource}: found only ${families.size} metric families; expected blockd's registry`);
const histograms = new Set([...readFileSync(opts.metricsSource, "utf8").matchAll(/BuildHistogram\(\)\s*\.Name\("(blockd_[a-z0-9_]+)"\)/g)].map((m) => m[1]));

function unknownMetrics(expr) {
  const unknown = [];
  for (const [name] of expr.matchAll(/\bblockd_[a-z0-9_]+\b/g)) {
    const base = name.replace(/_(bucket|sum|count)$/, "");
    const ok = families.has(name) || (histograms.has(base) && base !== name);
    if (!ok) unknown.push(name);
  }
  return unknown;
}

// Dashboard.
const dashPath = join(deployDir, "grafana/blockd.json");
let dash;
try {
  dash = JSON.parse(readFileSync(dashPath, "utf8"));
} catch (e) {
  console.error(`check-promql: ${dashPath}: ${e.message}`);
  process.exit(1);
}
for (const key of ["uid", "title", "schemaVersion", "panels", "templating"]) {
  if (dash[key] === undefined) fail(`${dashPath}: no "${key}"`);
}
const variables = new Set((dash.templating?.list ?? []).map((v) => v.name));
const builtins = new Set(["__rate_interval", "__interval", "__range", "__all"]);
const queries = [];
const ids = new Set();
const flatten = (list) => list.flatMap((p) => [p, ...flatten(p.panels ?? [])]);
for (const p of flatten(dash.panels ?? [])) {
  const where = `panel ${p.id} "${p.title}"`;
  if (typeof p.id !== "number" || ids.has(p.id)) fail(`${where}: missing or repeated id`);
  ids.add(p.id);
  const g = p.gridPos;
  if (!g || !(g.w > 0 && g.h > 0) || g.x + g.w > 24) fail(`${where}: bad gridPos ${JSON.stringify(g)}`);
  if (p.type === "row") continue;
  if (!(p.targets?.length > 0)) fail(`${where}: no queries`);
  for (const t of p.targets ?? []) {
    if (typeof t.expr !== "string" || !t.expr.trim()) {
      fail(`${where} ${t.refId}: empty expr`);
      continue;
    }
    if ((t.datasource ?? p.datasource)?.uid !== "${datasource}") fail(`${where} ${t.refId}: not on the \${datasource} variable`);
    queries.push({ where: `${where} ${t.refId}`, expr: t.expr });
  }
}
for (const v of dash.templating?.list ?? []) {
  if (v.type === "query") {
    const q = typeof v.query === "string" ? v.query : v.query?.query;
    const m = /^label_values\((.*),\s*(\w+)\)$/.exec(q ?? "");
    if (!m) fail(`variable ${v.name}: expected label_values(SELECTOR, LABEL), got ${JSON.stringify(q)}`);
    else queries.push({ where: `variable ${v.name}`, expr: m[1] });
  }
}
for (const q of queries) {
  for (const [, name] of q.expr.matchAll(/\$\{?(\w+)\}?/g)) {
    if (!variables.has(name) && !builtins.has(name)) fail(`${q.where}: uses $${name}, which the dashboard does not define`);
  }
  const unknown = unknownMetrics(q.expr);
  if (unknown.length) fail(`${q.where}: blockd does not export ${unknown.join(", ")}`);
}

// Alert rules: only the metric names here; promtool check/test rules parse and run them.
const rulesPath = join(deployDir, "prometheus/blockd-rules.yaml");
for (const group of parse(readFileSync(rulesPath, "utf8")).groups ?? []) {
  for (const rule of group.rules ?? []) {
    const unknown = unknownMetrics(String(rule.expr));
    if (unknown.length) fail(`${rulesPath}: ${rule.alert ?? rule.record}: blockd does not export ${unknown.join(", ")}`);
  }
}

// promtool parses every dashboard query, as recording rules with the variables filled in.
const substitute = (expr) =>
  expr.replace(/\$\{?__(rate_interval|interval|range)\}?/g, "5m").replace(/\$\{?(\w+)\}?/g, ".*");
const dir = mkdtempSync(join(tmpdir(), "blockd-promql-"));
try {
  const groups = queries.map((q, i) => ({
    name: `${i} ${q.where}`,
    rules: [{ record: `blockd_dashboard:query${i}`, expr: substitute(q.expr) }],
  }));
  const file = join(dir, "dashboard-queries.rules.json");
  writeFileSync(file, JSON.stringify({ groups }, null, 1));
  try {
    execFileSync(opts.promtool, ["check", "rules", file], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    if (e.code === "ENOENT") fail(`cannot run ${opts.promtool} (Debian package prometheus)`);
    else {
      // promtool names the group (`"<i> <panel> <refId>"`) of each query it cannot parse.
      const lines = `${e.stdout}${e.stderr}`.split("\n").filter((l) => /group "/.test(l));
      for (const l of lines) {
        const m = /group "(\d+) (.*?)", rule \d+, "[^"]*": (.*)$/.exec(l.replaceAll('\\"', '"'));
        fail(m ? `${m[2]}: promtool: ${m[3]}` : `promtool: ${l.trim()}`);
      }
      if (lines.length === 0) fail(`promtool check rules on the dashboard's queries:\n${e.stdout}${e.stderr}`);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

if (problems.length) {
  for (const p of problems) console.error(`check-promql: ${p}`);
  process.exit(1);
}
console.log(`check-promql: ${queries.length} dashboard queries parse and name only blockd's ${families.size} metric families; rule metrics known`);

// Validates rendered Kubernetes manifests offline: every object against its schema (Kubernetes from
// `kubernetes-models`, the Prometheus operator's CRDs from `@kubernetes-models/prometheus-operator`),
// with unknown fields rejected, then blockd's deployment policy (policy.mjs).
//   kubectl kustomize deploy/overlays/gpu > gpu.yaml
//   node deploy/tools/validate.mjs --variant=gpu gpu.yaml     # exit 1 and one line per problem
// --variant=gpu|cpu|base|replica-group picks the policy's expectations; --schema-only skips the policy.
//
// The schema validators that kubernetes-models ships are compiled ajv functions, and Kubernetes'
// OpenAPI schemas do not forbid extra properties, so a misspelt field (`readOnlyRootFilesystm`)
// would pass them. To catch it, each object is handed to the validator through a Proxy that records
// which properties the validator looked up: a compiled validator reads every property its schema
// declares, and enumerates the keys of maps (labels, resources, ConfigMap data). A key of a typed
// object that the validator never read is a field the schema does not have. Objects the validator
// did not look into at all are free-form (x-kubernetes-preserve-unknown-fields) and not judged.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { checkPolicy } from "./policy.mjs";

const CRD_PACKAGES = {
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

async function modelFor(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string" || !/^[A-Za-z0-9]+$/.test(kind)) return null;
  const slash = apiVersion.indexOf("/");
  const group = slash < 0 ? "" : apiVersion.slice(0, slash);
  const pkg = CRD_PACKAGES[group] ?? "kubernetes-models";
  try {
    const mod = await import(`${pkg}/${apiVersion}/${kind}`);
    return mod[kind] ?? null;
  } catch (e) {
    if (e.code === "ERR_MODULE_NOT_FOUND" || e.code === "ERR_PACKAGE_PATH_NOT_EXPORTED") return null;
    throw e;
  }
}

// Wraps `root` so that reads are recorded per object: Map<object, {keys: Set, enumerated: bool}>.
function tracking(root) {
  const seen = new Map();
  const proxies = new WeakMap();
  const wrap = (value) => {
    if (value === null || typeof value !== "object") return value;
    if (proxies.has(value)) return proxies.get(value);
    const rec = { keys: new Set(), enumerated: false };
    seen.set(value, rec);
    const proxy = new Proxy(value, {
      get(target, key, receiver) {
        if (typeof key === "string") rec.keys.add(key);
        return wrap(Reflect.get(target, key, receiver));
      },
      has(target, key) {
        if (typeof key === "string") rec.keys.add(key);
        return Reflect.has(target, key);
      },
      ownKeys(target) {
        rec.enumerated = true;
        return Reflect.ownKeys(target);
      },
      getOwnPropertyDescriptor(target, key) {
        if (typeof key === "string") rec.keys.add(key);
        return Reflect.getOwnPropertyDescriptor(target, key);
      },
    });
    proxies.set(value, proxy);
    return proxy;
  };
  return { proxy: wrap(root), seen };
}

function unknownFields(root, seen) {
  const problems = [];
  const walk = (value, path) => {
    if (value === null || typeof value !== "object") return;
    if (Array.isArray(value)) {
      value.forEach((v, i) => walk(v, `${path}[${i}]`));
      return;
    }
    const rec = seen.get(value);
    const typed = rec && !rec.enumerated && rec.keys.size > 0;
    for (const [k, v] of Object.entries(value)) {
      if (typed && !rec.keys.has(k)) problems.push(`${path}.${k}: unknown field (not in the schema)`);
      else walk(v, `${path}.${k}`);
    }
  };
  walk(root, "");
  return problems;
}

export async function validateObject(obj) {
  const Model = await modelFor(obj?.apiVersion, obj?.kind);
  if (!Model) return [`no schema for apiVersion ${JSON.stringify(obj?.apiVersion)} kind ${JSON.stringify(obj?.kind)}`];
  const { proxy, seen } = tracking(obj);
  const problems = [];
  try {
    Model.prototype.validate.call(proxy);
  } catch (e) {
    if (!e.errors) throw e;
    for (const err of e.errors) {
      const at = err.instancePath.replace(/\/(\d+)(?=\/|$)/g, "[$1]").replaceAll("/", ".") || ".";
      problems.push(`${at}: ${err.message}${err.params?.allowedValues ? ` (${err.params.allowedValues.join(", ")})` : ""}`);
    }
  }
  if (problems.length === 0) problems.push(...unknownFields(obj, seen));
  return problems;
}

export function loadObjects(text, source) {
  const objects = [];
  for (const doc of parseAllDocuments(text)) {
    if (doc.errors.length) throw new Error(`${source}: ${doc.errors.map((e) => e.message).join("; ")}`);
    const obj = doc.toJS();
    if (obj !== null && obj !== undefined) objects.push(obj);
  }
  return objects;
}

async function main(argv) {
  const opts = { variant: "base", policy: true, files: [] };
  for (const a of argv) {
    if (a.startsWith("--variant=")) opts.variant = a.slice("--variant=".length);
    else if (a === "--schema-only") opts.policy = false;
    else if (a.startsWith("--")) throw new Error(`unknown option ${a}`);
    else opts.files.push(a);
  }
  if (!["gpu", "cpu", "base", "replica-group"].includes(opts.variant)) {
    throw new Error(`--variant must be gpu, cpu, base or replica-group`);
  }
  if (opts.files.length === 0) throw new Error("usage: validate.mjs [--variant=gpu|cpu|base] [--schema-only] FILE.yaml...");
  let failures = 0;
  let count = 0;
  const all = [];
  for (const file of opts.files) {
    const objects = loadObjects(readFileSync(file === "-" ? 0 : file, "utf8"), file);
    if (objects.length === 0) {
      console.error(`${file}: no objects`);
      failures++;
    }
    for (const obj of objects) {
      count++;
      const name = `${file}: ${obj.kind}/${obj.metadata?.name}`;
      for (const p of await validateObject(obj)) {
        console.error(`${name} ${p}`);
        failures++;
      }
      all.push(obj);
    }
  }
  console.log(`schema: ${count} objects checked (${[...new Set(all.map((o) => `${o.apiVersion} ${o.kind}`))].join(", ")})`);
  if (opts.policy) {
    const problems = checkPolicy(all, opts.variant);
    for (const p of problems) console.error(`policy(${opts.variant}): ${p}`);
    failures += problems.length;
    if (problems.length === 0) console.log(`policy(${opts.variant}): ok`);
  }
  if (failures) {
    console.error(`validate: ${failures} problem(s)`);
    process.exit(1);
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main(process.argv.slice(2)).catch((e) => {
    console.error(`validate: ${e.message}`);
    process.exit(2);
  });
}

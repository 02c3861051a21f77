// blockd's deployment policy, checked on the objects an overlay renders (validate.mjs calls it):
// the things a schema cannot see because they span objects or encode how blockd behaves.
//   checkPolicy(objects, "gpu") -> ["StatefulSet/blockd: terminationGracePeriodSeconds 20 <= ...", ...]
//
// - the StatefulSet's serviceName is a headless Service; every Service, the PDB and the
//   ServiceMonitor select the blockd pods and name ports that exist;
// - the container is locked down (non-root, read-only root, no privilege escalation, all
//   capabilities dropped, seccomp RuntimeDefault) and its image tag is pinned;
// - startup, liveness and readiness probes are native gRPC probes on the gRPC port;
// - the flags (the ConfigMap's flagfiles, in --flagfile order) listen on the container's ports,
//   checkpoint to a volumeClaimTemplate, restore on start, and terminationGracePeriodSeconds is
//   longer than the preStop sleep + --drain_grace + --shutdown_timeout;
// - replica-group: each member's --collective_host is its own stable name; the trainer Job names
//   every member in rank order and is locked down like the daemons;
// - gpu: --backend=cuda, an nvidia.com/gpu limit and a toleration for the nvidia.com/gpu taint;
//   cpu: --backend=cpu, no GPU, a memory limit.

const GRPC_PORT = 50051;
const METRICS_PORT = 9464;

// absl::Duration text ("10s", "1m30s", "250ms", "0") in seconds; NaN when it is not one.
export function parseDuration(text) {
  if (text === "0") return 0;
  const units = { ns: 1e-9, us: 1e-6, ms: 1e-3, s: 1, m: 60, h: 3600 };
  const re = /(\d+(?:\.\d*)?|\.\d+)(ns|us|ms|s|m|h)/gy;
  let total = 0;
  let m;
  let end = 0;
  while ((m = re.exec(text)) !== null) {
    total += parseFloat(m[1]) * units[m[2]];
    end = re.lastIndex;
  }
  return end === text.length && end > 0 ? total : NaN;
}

// absl flagfile text -> [[name, value]] (value "true" for a bare --flag); comments and blanks skipped.
export function parseFlagfile(text) {
  const flags = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const m = /^--?([A-Za-z0-9_]+)(?:=(.*))?$/.exec(line);
    if (!m) throw new Error(`not a flag: ${JSON.stringify(line)}`);
    flags.push([m[1], m[2] ?? "true"]);
  }
  return flags;
}

const selects = (selector, labels) =>
  !!selector && Object.keys(selector).length > 0 &&
  Object.entries(selector).every(([k, v]) => labels?.[k] === v);

function portOf(address) {
  const m = /:(\d+)$/.exec(address ?? "");
  return m ? Number(m[1]) : NaN;
}

// The container of `pod` is locked down and its image tag pinned (the daemons' and the trainer's).
function lockedDown(fail, S, pod, container) {
  const psc = pod.securityContext ?? {};
  const csc = container.securityContext ?? {};
  if ((csc.runAsNonRoot ?? psc.runAsNonRoot) !== true) fail(S, "runAsNonRoot must be true");
  if ((csc.runAsUser ?? psc.runAsUser) === 0) fail(S, "runAsUser must not be 0");
  if (csc.readOnlyRootFilesystem !== true) fail(S, "container securityContext.readOnlyRootFilesystem must be true");
  if (csc.allowPrivilegeEscalation !== false) fail(S, "container securityContext.allowPrivilegeEscalation must be false");
  if (csc.privileged === true) fail(S, "container must not be privileged");
  if (!(csc.capabilities?.drop ?? []).includes("ALL")) fail(S, "container capabilities must drop ALL");
  if ((csc.capabilities?.add ?? []).length) fail(S, `container adds capabilities ${csc.capabilities.add}`);
  if ((csc.seccompProfile ?? psc.seccompProfile)?.type !== "RuntimeDefault") fail(S, "seccompProfile must be RuntimeDefault");
  if (pod.hostNetwork || pod.hostPID || pod.hostIPC) fail(S, "must not use the host's network, PID or IPC namespace");
  const image = container.image ?? "";
  if (!/@sha256:[0-9a-f]{64}$/.test(image) && !/:[\w][\w.-]*$/.test(image.split("/").pop())) fail(S, `image ${image} has no tag`);
  else if (/:latest$/.test(image)) fail(S, `image ${image} is not pinned (:latest)`);
}

// replica-group: the trainer Job reaches every member, rank r = pod r, by its stable name in the
// headless Service, on the gRPC port; it is not selected as a daemon.
function checkTrainer(fail, objects, sts, podLabels) {
  const jobs = objects.filter((o) => o.kind === "Job");
  if (jobs.length !== 1) {
    fail("Job", `replica-group: expected the trainer Job, found ${jobs.length} Jobs`);
    return;
  }
  const J = `Job/${jobs[0].metadata?.name}`;
  const pod = jobs[0].spec?.template?.spec ?? {};
  const labels = jobs[0].spec?.template?.metadata?.labels ?? {};
  const container = (pod.containers ?? [])[0];
  if (!container) {
    fail(J, "no container");
    return;
  }
  lockedDown(fail, J, pod, container);
  if (selects(sts.spec?.selector?.matchLabels, labels) ||
      Object.entries(podLabels).every(([k, v]) => labels[k] === v)) {
    fail(J, "its pods carry the daemons' labels: the Services would send clients to the trainer");
  }
  const arg = (container.args ?? []).find((a) => a.startsWith("--target="));
  const targets = arg ? arg.slice("--target=".length).split(",") : [];
  const ns = (container.env ?? []).find((e) => e.valueFrom?.fieldRef?.fieldPath === "metadata.namespace")?.name;
  const want = [];
  for (let r = 0; r < (sts.spec?.replicas ?? 1); ++r) {
    want.push(`${sts.metadata?.name}-${r}.${sts.spec?.serviceName}.$(${ns ?? "POD_NAMESPACE"}).svc:${GRPC_PORT}`);
  }
  if (!ns) fail(J, "no env var from fieldRef metadata.namespace for the members' names");
  if (targets.join(",") !== want.join(",")) {
    fail(J, `--target=${targets.join(",")}, expected the ${want.length} members in rank order: ${want.join(",")}`);
  }
}

export function checkPolicy(objects, variant) {
  const problems = [];
  const fail = (what, msg) => problems.push(`${what}: ${msg}`);
  const byKind = (kind) => objects.filter((o) => o.kind === kind);

  const sets = byKind("StatefulSet");
  if (sets.length !== 1) {
    fail("StatefulSet", `expected exactly one, found ${sets.length}`);
    return problems;
  }
  const sts = sets[0];
  const S = `StatefulSet/${sts.metadata?.name}`;
  const spec = sts.spec ?? {};
  const pod = spec.template?.spec ?? {};
  const podLabels = spec.template?.metadata?.labels ?? {};
  const container = (pod.containers ?? []).find((c) => c.name === "blockd");
  if (!container) {
    fail(S, "no container named blockd");
    return problems;
  }
  if (!selects(spec.selector?.matchLabels, podLabels)) fail(S, "selector.matchLabels does not match the pod template's labels");

  // Ports and Services.
  const ports = new Map((container.ports ?? []).map((p) => [p.name, p.containerPort]));
  if (ports.get("grpc") !== GRPC_PORT) fail(S, `container port "grpc" is ${ports.get("grpc")}, expected ${GRPC_PORT}`);
  if (ports.get("metrics") !== METRICS_PORT) fail(S, `container port "metrics" is ${ports.get("metrics")}, expected ${METRICS_PORT}`);
  const containerHas = (target) =>
    typeof target === "string" ? ports.has(target) : [...ports.values()].includes(target);
  const services = byKind("Service");
  for (const svc of services) {
    const V = `Service/${svc.metadata?.name}`;
    if (!selects(svc.spec?.selector, podLabels)) fail(V, "its selector does not select the blockd pods");
    for (const p of svc.spec?.ports ?? []) {
      if (!containerHas(p.targetPort ?? p.port)) fail(V, `port ${p.name} targets ${p.targetPort ?? p.port}, which the container does not expose`);
    }
  }
  const headless = services.find((s) => s.metadata?.name === spec.serviceName);
  if (!headless) fail(S, `serviceName ${spec.serviceName} names no Service in the rendering`);
  else {
    if (headless.spec?.clusterIP !== "None") fail(`Service/${headless.metadata.name}`, "the StatefulSet's serviceName must be headless (clusterIP: None)");
    if (!(headless.spec?.ports ?? []).some((p) => p.targetPort === "grpc" || p.targetPort === GRPC_PORT)) fail(`Service/${headless.metadata.name}`, "exposes no gRPC port");
  }
  const metricsServices = services.filter((s) => (s.spec?.ports ?? []).some((p) => p.targetPort === "metrics" || p.targetPort === METRICS_PORT));
  if (metricsServices.length === 0) fail("Service", "no Service exposes the metrics port");

  const monitors = byKind("ServiceMonitor");
  if (monitors.length !== 1) fail("ServiceMonitor", `expected exactly one, found ${monitors.length}`);
  for (const sm of monitors) {
    const M = `ServiceMonitor/${sm.metadata?.name}`;
    const targets = services.filter((s) => selects(sm.spec?.selector?.matchLabels, s.metadata?.labels));
    if (targets.length === 0) fail(M, "its selector matches no Service");
    for (const ep of sm.spec?.endpoints ?? []) {
      for (const t of targets) {
        if (!(t.spec?.ports ?? []).some((p) => p.name === ep.port)) fail(M, `endpoint port ${ep.port} is not a port of Service/${t.metadata.name}`);
        if (!(t.spec?.ports ?? []).some((p) => p.name === ep.port && (p.targetPort === "metrics" || p.targetPort === METRICS_PORT))) {
          fail(M, `endpoint port ${ep.port} of Service/${t.metadata.name} is not blockd's metrics port`);
        }
      }
    }
    if (sm.spec?.jobLabel && targets.some((t) => t.metadata?.labels?.[sm.spec.jobLabel] !== "blockd")) {
      fail(M, `jobLabel ${sm.spec.jobLabel} must give job="blockd" (the alert rules' job)`);
    }
  }
  const pdbs = byKind("PodDisruptionBudget");
  if (pdbs.length !== 1) fail("PodDisruptionBudget", `expected exactly one, found ${pdbs.length}`);
  for (const pdb of pdbs) {
    if (!selects(pdb.spec?.selector?.matchLabels, podLabels)) fail(`PodDisruptionBudget/${pdb.metadata?.name}`, "does not select the blockd pods");
  }
  const rules = byKind("PrometheusRule");
  if (rules.length !== 1 || !(rules[0].spec?.groups?.length > 0)) fail("PrometheusRule", "expected one with rule groups");

  // Security.
  lockedDown(fail, S, pod, container);

  // Probes.
  for (const probe of ["startupProbe", "livenessProbe", "readinessProbe"]) {
    const p = container[probe];
    if (!p) fail(S, `no ${probe}`);
    else if (!p.grpc) fail(S, `${probe} is not a native gRPC probe (grpc:)`);
    else if (p.grpc.port !== GRPC_PORT) fail(S, `${probe} checks port ${p.grpc.port}, gRPC is on ${GRPC_PORT}`);
  }

  // Flags, from the ConfigMap files named by --flagfile, in order.
  const mounts = container.volumeMounts ?? [];
  const volumes = new Map((pod.volumes ?? []).map((v) => [v.name, v]));
  const claimNames = new Set((spec.volumeClaimTemplates ?? []).map((c) => c.metadata?.name));
  const configMaps = new Map(byKind("ConfigMap").map((c) => [c.metadata?.name, c]));
  const flags = new Map();
  const flagfileArg = (container.args ?? []).find((a) => a.startsWith("--flagfile="));
  if (!flagfileArg) fail(S, "blockd gets no --flagfile from the ConfigMap");
  for (const file of flagfileArg ? flagfileArg.slice("--flagfile=".length).split(",") : []) {
    const mount = mounts.find((m) => file.startsWith(`${m.mountPath.replace(/\/$/, "")}/`));
    const volume = mount && volumes.get(mount.name);
    const cm = volume?.configMap && configMaps.get(volume.configMap.name);
    const key = mount && file.slice(mount.mountPath.replace(/\/$/, "").length + 1);
    if (!cm) fail(S, `--flagfile ${file} is not on a mounted ConfigMap of this rendering`);
    else if (typeof cm.data?.[key] !== "string") fail(`ConfigMap/${cm.metadata.name}`, `has no key ${key} (for --flagfile ${file})`);
    else {
      try {
        for (const [k, v] of parseFlagfile(cm.data[key])) flags.set(k, v);
      } catch (e) {
        fail(`ConfigMap/${cm.metadata.name}`, `${key}: ${e.message}`);
      }
    }
  }
  for (const a of container.args ?? []) {
    const m = /^--?([A-Za-z0-9_]+)(?:=(.*))?$/.exec(a);
    if (m && m[1] !== "flagfile") flags.set(m[1], m[2] ?? "true");
  }
  if (portOf(flags.get("listen")) !== GRPC_PORT) fail("flags", `--listen=${flags.get("listen")} is not the gRPC port ${GRPC_PORT}`);
  if (portOf(flags.get("metrics_listen")) !== METRICS_PORT) fail("flags", `--metrics_listen=${flags.get("metrics_listen")} is not the metrics port ${METRICS_PORT}`);
  const ckpt = flags.get("checkpoint_dir") ?? "";
  const ckptMount = mounts.find((m) => ckpt === m.mountPath || ckpt.startsWith(`${m.mountPath.replace(/\/$/, "")}/`));
  if (!ckpt) fail("flags", "--checkpoint_dir is not set");
  else if (!ckptMount || !claimNames.has(ckptMount.name)) fail("flags", `--checkpoint_dir=${ckpt} is not on a volumeClaimTemplate's volume`);
  else if (ckptMount.readOnly) fail("flags", `--checkpoint_dir=${ckpt} is on a read-only mount`);
  if (flags.get("restore_on_start") !== "true") fail("flags", "--restore_on_start must be true (blocks come back after a restart)");
  const backend = flags.get("backend") ?? "auto";
  const wantBackend = { gpu: "cuda", cpu: "cpu", "replica-group": "cpu", base: backend }[variant];
  if (backend !== wantBackend) fail("flags", `--backend=${backend}, the ${variant} overlay needs --backend=${wantBackend}`);

  // Termination budget.
  const drain = parseDuration(flags.get("drain_grace") ?? "0");
  const shutdown = parseDuration(flags.get("shutdown_timeout") ?? "30s");
  if (Number.isNaN(drain)) fail("flags", `--drain_grace=${flags.get("drain_grace")} is not a duration`);
  if (Number.isNaN(shutdown)) fail("flags", `--shutdown_timeout=${flags.get("shutdown_timeout")} is not a duration`);
  const preStop = container.lifecycle?.preStop;
  let preStopSeconds = NaN;
  if (preStop?.sleep) preStopSeconds = preStop.sleep.seconds;
  else if (preStop?.exec?.command?.length === 2 && /(^|\/)sleep$/.test(preStop.exec.command[0])) preStopSeconds = Number(preStop.exec.command[1]);
  if (!preStop) fail(S, "no preStop hook (endpoints must be withdrawn before SIGTERM)");
  else if (!(preStopSeconds > 0)) fail(S, "preStop must be a sleep (exec [sleep, N] or sleep.seconds)");
  const grace = pod.terminationGracePeriodSeconds ?? 30;
  const needed = (preStopSeconds || 0) + drain + shutdown;
  if (!(grace > needed)) {
    fail(S, `terminationGracePeriodSeconds ${grace} <= preStop ${preStopSeconds}s + drain_grace ${drain}s + shutdown_timeout ${shutdown}s`);
  }

  // Resources and scheduling per variant.
  const limits = container.resources?.limits ?? {};
  const requests = container.resources?.requests ?? {};
  const gpuTolerated = (pod.tolerations ?? []).some((t) => t.key === "nvidia.com/gpu" && (t.operator === "Exists" || t.value !== undefined));
  if (variant === "gpu") {
    if (!(Number(limits["nvidia.com/gpu"]) >= 1)) fail(S, "gpu: the container needs an nvidia.com/gpu limit of at least 1");
    if (!gpuTolerated) fail(S, "gpu: no toleration for the nvidia.com/gpu taint");
  }
  if (variant === "replica-group") {
    // Members reach each other by the pod's own stable name: one flag value for all would send
    // every member's peers to one pod.
    const host = flags.get("collective_host") ?? "";
    const stable = `$(POD_NAME).${spec.serviceName}.`;
    if (!host.startsWith(stable)) fail("flags", `--collective_host=${host}, expected ${stable}... (each pod's own name in the headless Service)`);
    const env = new Map((container.env ?? []).map((e) => [e.name, e.valueFrom?.fieldRef?.fieldPath]));
    if (env.get("POD_NAME") !== "metadata.name") fail(S, "replica-group: env POD_NAME must come from fieldRef metadata.name");
    if (!(spec.replicas >= 2)) fail(S, `replica-group: replicas ${spec.replicas}, a group needs at least 2`);
    checkTrainer(fail, objects, sts, podLabels);
  }
  if (variant === "cpu" || variant === "replica-group") {
    if (limits["nvidia.com/gpu"] !== undefined || requests["nvidia.com/gpu"] !== undefined) fail(S, "cpu: asks for an nvidia.com/gpu");
    if (!limits.memory) fail(S, "cpu: blocks live in host memory, so the container needs a memory limit");
  }
  if (variant !== "base" && !requests.cpu) fail(S, `${variant}: the container has no cpu request`);
  for (const claim of spec.volumeClaimTemplates ?? []) {
    if (!claim.spec?.resources?.requests?.storage) fail(S, `volumeClaimTemplate ${claim.metadata?.name} requests no storage`);
  }
  return problems;
}

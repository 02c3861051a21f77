// Lints the Dockerfile offline (no Docker engine here): dockerfile-utils' validator with every
// optional rule raised to an error, then blockd's image policy.
//   node deploy/tools/lint-dockerfile.mjs [Dockerfile] [--cmake=CMakeLists.txt] [--image=blockd|trainer]
// Policy:
// - multi-stage: builds on nvidia/cuda:<13.x>-[cudnn-]devel-ubuntu24.04, runs on the same release's
//   -runtime-ubuntu24.04; every base image has a pinned tag (not latest) or a digest;
// - the build stage installs the apt package of every find_package() in CMakeLists.txt and copies
//   every folder it adds with add_subdirectory()/include(); the final
//   stage installs no -dev package and no compiler;
// - the final stage runs as a non-root USER, EXPOSEs 50051 and 9464, and has an exec-form (JSON)
//   ENTRYPOINT, so that blockd is PID 1 and gets SIGTERM.
// --image=trainer (examples/Dockerfile.trainer): the same validator, pinned bases, non-root USER and
// exec-form ENTRYPOINT; its final stage installs Debian's python3-torch/-grpcio/-numpy/-protobuf
// and no compiler, copies the client package, the generated stubs and the examples, and runs
// /usr/bin/python3 on train_tiny_lm.py.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const { validate, ValidationSeverity } = require("dockerfile-utils");
const { DockerfileParser } = require("dockerfile-ast");

// find_package() name -> the Debian/Ubuntu package(s) that provide it.
const APT_FOR_PACKAGE = {
  Threads: [],
  absl: ["libabsl-dev"],
  Protobuf: ["libprotobuf-dev", "protobuf-compiler"],
  gRPC: ["libgrpc++-dev", "protobuf-compiler-grpc"],
  "prometheus-cpp": ["prometheus-cpp-dev"],
  nlohmann_json: ["nlohmann-json3-dev"],
  BLAS: ["libopenblas-dev"],
  OpenSSL: ["libssl-dev"],
  Gloo: ["libgloo-dev"],
  GTest: ["libgtest-dev"],
  CUDAToolkit: [], // the devel image
};
const BUILD_TOOLS = ["cmake", "ninja-build", "g++"];

const root = join(dirname(fileURLToPath(import.meta.url)), "../..");
let dockerfilePath = join(root, "Dockerfile");
let cmakePath = join(root, "CMakeLists.txt");
let image = "blockd";  // --image=trainer: examples/Dockerfile.trainer, the trainer example's image
for (const a of process.argv.slice(2)) {
  if (a.startsWith("--cmake=")) cmakePath = a.slice("--cmake=".length);
  else if (a.startsWith("--image=")) image = a.slice("--image=".length);
  else if (a.startsWith("--")) {
    console.error(`lint-dockerfile: unknown option ${a}`);
    process.exit(2);
  } else dockerfilePath = a;
}

const text = readFileSync(dockerfilePath, "utf8");
const problems = [];
const at = (range) => `${dockerfilePath}:${range.start.line + 1}`;

const E = ValidationSeverity.ERROR;
const diagnostics = validate(text, {
  deprecatedMaintainer: E,
  directiveCasing: E,
  emptyContinuationLine: E,
  instructionCasing: E,
  instructionCmdMultiple: E,
  instructionEntrypointMultiple: E,
  instructionHealthcheckMultiple: E,
  instructionJSONInSingleQuotes: E,
  instructionWorkdirRelative: E,
});
for (const d of diagnostics) problems.push(`${at(d.range)}: dockerfile-utils: ${d.message}`);

const dockerfile = DockerfileParser.parse(text);
const froms = dockerfile.getFROMs();
const instructions = dockerfile.getInstructions();
const stageOf = (ins) => {
  let stage = -1;
  for (const f of froms) if (f.getRange().start.line <= ins.getRange().start.line) stage++;
  return stage;
};
const inStage = (i, keyword) => instructions.filter((ins) => ins.getKeyword() === keyword && stageOf(ins) === i);
const runText = (ins) => ins.getRawArgumentsContent?.() ?? ins.getTextContent();

if (froms.length < 2) problems.push(`${dockerfilePath}: expected a multi-stage build (build and runtime), found ${froms.length} FROM`);
const cuda = [];
for (const f of froms) {
  const base = f.getImage() ?? "";
  const tag = f.getImageTag();
  const digest = f.getImageDigest();
  if (!tag && !digest) problems.push(`${at(f.getRange())}: FROM ${base} has no pinned tag or digest`);
  if (tag === "latest") problems.push(`${at(f.getRange())}: FROM ${base} uses :latest`);
  // The cuDNN flavours (13.x.y-cudnn-devel / -cudnn-runtime) carry the cuDNN that --attention=auto loads.
  const m = /^(\d+)\.(\d+)\.(\d+)-(?:cudnn-)?(devel|runtime)-ubuntu24\.04$/.exec(tag ?? "");
  if (f.getImageName() === "nvidia/cuda" && m) cuda.push({ from: f, version: `${m[1]}.${m[2]}.${m[3]}`, major: m[1], flavour: m[4] });
}
// The final stage's user and exec-form ENTRYPOINT (argv), for both images.
const finalStage = froms.length - 1;
const users = inStage(finalStage, "USER");
const user = users.length ? runText(users[users.length - 1]).trim().split(":")[0] : "";
if (!user) problems.push(`${dockerfilePath}: the final stage has no USER (it would run as root)`);
else if (user === "root" || user === "0") problems.push(`${at(users[users.length - 1].getRange())}: USER ${user} is root`);
const entrypoints = inStage(finalStage, "ENTRYPOINT");
let argv = null;
if (entrypoints.length !== 1) problems.push(`${dockerfilePath}: the final stage needs one ENTRYPOINT, found ${entrypoints.length}`);
else {
  try {
    argv = JSON.parse(runText(entrypoints[0]));
  } catch {
    argv = null;
  }
  if (!Array.isArray(argv) || argv.length === 0) {
    problems.push(`${at(entrypoints[0].getRange())}: ENTRYPOINT must be exec form (a JSON array), so the program is PID 1 and receives SIGTERM`);
    argv = null;
  } else if (/(^|\/)(ba|da)?sh$/.test(argv[0])) problems.push(`${at(entrypoints[0].getRange())}: ENTRYPOINT runs a shell; exec the program directly`);
}
const aptWords = (stage) =>
  new Set(inStage(stage, "RUN").flatMap((r) => {
    const t = runText(r).replace(/\\\n/g, " ");
    return [...t.matchAll(/apt-get install([^&;|]*)/g)].flatMap((m) => m[1].split(/\s+/).filter((w) => w && !w.startsWith("-")));
  }));
for (const p of aptWords(finalStage)) {
  if (/-dev$|^g\+\+|^gcc|^cmake$|^build-essential$|^protobuf-compiler/.test(p)) problems.push(`${dockerfilePath}: the final stage installs ${p}`);
}

if (image === "trainer") {
  // Debian's Python stack in the final stage, the package and the example copied, the example run.
  const apt = aptWords(finalStage);
  for (const p of ["python3-torch", "python3-grpcio", "python3-numpy", "python3-protobuf"]) {
    if (!apt.has(p)) problems.push(`${dockerfilePath}: the final stage does not install ${p}`);
  }
  const copies = inStage(finalStage, "COPY").map((c) => c.getTextContent());
  for (const dir of ["client/python/blockd/", "examples/"]) {
    if (!copies.some((c) => c.trim().split(/\s+/).includes(dir))) problems.push(`${dockerfilePath}: the final stage does not COPY ${dir}`);
  }
  if (!copies.some((c) => /--from=\S+/.test(c) && /blockd\/v1/.test(c))) problems.push(`${dockerfilePath}: the final stage does not COPY the generated stubs (blockd/v1)`);
  if (argv && !(argv[0] === "/usr/bin/python3" && /train_tiny_lm\.py$/.test(argv[1] ?? ""))) {
    problems.push(`${at(entrypoints[0].getRange())}: ENTRYPOINT must run Debian's /usr/bin/python3 on the trainer example`);
  }
  report();
}

const first = froms[0];
const last = froms[froms.length - 1];
const cudaOf = (f) => cuda.find((c) => c.from === f);
if (!cudaOf(first) || cudaOf(first).flavour !== "devel" || cudaOf(first).major !== "13") {
  problems.push(`${at(first.getRange())}: the build stage must be FROM nvidia/cuda:13.x.y-[cudnn-]devel-ubuntu24.04`);
}
if (!cudaOf(last) || cudaOf(last).flavour !== "runtime" || cudaOf(last).major !== "13") {
  problems.push(`${at(last.getRange())}: the final stage must be FROM nvidia/cuda:13.x.y-[cudnn-]runtime-ubuntu24.04`);
} else if (cudaOf(first) && cudaOf(first).version !== cudaOf(last).version) {
  problems.push(`${at(last.getRange())}: runtime CUDA ${cudaOf(last).version} differs from build CUDA ${cudaOf(first).version}`);
}

// apt packages of the build stage against CMakeLists.txt's find_package() calls.
const buildApt = aptWords(0);
const cmake = readFileSync(cmakePath, "utf8");
for (const [, name] of cmake.matchAll(/^\s*find_package\(\s*([A-Za-z0-9_-]+)/gm)) {
  const pkgs = APT_FOR_PACKAGE[name];
  if (!pkgs) problems.push(`${cmakePath}: find_package(${name}) has no apt package in lint-dockerfile.mjs's map: add it there and to the Dockerfile`);
  else for (const p of pkgs) if (!buildApt.has(p)) problems.push(`${dockerfilePath}: the build stage does not install ${p} (for find_package(${name}))`);
}
for (const p of BUILD_TOOLS) if (!buildApt.has(p)) problems.push(`${dockerfilePath}: the build stage does not install ${p}`);
// Every folder the top-level CMakeLists.txt adds (or includes) is copied into the build stage.
const copied = new Set(inStage(0, "COPY").flatMap((c) => {
  const words = runText(c).trim().split(/\s+/).filter((w) => !w.startsWith("--"));
  return words.slice(0, -1).map((w) => w.replace(/^\.\//, "").replace(/\/$/, ""));
}));
const needed = new Set([...cmake.matchAll(/^\s*(?:add_subdirectory|include)\(\s*([A-Za-z0-9_./-]+)/gm)]
  .map((m) => m[1].split("/")[0]).filter((d) => d !== "" && !/^[A-Z]/.test(d) && d !== "CheckLanguage"));
for (const dir of needed) {
  if (!copied.has(dir) && !copied.has(".")) problems.push(`${dockerfilePath}: the build stage does not COPY ${dir}/ (CMakeLists.txt uses it)`);
}
// The final stage's ports and program.
const exposed = new Set(inStage(finalStage, "EXPOSE").flatMap((e) => runText(e).trim().split(/\s+/).map((p) => p.replace(/\/tcp$/, ""))));
for (const port of ["50051", "9464"]) if (!exposed.has(port)) problems.push(`${dockerfilePath}: the final stage does not EXPOSE ${port}`);
if (argv && !/(^|\/)blockd$/.test(argv[0])) problems.push(`${at(entrypoints[0].getRange())}: ENTRYPOINT runs ${argv[0]}, not blockd`);
report();

function report() {
  if (problems.length) {
    for (const p of problems) console.error(`lint-dockerfile: ${p}`);
    process.exit(1);
  }
  console.log(`lint-dockerfile: ${dockerfilePath} ok (${instructions.length} instructions, ${froms.length} stages, dockerfile-utils: no diagnostics)`);
  process.exit(0);
}

# blockd container image: the daemon with the CUDA backend (it falls back to the CPU backend when the
# node has no GPU, unless --backend=cuda says otherwise).
#
#   docker build -t registry.example.com/blockd:0.1.0 .
#   docker build --build-arg CUDA_ARCHITECTURES="90;100" -t ... .      # H100/H200 and B200
#   docker run --rm --gpus all -p 50051:50051 -p 9464:9464 registry.example.com/blockd:0.1.0
#
# Stage `build` compiles blockd on NVIDIA's CUDA 13 devel image with cuDNN's headers, with the
# same Debian/Ubuntu packages that the CMake build uses everywhere (CMakeLists.txt's find_package
# calls), and records which packages own the shared libraries the binary links. Stage `runtime`
# starts from the matching CUDA runtime image with cuDNN (cuBLAS and cuDNN included, so
# --attention=auto picks cuDNN's fused attention; blockd loads libcudnn at run time, so an image
# without it still runs on the native kernels) and installs exactly those packages: no compiler,
# no headers.
# Tags are pinned to one CUDA release (13.0.2, the toolkit the GPU tests use); pin digests too
# (nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04@sha256:...) where a registry mirror resolves them.
# deploy/ci.sh lints this file offline (deploy/tools/lint-dockerfile.mjs).

FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04 AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# One line per find_package() of CMakeLists.txt, plus the toolchain.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      cmake ninja-build g++ \
      libabsl-dev \
      libprotobuf-dev protobuf-compiler \
      libgrpc++-dev protobuf-compiler-grpc \
      prometheus-cpp-dev \
      nlohmann-json3-dev \
      libopenblas-dev \
      libssl-dev \
      libgloo-dev \
      libgtest-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY CMakeLists.txt ./
COPY cmake/ cmake/
COPY proto/ proto/
COPY base/ base/
COPY engine/ engine/
COPY kernels/ kernels/
COPY server/ server/
COPY client/ client/
COPY tests/ tests/
COPY bench/ bench/
COPY fuzz/ fuzz/

# 90: H100/H200. Add 100 for B200, 120 for RTX Blackwell (each adds build time and image size).
ARG CUDA_ARCHITECTURES=90
RUN cmake -S . -B /build -G Ninja \
      -DCMAKE_BUILD_TYPE=Release \
      -DBLOCKD_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
 && cmake --build /build --target blockd \
 && install -D -m 0755 /build/server/blockd /out/usr/local/bin/blockd

# The packages that own every shared library blockd links (libgrpc++1.51t64, libopenblas0-pthread,
# libcublas-13-0, ...): the runtime stage installs these and nothing else. A library that no
# package owns fails the build here instead of at run time.
RUN ldd /out/usr/local/bin/blockd \
    | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u \
    | while read -r lib; do \
        dpkg-query -S "$(realpath "$lib")" 2>/dev/null || dpkg-query -S "$lib" 2>/dev/null \
          || { echo "no package owns $lib" >&2; exit 1; }; \
      done \
    | cut -d: -f1 | sort -u > /out/runtime-packages.txt \
 && cat /out/runtime-packages.txt


FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
# --no-upgrade: packages the CUDA runtime image already has (libc6, libcublas-13-0) stay as they are.
RUN apt-get update \
 && xargs -a /tmp/runtime-packages.txt apt-get install -y --no-install-recommends --no-upgrade \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt

# An unprivileged user whose uid/gid the Kubernetes manifests name (runAsUser/fsGroup 10001);
# /var/lib/blockd is where the checkpoint volume mounts.
RUN groupadd --system --gid 10001 blockd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/blockd --shell /usr/sbin/nologin blockd \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/blockd

COPY --from=build /out/usr/local/bin/blockd /usr/local/bin/blockd

LABEL org.opencontainers.image.title="blockd" \
      org.opencontainers.image.description="Transformer decoder blocks resident on a GPU, trained over gRPC" \
      org.opencontainers.image.version="0.1.0"

USER 10001:10001
WORKDIR /var/lib/blockd
# gRPC (BlockService, grpc.health.v1, reflection) and Prometheus metrics.
EXPOSE 50051 9464
# blockd is PID 1 (exec form, no shell), so SIGTERM reaches it: it reports NOT_SERVING for
# --drain_grace, finishes in-flight calls within --shutdown_timeout and exits 0.
STOPSIGNAL SIGTERM
# For `docker run` (Kubernetes uses its native gRPC probes instead): healthy while the metrics say
# the backend's device works. Needs the default --metrics_listen port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '^blockd_backend_healthy 1' <&3"]
ENTRYPOINT ["/usr/local/bin/blockd"]
CMD ["--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9464", "--backend=auto"]

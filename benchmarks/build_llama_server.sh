#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (and, with BENCH=1, `llama-bench`) from the llama.cpp source vendored in the
# llama-cpp-python 0.3.36 sdist, i.e. the same llama.cpp that bench_decode.py's "llamacpp" engine runs.
# Used by benchmarks/bench_batch.py (`llama-server -np 8`, the many-requests reference).
#
#   benchmarks/build_llama_server.sh            # builds if missing, prints the binary's path
#   BENCH=1 benchmarks/build_llama_server.sh    # also llama-bench
#   JOBS=1 NICE=19 ...                          # parallel jobs (default 2) and nice level (default 19)
#
# Release, native CPU (-march=native: AVX2/FMA/F16C here), CPU backend only: no CUDA, no libcurl, no OpenSSL,
# no web UI (neither the npm build nor the prebuilt-UI download: the build stays offline). Idempotent: when the
# binary exists it only prints its path. ~15-25 min on 2 cores at nice 19. Needs cmake >= 3.18 and a C++17 compiler.
set -euo pipefail

ROOT="${QWEN25_REF_BUILD:-$HOME/.cache/qwen25-ref-build}"
SDIST="$ROOT/llama_cpp_python-0.3.36.tar.gz"
SRC="$ROOT/src/llama_cpp_python-0.3.36/vendor/llama.cpp"
BUILD="$ROOT/llama-server-build"
BIN="$BUILD/bin/llama-server"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"

targets=()
[[ -x "$BIN" ]] || targets+=(llama-server)
[[ "${BENCH:-0}" == 1 && ! -x "$BUILD/bin/llama-bench" ]] && targets+=(llama-bench)
if (( ${#targets[@]} == 0 )); then
    echo "$BIN"
    exit 0
fi

if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    if [[ ! -f "$SDIST" ]]; then  # the sdist that ~/.cache/qwen25-ref-build/build.sh downloads
        mkdir -p "$ROOT"
        pip download --no-deps --no-binary :all: -d "$ROOT" llama-cpp-python==0.3.36 >&2
    fi
    mkdir -p "$ROOT/src"
    tar -xzf "$SDIST" -C "$ROOT/src"
fi

cmake -S "$SRC" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
nice -n "$NICE" cmake --build "$BUILD" --target "${targets[@]}" -j "$JOBS" >&2

"$BIN" --version >&2
echo "$BIN"

#!/usr/bin/env bash
# Download the wheels an offline GPU machine lacks into .whl/ (git-ignored), for its Python 3.12 on x86-64;
# `bash benchmarks/bench_e2e.sh` installs them there (pip --no-index into /tmp/site) before its first stage.
# Run it in a checkout on a machine that reaches a package index; then copy .whl/ into the checkout on the GPU machine.
#   binary wheels    bitsandbytes, gguf, jsonargparse (+docstring-parser, typeshed-client) for LightningCLI, and
#                    the DeepSpeed / llama-cpp-python needs a plain CUDA torch image lacks: hjson, pydantic (+core,
#                    annotated-types, typing-inspection, typing-extensions>=4.16), diskcache.
#                    (einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py, psutil, tqdm: assumed in the image.)
#   deepspeed 0.19.8            built here from its sdist with DS_BUILD_OPS=0: pure Python, py3-none-any.
#   llama-cpp-python 0.3.36     the wheel `make test` built (pip cache), repacked slim (one copy of each shared
#                               library, no headers, no CLI libs: 24 -> ~6 MB) with libggml-cpu rebuilt with
#                               GGML_NATIVE=OFF (AVX2/FMA/F16C/BMI2: any x86-64-v3 host; the cached one is
#                               -march=native of the build host) and libgomp.so.1 beside it. Its tag
#                               py3-none-linux_x86_64 is right: ctypes, no CPython ABI, so Python 3.12 takes it.
# Extra package specs on the command line are added to the binary list. Takes ~15 min on 2 cores (the ggml-cpu
# rebuild).
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
PY=${PYTHON:-$root/.venv/bin/python}
work=${E2E_WHEEL_WORK:-/tmp/e2e_wheels}; mkdir -p "$work" .whl
pkgs=(bitsandbytes==0.50.2 gguf==0.19.0 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
      hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0 diskcache==5.6.3 "$@")
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pkgs[@]}"

# deepspeed: no compiled ops (Lightning's DeepSpeedStrategy with a torch optimizer needs none)
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  $PY -m pip download -q --no-deps --no-binary :all: deepspeed==0.19.8 -d "$work"
  DS_BUILD_OPS=0 DS_ACCELERATOR=cuda $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "$work"/deepspeed-0.19.8.tar.gz
fi

# llama-cpp-python: slim + portable
if ! ls .whl/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
  cached=$(find ~/.cache/pip/wheels -name 'llama_cpp_python-0.3.36-*.whl' | head -1)
  [ -n "$cached" ] || { echo "no cached llama_cpp_python 0.3.36 wheel: run 'make test' (or pip install -e .[test]) first"; exit 1; }
  if [ ! -f "$work/b_portable/bin/libggml-cpu.so.0.25.3" ]; then
    [ -d "$work/llama_cpp_python-0.3.36" ] || { $PY -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$work"; tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"; }
    cmake -S "$work/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$work/b_portable" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$work/cmake.log"
    cmake --build "$work/b_portable" --target ggml-cpu -j"$(nproc)" > "$work/build.log"
  fi
  strip --strip-unneeded "$work/b_portable/bin/libggml-cpu.so.0.25.3" 2>/dev/null || true
  $PY - "$cached" "$work/b_portable/bin/libggml-cpu.so.0.25.3" "$(ldconfig -p | awk '/libgomp.so.1 .*x86-64/{print $NF; exit}')" .whl <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path

src, cpu_lib, gomp, out_dir = sys.argv[1:5]
lib = "llama_cpp/lib/"
# ctypes loads lib<name>.so; the libraries need each other by soname (<name>.so.0, RUNPATH $ORIGIN)
keep_libs = {"libllama.so", "libllama.so.0", "libmtmd.so", "libggml.so", "libggml.so.0", "libggml-base.so.0",
             "libggml-cpu.so.0"}
files = {}
with zipfile.ZipFile(src) as z:
    for info in z.infolist():
        name = info.filename
        if name.endswith("/") or name.endswith(".dist-info/RECORD"):
            continue
        if name.startswith(("lib/", "include/", "bin/")) or "/__pycache__/" in name:
            continue
        if name.startswith(lib) and name[len(lib):] not in keep_libs:
            continue
        files[name] = z.read(name)
files[lib + "libggml-cpu.so.0"] = Path(cpu_lib).read_bytes()  # GGML_NATIVE=OFF build of the same source
if gomp:
    files[lib + "libgomp.so.1"] = Path(gomp).read_bytes()
dist = next(n.split("/")[0] for n in files if n.endswith(".dist-info/METADATA"))
record = []
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(data)}")
record.append(f"{dist}/RECORD,,")
out = Path(out_dir) / Path(src).name
with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
    for name, data in files.items():
        info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
        info.external_attr = (0o755 if name.endswith((".so", ".so.0", ".so.1")) else 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, data)
    z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, {len(files)} files")
EOF
fi
ls -la .whl; du -sh .whl

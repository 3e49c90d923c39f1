#!/usr/bin/env bash
# Download what `benchmarks/bench_grpo_trl.py` needs on an offline GPU machine (Python 3.12, x86-64) into .whl_trl/
# (git-ignored): TRL 1.16 and the packages its `from trl import GRPOConfig, GRPOTrainer` imports that such an image
# may lack or hold in another version. Run it in a checkout that reaches a package index; carry .whl_trl/ there.
#   trl 1.16.0        needs accelerate>=1.10.1, datasets>=4.7, transformers>=4.56.2, pandas, pyarrow>=21, psutil,
#                     jinja2, pyyaml, numpy, packaging, huggingface_hub (peft only for peft_config: >=0.13)
#   datasets 5.2.0    + dill 0.4.1, multiprocess 0.70.19 (its py312 wheel), xxhash, fsspec<=2026.9.0, pyarrow>=24,
#                     pandas, huggingface-hub>=1.31 (1.33 on the image, with transformers 5.17)
#   accelerate 1.15.0, psutil 7.2.2, pandas 3.1.1 (+ python-dateutil, six)
#   pyarrow 26.0.1    repacked slim (55 -> ~34 MB): no Flight or S3 (their .so and the Cython modules that load them;
#                     pyarrow.fs imports _s3fs under try/except), no headers, tests or .pyx sources, one copy (the
#                     soname) of each libarrow_python*. datasets uses pyarrow core, compute, parquet, dataset, json.
# The same versions as the project .venv, where the CPU smoke test ran. Not included (on the image, newer than
# trl needs): torch, transformers, peft, numpy, pillow, safetensors, huggingface_hub, tokenizers, jinja2, pyyaml.
# LEAN=1 leaves out pyarrow and pandas (+dateutil, six) to use the image's (~3 MB instead of ~47 MB).
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
PY=${PYTHON:-$root/.venv/bin/python}
work=${TRL_WHEEL_WORK:-/tmp/trl_wheels}; mkdir -p "$work" .whl_trl
pkgs=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0
      accelerate==1.15.0 psutil==7.2.2)
[ "${LEAN:-0}" = 1 ] || pkgs+=(pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64
      --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl_trl "${pkgs[@]}"

if [ "${LEAN:-0}" != 1 ] && ! ls .whl_trl/pyarrow-26.0.1-*.whl >/dev/null 2>&1; then
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$work" pyarrow==26.0.1
  $PY - "$work"/pyarrow-26.0.1-cp312-cp312-manylinux*.whl .whl_trl <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

src, out_dir = sys.argv[1:3]
drop = re.compile(r"^pyarrow/(include/|tests/|src/|.*\.pyx$|.*\.pxd$|.*\.pxi$|.*\.h$|.*\.cc$|libarrow_flight\."
                  r"|libarrow_s3\.|_flight\.|_s3fs\.|flight\.py$|libarrow_python_flight\.|_pyarrow_cpp_tests\."
                  r"|libarrow_python(_parquet_encryption)?\.so(\.2600\.1\.0)?$)")  # keep the .so.2600 sonames
files, dropped = {}, 0
with zipfile.ZipFile(src) as z:
    for info in z.infolist():
        name = info.filename
        if name.endswith("/") or name.endswith(".dist-info/RECORD"):
            continue
        if drop.match(name):
            dropped += info.file_size
            continue
        files[name] = (z.read(name), info.external_attr)
dist = next(n.split("/")[0] for n in files if n.endswith(".dist-info/METADATA"))
record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
          for n, (d, _) in files.items()] + [f"{dist}/RECORD,,"]
out = Path(out_dir) / Path(src).name
with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
    for name, (data, attr) in files.items():
        info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
        info.external_attr, info.compress_type = attr, zipfile.ZIP_DEFLATED
        z.writestr(info, data)
    z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
print(f"{out}: {out.stat().st_size / 1e6:.1f} MB ({dropped / 1e6:.0f} MB uncompressed left out), {len(files)} files")
EOF
fi
ls -la .whl_trl; du -sh .whl_trl
# The target folder's path must hold "site-packages": dill (datasets' fingerprinting) pickles a module found elsewhere
# by value, and pickling pyarrow by value fails ("Can't pickle <class 'MonthDayNano'>").
echo "install on the GPU machine:"
echo 'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_trl/site-packages .whl_trl/*.whl && export PYTHONPATH=/tmp/site_trl/site-packages:$PYTHONPATH'

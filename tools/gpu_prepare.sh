#!/usr/bin/env bash
# Prepare tools/gpu_check.sh for a GPU machine without network, from this checkout: the
# wheels its Python 3.12 lacks (it has torch, numpy, onnxruntime, pytest, pyyaml, ...) go to
# .whl/, and mosquitto with the libraries ldd lists to .mosq/ (the binary behind a wrapper
# that points only it at them). Both are ignored by git; carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
mosquitto=$(command -v mosquitto) || { echo "mosquitto is not installed here (make broker)" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
grep -qx '/.mosq/' .git/info/exclude 2>/dev/null || echo /.mosq/ >>.git/info/exclude
rm -rf .whl .mosq
mkdir -p .whl .mosq/lib
platforms=()
for n in 35 34 31 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in pylsl==1.18.6 aiomqtt==2.5.1 paho-mqtt==2.2.0 pyxdf==1.17.5 pydantic==2.14.4 \
            pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
            typing-extensions==4.16.0 hypothesis==6.170.17 sortedcontainers==2.4.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$spec"
done
# pylsl without liblsl inside (its pure-Python wheel) cannot open a stream there
unzip -l .whl/pylsl-*.whl | grep -q 'liblsl.*\.so' || { echo "pylsl wheel has no liblsl" >&2; exit 1; }
cp "$mosquitto" .mosq/mosquitto.bin
ldd "$mosquitto" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libresolv.so.*|ld-linux*) ;;
    *) cp -L "$lib" .mosq/lib/ ;;
  esac
done
cat >.mosq/mosquitto <<'WRAP'
#!/bin/sh
# mosquitto with the libraries it was built against; nothing else sees them
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/mosquitto.bin" "$@"
WRAP
chmod +x .mosq/mosquitto
du -sh .whl .mosq
echo "carry .whl and .mosq; run there: bash tools/gpu_check.sh \"\$OUT\""

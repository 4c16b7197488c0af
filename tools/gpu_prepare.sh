#!/usr/bin/env bash
# Prepare tools/gpu_check.sh for a GPU machine without network, from this checkout: the
# wheels it lacks (its Python is 3.12 with torch, numpy, onnxruntime, pytest) go to .whl/,
# and mosquitto with the libraries ldd lists to .mosq/. Both are ignored by git; carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
grep -qx '/.mosq/' .git/info/exclude 2>/dev/null || echo /.mosq/ >>.git/info/exclude
rm -rf .whl .mosq
mkdir -p .whl .mosq/lib
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
for spec in pylsl==1.18.6 aiomqtt==2.5.1 paho-mqtt==2.2.0 pyxdf==1.17.5 pydantic==2.14.4 \
            pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
            hypothesis==6.170.17 sortedcontainers==2.4.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$spec"
done
mosquitto=$(command -v mosquitto)
cp "$mosquitto" .mosq/
ldd "$mosquitto" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|ld-linux*) ;;
    *) cp -L "$lib" .mosq/lib/ ;;
  esac
done
du -sh .whl .mosq
echo "carry .whl and .mosq; run: bash tools/gpu_check.sh"

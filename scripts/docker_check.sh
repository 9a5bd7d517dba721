#!/usr/bin/env bash
# Build the promptkd image and check it on a machine with Docker, which the project's CI cannot run.
# The checks: the user is uid 1000, PROMPTKD_HOME and HF_HOME are writable, promptkd imports, and the app
# returns HTTP 200 on the published port 7860.
#
#   bash scripts/docker_check.sh           GPU image (default build arguments), checked without a GPU
#   bash scripts/docker_check.sh --gpus    GPU image, run with --gpus all; torch must see CUDA
#   bash scripts/docker_check.sh --cpu     CPU image (TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
#
# Needs docker and curl. The app is published on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=promptkd:check
build_args=()
run_args=()
expect_cuda=False
case "${1:-}" in
  "") ;;
  --gpus)
    run_args=(--gpus all)
    expect_cuda=True
    ;;
  --cpu)
    tag=promptkd:check-cpu
    build_args=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
    ;;
  *)
    echo "error: unknown option '$1': use --gpus, --cpu or no option." >&2
    exit 2
    ;;
esac

fail() {
  echo "FAILED: $*" >&2
  exit 1
}

docker build ${build_args[@]+"${build_args[@]}"} -t "$tag" .

uid="$(docker run --rm "$tag" id -u)"
[ "$uid" = 1000 ] || fail "the container runs as uid $uid, expected 1000"
docker run --rm "$tag" sh -c 'touch "$PROMPTKD_HOME/.write-check" "$HF_HOME/.write-check"' \
  || fail "PROMPTKD_HOME or HF_HOME is not writable by uid 1000"
cuda="$(docker run --rm ${run_args[@]+"${run_args[@]}"} -e HF_HUB_OFFLINE=1 "$tag" \
  python -c "import torch, promptkd.cli; print(torch.cuda.is_available())")"
echo "torch.cuda.is_available() in the container: $cuda"
if [ "$expect_cuda" = True ] && [ "$cuda" != True ]; then
  fail "torch does not see a GPU with --gpus all: check the NVIDIA driver (580 or newer for CUDA 13.0) and the NVIDIA Container Toolkit"
fi

name="promptkd-check-$$"
docker run -d --rm --name "$name" ${run_args[@]+"${run_args[@]}"} -p 127.0.0.1::7860 "$tag" >/dev/null
trap 'docker stop "$name" >/dev/null 2>&1 || true' EXIT
port="$(docker port "$name" 7860/tcp | head -n 1 | sed 's/.*://')"

for _ in $(seq 1 90); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/"; then
    echo "OK: $tag serves the app on port 7860 (published on 127.0.0.1:$port) as uid 1000."
    exit 0
  fi
  sleep 2
done
docker logs "$name" 2>&1 | tail -n 40 >&2
fail "no HTTP 200 from the app within 180 s"

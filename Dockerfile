# The training image the Kubernetes manifests in cluster/k8s/ run. From the repository's root:
#   docker build -t your-registry/whitebox-pretrain:0.1.0 . && docker push your-registry/whitebox-pretrain:0.1.0
# and set that name as `image` in cluster/k8s/values.yaml.
#
# CUDA comes with torch: torch 2.13.0 from PyPI (Linux x86_64) is built for CUDA 13.0 and installs
# the CUDA libraries, cuDNN and NCCL as pip packages. The base image adds what the NVIDIA container
# toolkit reads (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES); the nodes need a driver that
# supports CUDA 13.0. Pin it by digest once pulled (FROM nvidia/cuda:...@sha256:...).
FROM nvidia/cuda:13.0.3-base-ubuntu24.04

# A C++ compiler and Python's headers: DeepSpeed builds its CPU ops (CPU Adam, for
# engine.offload_optimizer) on first use, and Triton (engine.compile) its kernel launchers.
# Their versions are the Ubuntu release's (the archive drops superseded ones, so no pins).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment, as Ubuntu's Python refuses pip installs outside one; torch first, in a
# layer of its own, so that a code change does not download its gigabytes again.
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv && pip install --no-cache-dir torch==2.13.0

# Editable, so that the one copy of pretrain/ is the one launch_node.sh runs pretrain/main.py from.
# Root, as in most training images: the run_dir volume (often NFS, which ignores fsGroup) and
# /dev/shm must be writable without per-cluster uid setup; set the pod's securityContext where the
# volumes allow another user.
WORKDIR /workspace/whitebox-pretrain
COPY . .
RUN pip install --no-cache-dir -e .

# No ENTRYPOINT: the manifests' `command` (cluster/launch_node.sh) is then the container's PID 1
# as written. Run bare (docker run --gpus all IMAGE), the image checks its install: the trainer
# imports, and torch's CUDA build sees the GPUs.
CMD ["python", "-c", "import torch, pretrain.trainer; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"]

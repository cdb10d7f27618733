# prefix training image for Kubernetes / Run:ai (k8s/, docs/cluster.md). Not built in CI here (no docker).
#   docker build -t REGISTRY/prefix:TAG .
#
# Base: python:3.11-slim plus PyTorch's own CUDA wheel rather than an nvidia/cuda image: the CUDA wheels
# bring the CUDA runtime, cuDNN and NCCL as pip dependencies (nvidia-*), so a CUDA base image would only
# duplicate them; the GPU driver comes from the node through the NVIDIA container runtime. Python 3.11 is
# the version prefix is tested with. Debian's bash is present (the pods run `bash -c 'exec prefix launch ...'`).
FROM python:3.11-slim

# The CUDA build of torch; pick the index matching the nodes' driver (cu126, cu128, ...).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Must equal runAsUser / runAsGroup / fsGroup in k8s/*.yaml (tests/test_manifests.py checks it).
ARG APL_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFIX_RUNS_ROOT=/home/apluser/runs

RUN groupadd --gid "${APL_UID}" apluser \
 && useradd --uid "${APL_UID}" --gid "${APL_UID}" --create-home --shell /bin/bash apluser \
 && mkdir -p /home/apluser/runs \
 && chown "${APL_UID}:${APL_UID}" /home/apluser/runs

# torch first, from the CUDA index: constraints.txt pins torch==2.13.0, which the CUDA wheel
# (2.13.0+cu128) satisfies, so the install below keeps it instead of fetching the CPU build.
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" \
 && python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'; print(torch.__version__)"

WORKDIR /home/apluser/prefix
COPY pyproject.toml constraints.txt README.md ./
COPY prefix ./prefix
COPY configs ./configs
# torchvision comes only as mosaicml-streaming's requirement and is never used; PyPI's wheel need not
# match the CUDA build of torch above, and a mismatched one breaks `import transformers` (constraints.txt).
# The trackers (docs/tracking.md) are extras: `--build-arg PREFIX_EXTRAS=` for the lean image.
ARG PREFIX_EXTRAS=tensorboard,wandb,mlflow
RUN pip install -c constraints.txt ".${PREFIX_EXTRAS:+[${PREFIX_EXTRAS}]}" \
 && pip uninstall -y torchvision \
 && python -c "import torch; assert torch.version.cuda, 'the install replaced the CUDA torch'"

# Numeric, so that the kubelet can verify runAsNonRoot. No ENTRYPOINT: the pod's command is
# `bash -c 'exec prefix launch ...'`, which leaves the launcher as PID 1 to receive the SIGTERM (it passes it to torchrun).
USER ${APL_UID}:${APL_UID}
CMD ["python", "-m", "prefix.train", "--help"]

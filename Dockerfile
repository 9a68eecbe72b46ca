# The training image: CUDA PyTorch, this project installed, a non-root user, no credentials (S3 keys
# come at run time from a Secret or the service account's cloud identity).
#   docker build -t registry.example.com/ml/sagan-dist:0.1.0 .
# The torch in the base image is the release pyproject.toml pins (2.13.0), so pip keeps it.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sagan
COPY pyproject.toml README.md ./
COPY models/ models/
COPY data_pipeline/ data_pipeline/
COPY trainer/ trainer/
COPY launch/ launch/
COPY configs/ configs/
COPY k8s/ k8s/
# DeepSpeed builds against the installed torch, hence no build isolation.
RUN pip install --no-build-isolation . && sagan --help >/dev/null

# The pods' user (k8s/: runAsUser 10001). Its home is an emptyDir in the pods (read-only root filesystem).
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/sagan --shell /usr/sbin/nologin sagan
USER 10001:10001
ENV HOME=/home/sagan

CMD ["sagan", "--help"]

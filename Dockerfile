# One image for every process of the service: api (default CMD), Celery worker, Celery beat
# and the one-shot `migrate` step; docker-compose.yml picks the command per service.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data

WORKDIR /srv

# Unprivileged user; /data (models, adapters, beat schedule) is owned by it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app \
    && mkdir -p /data \
    && chown app:app /data

# torch first, in a layer of its own so code changes never reinstall it. By default the CPU
# build from PyTorch's CPU index (PyPI's Linux wheel pulls in several GB of CUDA libraries);
# docker-compose.gpu.yml builds the worker with TORCH_INDEX=https://pypi.org/simple, whose Linux
# wheel is the CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX}"

# The remaining dependencies, read from pyproject.toml alone, so this layer is rebuilt only
# when the dependencies change (torch==2.13.0 is already satisfied by the wheel above).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY app/ app/
COPY worker/ worker/
COPY migrations/ migrations/
COPY alembic.ini ./
# Editable, so the code stays beside alembic.ini and migrations/ in /srv, where app.migrate
# looks for them; the dependencies are already installed above.
RUN pip install --no-cache-dir --no-deps -e .

USER app

VOLUME ["/data"]
EXPOSE 8000

CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

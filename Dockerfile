# One image for every hybrid-router role (api, worker, beat, flower, sim): the command picks it.
FROM python:3.12-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them:
# this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && useradd --create-home --uid 10001 router \
    && mkdir -p /data/beat && chown router /data/beat

# Then the code (the cheap layer): the package itself, without touching its dependencies.
COPY README.md ./
COPY settings ./settings
COPY router ./router
COPY workers ./workers
COPY simulator ./simulator
RUN pip install --no-deps .

USER router

# Every setting comes from ROUTER_* environment variables (see settings/config.py).
ENV ROUTER_API_HOST=0.0.0.0 \
    ROUTER_LOG_FORMAT=json

EXPOSE 8000 5555 8900

ENTRYPOINT ["hybrid-router"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]

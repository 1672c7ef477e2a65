# recsvc in a container: a thin wrapper over the README's own install (`pip install .`) and serve commands.
# Build stage: compile the Cython kernels and hnswlib into wheels. Runtime stage: install the wheels, no compiler.
#   docker build -t recsvc .
#   docker run -p 50051:50051 -p 9464:9464 recsvc            # the demo catalog (built on first start)
#   docker compose up                                          # two replicas and Redis (docker-compose.yml)

FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 recsvc
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER recsvc
WORKDIR /home/recsvc
# gRPC and Prometheus metrics
EXPOSE 50051 9464
# grpc.health.v1 through the recsvc command (exit 0 only while SERVING); the demo catalog's first build takes
# about a minute, hence the start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["recsvc", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["recsvc"]
CMD ["serve", "--host", "0.0.0.0"]

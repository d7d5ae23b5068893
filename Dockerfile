# One image, one binary: `mlflow-gateway-operator controller` (the operator) and
# `mlflow-gateway-operator gateway` (the gateway pods) run from it.
# The builder matches the toolchain the project is developed with (rustc 1.95); the runtime is
# distroless (glibc + CA certificates, no shell), non-root.
#
#   docker build -t REF .                                   compile in the builder (the default)
#   docker build --build-arg BINARY=prebuilt -t REF .       take target/image/mlflow-gateway-operator,
#                                                           built outside (e.g. by CI), as it is
# The bases are arguments so that a machine that cannot pull them can substitute its own
# (hack/image.sh builds a local stand-in for the runtime base from Debian packages); the defaults
# are the published images.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# Which stage supplies the binary: `build` (compiled here) or `prebuilt` (from the context).
ARG BINARY=build

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's development tools: cargo loads every member, the image builds only the operator.
COPY tools/dev ./tools/dev
RUN cargo build --release --locked --bin mlflow-gateway-operator \
    && mkdir /out && cp target/release/mlflow-gateway-operator /out/

# A binary built outside the image (same glibc or older: Debian 12's is 2.36). The context's
# .dockerignore lets only this path of target/ in.
FROM scratch AS prebuilt
COPY target/image/mlflow-gateway-operator /out/mlflow-gateway-operator

FROM ${BINARY} AS binary

FROM ${RUNTIME_IMAGE}
COPY --from=binary /out/mlflow-gateway-operator /usr/local/bin/mlflow-gateway-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mlflow-gateway-operator"]
CMD ["controller"]

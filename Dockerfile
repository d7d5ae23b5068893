# One image, one binary: `mlflow-gateway-operator controller` (the operator) and
# `mlflow-gateway-operator gateway` (the gateway pods) run from it.
# The builder matches the toolchain the project is developed with (rustc 1.95); the runtime is
# distroless (glibc + CA certificates, no shell), non-root.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's development tools: cargo loads every member, the image builds only the operator.
COPY tools/dev ./tools/dev
RUN cargo build --release --locked --bin mlflow-gateway-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mlflow-gateway-operator /usr/local/bin/mlflow-gateway-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mlflow-gateway-operator"]
CMD ["controller"]

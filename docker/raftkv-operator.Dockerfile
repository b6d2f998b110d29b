# The operator image: a fully static (musl) binary on an empty base, running as non-root.
# Build from the repository root:  docker build -f docker/raftkv-operator.Dockerfile -t raftkv-operator:0.1.0 .
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev protobuf-dev protoc
WORKDIR /src
COPY . .
RUN cargo build --release -p raftkv-operator --bin raftkv-operator \
    && cp target/release/raftkv-operator /raftkv-operator

FROM scratch
COPY --from=build /raftkv-operator /raftkv-operator
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/raftkv-operator"]
CMD ["run"]

# The raftkv node image: a static-ish binary on a distroless base, running as non-root.
# Build from the repository root:  docker build -f docker/raftkv.Dockerfile -t raftkv:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev clang protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p raftkv --bin raftkv \
    && cp target/release/raftkv /raftkv

# RocksDB links libstdc++ and glibc, so the base is distroless/cc (glibc, libstdc++, no shell).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /raftkv /usr/local/bin/raftkv
USER 65532:65532
EXPOSE 2379 2380 9379
ENTRYPOINT ["/usr/local/bin/raftkv"]
CMD ["serve"]

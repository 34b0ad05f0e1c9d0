# syntax=docker/dockerfile:1
#
# The `switchyard` binary in a small non-root image: built with the release
# profile (LTO, panic=abort) on Debian 12, run on distroless `cc` (glibc and
# libgcc only: no shell, no package manager), as uid/gid 65532.
#
#   docker build -t switchyard:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 switchyard:0.1.0 \
#     demo --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9901
#
# manifests/ runs it with `run --config /etc/switchyard/config/switchyard.yaml`
# (the default command below).

# The workspace's rust-version (Cargo.toml); proxy/tests/manifests.rs keeps
# the two in step.
ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Manifests and sources first, separately, so that a source change reuses the
# dependency download layer.
COPY Cargo.toml Cargo.lock ./
COPY benches/Cargo.toml benches/
COPY control/Cargo.toml control/
COPY proxy/Cargo.toml proxy/
COPY trim/Cargo.toml trim/
# The patched hyper (vendor/PATCHES.md), wired in by `[patch.crates-io]`.
COPY vendor vendor
RUN mkdir -p benches/benches control/src proxy/src trim/src \
    && touch benches/lib.rs benches/benches/hot_path.rs control/src/lib.rs proxy/src/lib.rs trim/src/lib.rs \
    && echo 'fn main() {}' > proxy/src/main.rs \
    && cargo fetch --locked
COPY benches benches
COPY control control
COPY proxy proxy
COPY trim trim
RUN cargo build --release --locked --offline -p switchyard-proxy --bin switchyard \
    && install -D -m 0755 target/release/switchyard /out/switchyard

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/switchyard /usr/local/bin/switchyard
# The distroless `nonroot` user, numerically, so `runAsNonRoot` can verify it.
USER 65532:65532
# Data listener (8080 plain, 8443 TLS on the edge gateway) and admin listener
# (health, /metrics, /v1/). The distroless image carries the system CA
# certificates that `https://` upstream endpoints are verified against.
EXPOSE 8080 8443 9901
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["run", "--config", "/etc/switchyard/config/switchyard.yaml"]

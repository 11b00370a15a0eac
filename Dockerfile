# meshwatch as a container image (used by compose.yaml).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin meshwatch

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meshwatch /usr/local/bin/meshwatch
COPY scenarios /usr/share/meshwatch/scenarios
VOLUME /var/lib/meshwatch
EXPOSE 9977 9978
ENTRYPOINT ["meshwatch"]
CMD ["serve"]

# The collector image the deploy/ manifests run: `docker build -t genai-collector:0.1.0 .`
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p genai-collector

FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/genai-collector /usr/local/bin/genai-collector
ENTRYPOINT ["/usr/local/bin/genai-collector"]

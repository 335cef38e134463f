# natbox container image: a static binary on distroless (no shell), as the
# non-root user 65532 with a health check that needs no shell.
#
# Build:   docker build --build-arg VERSION=$(git describe --tags --always) -t natbox .
#          docker build --target relay -t natbox-relay .      # the relay's image
#
# Gateway mode (a [tun] table) creates a TUN device and installs routes, so it
# needs the capability, the device and root inside the container (Docker gives
# a non-root user no capability):
#   docker run -d --name natbox --user 0:0 --cap-drop ALL --cap-add NET_ADMIN \
#     --device /dev/net/tun --network host -v /etc/natbox:/etc/natbox:ro natbox
# Uplink-only appliances (an [uplink] table and no [tun]) and the relay are
# fully unprivileged and keep the default user:
#   docker run -d --name natbox --cap-drop ALL -v /etc/natbox:/etc/natbox:ro natbox
#   docker run -d --name relay --network host --cap-drop ALL \
#     -v /etc/natbox:/etc/natbox:ro natbox-relay
# (relay ports below 1024: see examples/compose/relay.yml.)
# Compose files for each: examples/compose/. Check a config without running it:
#   docker run --rm -v /etc/natbox:/etc/natbox:ro natbox check --config /etc/natbox/natbox.toml

FROM golang:1.26 AS build
WORKDIR /src
# Module downloads are cached in their own layer, invalidated only by go.mod/go.sum.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/natbox ./cmd/natbox && mkdir -p /out/run/natbox

# The relay: natbox relay --config /etc/natbox/relay.toml.
FROM gcr.io/distroless/static-debian12:nonroot AS relay
ARG VERSION=dev
LABEL org.opencontainers.image.title="natbox relay" \
      org.opencontainers.image.description="natbox relay: public ports for natbox appliances behind carrier-grade NAT" \
      org.opencontainers.image.source="https://github.com/natbox/natbox" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/natbox /natbox
# The admin socket's directory, writable by the user (health and status use it).
COPY --from=build --chown=65532:65532 /out/run/natbox /run/natbox
USER 65532:65532
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s \
  CMD ["/natbox", "health", "--config", "/etc/natbox/relay.toml"]
ENTRYPOINT ["/natbox"]
CMD ["relay", "--config", "/etc/natbox/relay.toml"]

# The appliance (the default target): natbox run --config /etc/natbox/natbox.toml.
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
LABEL org.opencontainers.image.title="natbox" \
      org.opencontainers.image.description="natbox: userspace port mapping through a TUN gateway or a WireGuard relay" \
      org.opencontainers.image.source="https://github.com/natbox/natbox" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/natbox /natbox
COPY --from=build --chown=65532:65532 /out/run/natbox /run/natbox
USER 65532:65532
# Healthy while natbox answers on its admin socket and every ingress is up
# (an uplink counts once the relay has registered it).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s \
  CMD ["/natbox", "health", "--config", "/etc/natbox/natbox.toml"]
ENTRYPOINT ["/natbox"]
CMD ["run", "--config", "/etc/natbox/natbox.toml"]

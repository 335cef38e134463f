# natbox container image: a static binary on distroless (no shell, runs as root
# only because gateway mode must create a TUN device).
#
# Build:   docker build --build-arg VERSION=$(git describe --tags --always) -t natbox .
#
# Gateway mode (a [tun] table) creates a TUN device and installs routes, so it
# needs the capability and the device:
#   docker run -d --name natbox --cap-add NET_ADMIN --device /dev/net/tun \
#     -v /etc/natbox:/etc/natbox:ro --network host natbox
# Relay-only appliances (an [uplink] table and no [tun]) and `natbox relay`
# are fully unprivileged and need neither flag:
#   docker run -d --name natbox -v /etc/natbox:/etc/natbox:ro natbox
#   docker run -d --name relay -p 51820:51820/udp -p 443:443 \
#     -v /etc/natbox:/etc/natbox:ro natbox relay --config /etc/natbox/relay.toml
# Check a config without running it:
#   docker run --rm -v /etc/natbox:/etc/natbox:ro natbox check --config /etc/natbox/natbox.toml

FROM golang:1.26 AS build
WORKDIR /src
# Module downloads are cached in their own layer, invalidated only by go.mod/go.sum.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/natbox ./cmd/natbox

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/natbox /natbox
# The config is read from /etc/natbox/natbox.toml; mount it (see above).
ENTRYPOINT ["/natbox"]
CMD ["run", "--config", "/etc/natbox/natbox.toml"]

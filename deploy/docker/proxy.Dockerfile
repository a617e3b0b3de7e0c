# The coordinator's Fleet proxy: Debian's own nginx with deploy/proxy/fedseg-fleet.conf,
# the one door the hospitals' SuperNodes come through (Fleet API only; 403 for the rest).
# Build context is the repository root:
#   docker build -f deploy/docker/proxy.Dockerfile -t fedseg-proxy:local .
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log

COPY deploy/proxy/fedseg-fleet.conf /etc/nginx/conf.d/fedseg-fleet.conf
# In compose the SuperLink is the `superlink` container, not this machine's loopback;
# the rest of the server block is used exactly as shipped.
ARG FEDSEG_UPSTREAM=superlink:8000
RUN sed -i "s/server 127.0.0.1:8000;/server ${FEDSEG_UPSTREAM};/" \
        /etc/nginx/conf.d/fedseg-fleet.conf \
 && grep -q "server ${FEDSEG_UPSTREAM};" /etc/nginx/conf.d/fedseg-fleet.conf

# The master process runs as root to read the mounted superlink.key (mode 0600) and
# to bind; the workers that handle connections run as www-data.
EXPOSE 9092
CMD ["nginx", "-g", "daemon off;"]

#!/bin/bash
# Chunk container entrypoint: stamp the data directory on first start
# (`ironblock-chunk init`, which registers with meta), then run it. The
# advertised addresses default to this container's first IP.
set -euo pipefail
data=${IRONBLOCK_CHUNK_DATA:-/var/lib/ironblock/chunk}
meta=${IRONBLOCK_META:?set IRONBLOCK_META to meta host:port}
ip=${IRONBLOCK_CHUNK_IP:-$(hostname -i | awk '{print $1}')}
portal=${IRONBLOCK_CHUNK_PORTAL:-$ip:3260}
data_addr=${IRONBLOCK_CHUNK_DATA_ADDR:-$ip:3270}
if [[ ! -f $data/IRONBLOCK_CHUNK ]]; then
    echo "stamping $data (portal $portal, data $data_addr)" >&2
    ironblock-chunk init --data "$data" --meta "$meta" --portal "$portal" --data-addr "$data_addr"
fi
exec ironblock-chunk run --data "$data" --meta "$meta" \
    --listen 0.0.0.0:3260 --data-listen 0.0.0.0:3270 --metrics 0.0.0.0:9100 \
    --portal "$portal" --data-addr "$data_addr" "$@"

#!/usr/bin/env bash
# Makes a throwaway CA and one certificate per workload, each with a SPIFFE URI SAN, for the
# example Envoy configs in deploy/envoy/ (and the end-to-end tests).
#   scripts/gen-certs.sh DIR [TRUST_DOMAIN]
# writes DIR/ca.crt and DIR/<name>.crt, DIR/<name>.key for frontend, backend and gateway, for
# meshwatch itself (its gRPC listener with listen.tls: also DNS:localhost and IP:127.0.0.1), and
# for an "intruder" that the CA vouches for but no allowlist names.
set -euo pipefail
dir=${1:?usage: gen-certs.sh DIR [TRUST_DOMAIN]}
td=${2:-mesh.test}
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=meshwatch test CA" -keyout ca.key -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
for name in frontend backend gateway meshwatch intruder; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$name" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  extra=""
  [ "$name" = meshwatch ] && extra=",DNS:localhost,IP:127.0.0.1"
  printf 'subjectAltName=URI:spiffe://%s/ns/shop/sa/%s,DNS:%s%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
    "$td" "$name" "$name" "$extra" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
done
chmod 644 ./*.key

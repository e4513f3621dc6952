#!/usr/bin/env sh
# EXAMPLE: the `accel-token` secret that functions send to the shim (mounted by OpenFaaS at
# /var/openfaas/secrets/accel-token; list it under `secrets:` of each function, as stack.ce.yml does).
# The token must be one of the shim's tenant tokens (the accelshim-tokens Secret, deploy/kubernetes).
set -eu
: "${ACCEL_TOKEN:?set ACCEL_TOKEN to this tenant's token (never commit it)}"
printf '%s' "$ACCEL_TOKEN" | faas-cli secret create accel-token --from-stdin
